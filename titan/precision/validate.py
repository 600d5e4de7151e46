"""Precision choices that cannot work, refused before anything is built or launched."""

from __future__ import annotations

import torch

from titan.config.errors import ConfigError
from titan.config.schema import Device, DType, Float8Recipe, TrainConfig
from titan.models.llama3 import LlamaArgs
from titan.precision.filters import FLOAT8_MULTIPLE, MX_BLOCK
from titan.precision.mx import MX_RECIPES, cuda_capability, mxfp8_hardware_problem


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def _target_device(cfg: TrainConfig) -> str:
    device = cfg.training.device
    if device is Device.auto:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device.value


def validate_precision(cfg: TrainConfig) -> None:
    p, m = cfg.precision, cfg.model
    for key in ("param_dtype", "reduce_dtype"):
        _require(
            getattr(p, key) is not DType.float16,
            f"precision.{key}",
            "float16 needs loss scaling, which titan does not do; use bfloat16 (or float32)",
        )
    _require(
        p.optim_state_dtype in (DType.float32, DType.bfloat16),
        "precision.optim_state_dtype",
        "must be float32 or bfloat16 (bf16 states use stochastic rounding)",
    )
    if p.float8 is Float8Recipe.none:
        return

    _require(p.float8_min_dim >= 1, "precision.float8_min_dim", "must be >= 1")
    multiple = MX_BLOCK if p.float8 in MX_RECIPES else FLOAT8_MULTIPLE
    ffn = LlamaArgs(dim=m.dim, multiple_of=m.multiple_of, ffn_dim_multiplier=m.ffn_dim_multiplier).ffn_hidden
    # Every block linear has `dim` on one side: if it is unusable, nothing would be converted
    # and the run would silently train in high precision.
    _require(
        m.dim % multiple == 0 and m.dim >= p.float8_min_dim,
        "model.dim",
        f"precision.float8={p.float8.value} needs model.dim divisible by {multiple} and >= "
        f"precision.float8_min_dim={p.float8_min_dim} (got {m.dim}); change model.dim or use precision=fp32",
    )
    _require(
        ffn % multiple == 0,
        "model.multiple_of",
        f"precision.float8={p.float8.value} needs the FFN hidden size ({ffn}) divisible by {multiple}; "
        f"set model.multiple_of to a multiple of {multiple}",
    )

    if p.float8 is Float8Recipe.mxfp8:
        device = _target_device(cfg)
        problem = mxfp8_hardware_problem(device, cuda_capability() if device == "cuda" else None)
        _require(problem is None, "precision.float8", problem or "")
    if p.float8 in MX_RECIPES:
        # Measured with torchao 0.18: under TP the weight becomes a DTensor around the MX
        # wrapper, the MX matmul override is bypassed and the layer trains in fp32, silently.
        _require(
            cfg.parallel.tp == 1,
            "parallel.tp",
            f"precision.float8={p.float8.value} does not compose with tensor parallelism in torchao 0.18 "
            "(the linears would silently run in high precision); use parallel.tp=1 or a float8 "
            "recipe (tensorwise / rowwise)",
        )
