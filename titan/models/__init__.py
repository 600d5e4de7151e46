"""Models: a `model=` preset's fields -> its family's args -> a model on the meta device.

The family (`model.family`, see `titan.models.registry`) decides the module, the counts and the
Hugging Face adapter; these functions dispatch to it so callers never name an architecture."""

from __future__ import annotations

import torch

from titan.config.schema import ModelConfig
from titan.models.llama3 import Llama3, LlamaArgs
from titan.models.llama3 import flops_per_token as _dense_flops_per_token
from titan.models.registry import count_params, family_of, get_family


def model_args(cfg: ModelConfig, vocab_size: int, seq_len: int):
    """`vocab_size` is used when the preset says -1 (take it from the tokenizer)."""
    return get_family(cfg.family).args_from_config(cfg, vocab_size, seq_len)


def build_model(args) -> torch.nn.Module:
    """Parameters on the meta device: nothing is allocated until the parallel layer shards it."""
    with torch.device("meta"):
        return family_of(args).module_class(args)


def active_params(args, n_params: int) -> int:
    """Parameters one token passes through (all of them for a dense model)."""
    return family_of(args).active_params(args, n_params)


def flops_per_token(args, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token from the *active* parameters (see llama3.flops_per_token)."""
    return _dense_flops_per_token(args, active_params(args, n_params), seq_len)


__all__ = ["Llama3", "LlamaArgs", "active_params", "build_model", "count_params", "flops_per_token", "model_args"]
