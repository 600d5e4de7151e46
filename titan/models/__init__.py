"""Model registry: a `model=` preset's fields -> model args -> a model on the meta device."""

from __future__ import annotations

import dataclasses

import torch

from titan.config.schema import ModelConfig
from titan.models.llama3 import Llama3, LlamaArgs, count_params, flops_per_token


def model_args(cfg: ModelConfig, vocab_size: int, seq_len: int) -> LlamaArgs:
    """`vocab_size` is used when the preset says -1 (take it from the tokenizer)."""
    fields = {f.name for f in dataclasses.fields(LlamaArgs)}
    values = {k: v for k, v in dataclasses.asdict(cfg).items() if k in fields}
    values["vocab_size"] = cfg.vocab_size if cfg.vocab_size > 0 else vocab_size
    values["max_seq_len"] = seq_len
    return LlamaArgs(**values)


def build_model(args: LlamaArgs) -> Llama3:
    """Parameters on the meta device: nothing is allocated until the parallel layer shards it."""
    with torch.device("meta"):
        return Llama3(args)


__all__ = ["Llama3", "LlamaArgs", "build_model", "count_params", "flops_per_token", "model_args"]
