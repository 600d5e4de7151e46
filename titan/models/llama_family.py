"""Llama 3 as a registered family: the existing model (titan/models/llama3.py), TP plan
(titan/parallel/tp.py) and Hugging Face adapter (titan/interop/hf.py), unchanged."""

from __future__ import annotations

from types import SimpleNamespace

from titan.interop import hf as llama_hf
from titan.models.llama3 import Llama3, LlamaArgs
from titan.models.registry import Family, args_from_fields, register

LLAMA3 = register(
    Family(
        name="llama3",
        args_class=LlamaArgs,
        module_class=Llama3,
        args_from_config=lambda cfg, vocab, seq_len: args_from_fields(LlamaArgs, cfg, vocab, seq_len),
        active_params=lambda args, total: total,
        hf=SimpleNamespace(
            MODEL_TYPES=("llama",),
            to_hf=llama_hf.to_hf,
            from_hf=llama_hf.from_hf,
            hf_config=llama_hf.hf_config,
            args_from_hf_config=llama_hf.args_from_hf_config,
        ),
    )
)
