"""MXFP8 training for nn.Linear with torchao (blocks of 32 values share one power-of-two scale).

`mxfp8` uses torchao's fast kernels (triton casts, CUTLASS/cuBLAS MX gemms): NVIDIA Blackwell
(SM100+) only. `mxfp8_emulated` does the same casts and rounding in plain PyTorch and runs on any
device, CPU included: right numerics, no speed-up; for development and numerics checks.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from titan.config.errors import ConfigError
from titan.config.schema import Float8Recipe, PrecisionConfig
from titan.precision._torchao import quiet_torchao_import
from titan.precision.filters import MX_BLOCK, linear_filter

MX_RECIPES = (Float8Recipe.mxfp8, Float8Recipe.mxfp8_emulated)
BLACKWELL = (10, 0)


def mxfp8_hardware_problem(device_type: str, capability: Optional[tuple[int, int]]) -> Optional[str]:
    """Why the fast MXFP8 recipe cannot run here, or None when it can."""
    if device_type != "cuda":
        return (
            f"mxfp8 needs an NVIDIA Blackwell GPU (SM100+); on this machine ({device_type}) "
            "use precision=mxfp8_emulated"
        )
    if capability is None or tuple(capability) < BLACKWELL:
        sm = "unknown" if capability is None else f"SM{capability[0]}{capability[1]}"
        return (
            f"mxfp8 needs an NVIDIA Blackwell GPU (SM100+), this GPU is {sm}; "
            "use precision=mxfp8_emulated or a float8 recipe"
        )
    return None


def cuda_capability() -> Optional[tuple[int, int]]:
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


def convert_mx_linears(model: nn.Module, cfg: PrecisionConfig, device_type: str) -> list[str]:
    """Wrap the weights of eligible linears in torchao's MXFP8 training tensor, in place."""
    if cfg.float8 is Float8Recipe.mxfp8:
        problem = mxfp8_hardware_problem(device_type, cuda_capability() if device_type == "cuda" else None)
        if problem:
            raise ConfigError("precision.float8", problem)
    with quiet_torchao_import():
        from torchao.prototype.moe_training.config import MXFP8TrainingOpConfig, MXFP8TrainingRecipe
        from torchao.quantization import quantize_

    recipe = (
        MXFP8TrainingRecipe.MXFP8_RCEIL
        if cfg.float8 is Float8Recipe.mxfp8
        else MXFP8TrainingRecipe.MXFP8_EMULATED_RCEIL
    )
    # torchao 0.18's MXFP8 linear override drops the bias argument: keep biased linears in
    # high precision rather than silently training them without a bias.
    keep = linear_filter(max(cfg.float8_min_dim, MX_BLOCK), MX_BLOCK, allow_bias=False)
    names = [fqn for fqn, m in model.named_modules() if keep(m, fqn)]
    quantize_(model, MXFP8TrainingOpConfig.from_recipe(recipe), filter_fn=keep)
    return names
