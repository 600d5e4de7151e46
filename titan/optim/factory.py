"""Optimizer from the typed config: AdamW / Adam / SGD, fp32 or bf16 states."""

from __future__ import annotations

from typing import Iterable, Optional, Union

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from titan.config.schema import DType, OptimConfig, OptimName, PrecisionConfig
from titan.optim.bf16_state import BF16StateAdam, BF16StateSGD
from titan.optim.groups import param_groups


def build_optimizer(
    model_or_groups: Union[nn.Module, Iterable[dict]],
    cfg: OptimConfig,
    precision: Optional[PrecisionConfig] = None,
    seed: int = 0,
) -> torch.optim.Optimizer:
    """Build after FSDP/TP have replaced the parameters (DTensors), or the optimizer would hold
    the old ones. A module gets `param_groups(model, cfg)`; explicit groups are used as given.
    `seed` feeds the stochastic rounding of bf16 states."""
    if isinstance(model_or_groups, nn.Module):
        groups = param_groups(model_or_groups, cfg)
    else:
        groups = list(model_or_groups)
    bf16_states = precision is not None and precision.optim_state_dtype is DType.bfloat16
    fused = {} if cfg.fused is None else {"fused": cfg.fused}

    if cfg.name in (OptimName.adamw, OptimName.adam):
        common = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
        if bf16_states:
            return BF16StateAdam(groups, decoupled=cfg.name is OptimName.adamw, seed=seed, **common)
        cls = torch.optim.AdamW if cfg.name is OptimName.adamw else torch.optim.Adam
        return cls(groups, **common, fused=adam_fused(cfg, [p for g in groups for p in g["params"]]))

    if cfg.name is OptimName.sgd:
        if bf16_states and cfg.momentum > 0:
            return BF16StateSGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, seed=seed)
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **fused)
    raise ValueError(f"unknown optimizer {cfg.name}")


def adam_fused(cfg: OptimConfig, params: list[torch.Tensor]) -> Optional[bool]:
    """`optim.fused`, or when it is None: True for fp32 parameters on CPU, else torch's default.
    On CPU torch's default is its per-parameter loop (its foreach kernels are GPU-only), about
    a dozen passes over every tensor per step; the fused CPU kernel makes one and keeps no
    temporaries (same update up to fp32 rounding). On GPUs torch picks foreach itself. The
    kernel takes all parameters in one call, so they must be all plain tensors or all DTensors
    of one mesh (tensor parallelism without sequence parallelism leaves the norms plain)."""
    if cfg.fused is not None:
        return cfg.fused
    meshes = {p.device_mesh if isinstance(p, DTensor) else None for p in params}
    if params and len(meshes) == 1 and all(p.device.type == "cpu" and p.dtype is torch.float32 for p in params):
        return True
    return None
