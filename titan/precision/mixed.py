"""bf16 compute: FSDP2 casts when sharding (titan.parallel.fsdp), torch.autocast otherwise.

With FSDP2 the sharded fp32 params are cast to `param_dtype` at all-gather and gradients are
reduced in `reduce_dtype`, so no autocast is needed. Without FSDP, autocast runs the forward's
matmuls in bf16 against fp32 master weights.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch

from titan.config.schema import DType, PrecisionConfig

log = logging.getLogger("titan")

TORCH_DTYPES = {DType.float32: torch.float32, DType.bfloat16: torch.bfloat16, DType.float16: torch.float16}


@dataclass(frozen=True)
class MixedPrecision:
    param_dtype: torch.dtype
    reduce_dtype: torch.dtype
    # Call for a fresh context manager around each forward (+ loss).
    autocast: Callable[[], ContextManager]


def mixed_precision(cfg: PrecisionConfig, device_type: str, fsdp_enabled: bool) -> MixedPrecision:
    param_dtype = TORCH_DTYPES[cfg.param_dtype]
    reduce_dtype = TORCH_DTYPES[cfg.reduce_dtype]
    if param_dtype is not torch.float32 and device_type == "cpu":
        log.warning(
            "precision: param_dtype=%s on CPU is very slow without bf16 matmul units "
            "(~250x slower than fp32 on AVX2 CPUs); precision=fp32 is the fast choice here",
            cfg.param_dtype.value,
        )

    autocast: Callable[[], ContextManager] = contextlib.nullcontext
    if not fsdp_enabled and param_dtype is not torch.float32:  # FSDP casts at all-gather instead
        autocast = functools.partial(torch.autocast, device_type, dtype=param_dtype)

    return MixedPrecision(param_dtype, reduce_dtype, autocast)
