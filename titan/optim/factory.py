"""Optimizer from the typed config: AdamW / Adam / SGD, fp32 or bf16 states."""

from __future__ import annotations

from typing import Iterable, Optional, Union

import torch
from torch import nn

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
        return cls(groups, **common, **fused)

    if cfg.name is OptimName.sgd:
        if bf16_states and cfg.momentum > 0:
            return BF16StateSGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, seed=seed)
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **fused)
    raise ValueError(f"unknown optimizer {cfg.name}")
