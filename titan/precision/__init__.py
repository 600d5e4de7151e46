"""Numeric precision of training: float8 / MXFP8 linears, bf16 compute, and their checks.

The trainer builds one `Precision` per rank and uses it at three points:
    precision = build_precision(cfg, device_type, fsdp_enabled)
    precision.convert(model)           # on the meta model, before TP / AC / compile / FSDP
    (FSDP2's MixedPrecisionPolicy is built by titan.parallel from the same PrecisionConfig)
    with precision.autocast(): loss = ...   # forward + loss
    optimizer.step(); precision.after_optimizer_step(model)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ContextManager, Union

from torch import nn

from titan.config.schema import Float8Recipe, PrecisionConfig, TrainConfig
from titan.precision.float8 import (
    FLOAT8_RECIPES,
    convert_float8_linears,
    float8_post_optimizer_hook,
    uses_float8_all_gather,
)
from titan.precision.mixed import MixedPrecision, mixed_precision
from titan.precision.mx import convert_mx_linears
from titan.precision.validate import validate_precision

log = logging.getLogger("titan")

__all__ = [
    "Precision",
    "build_precision",
    "convert_float8",
    "float8_post_optimizer_hook",
    "mixed_precision",
    "MixedPrecision",
    "validate_precision",
]


def convert_float8(model: nn.Module, cfg: PrecisionConfig, device_type: str, fsdp_enabled: bool) -> list[str]:
    """Convert eligible linears (not `output`, dims >= float8_min_dim and divisible by 16, or 32
    for MX) to the configured low-precision recipe, in place. Returns the converted names.
    Fine on a meta-device model. Raises ConfigError for mxfp8 without a Blackwell GPU."""
    if cfg.float8 is Float8Recipe.none:
        return []
    if cfg.float8 in FLOAT8_RECIPES:
        names = convert_float8_linears(model, cfg, fsdp_enabled)
    else:
        names = convert_mx_linears(model, cfg, device_type)
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    log.info("precision: %s on %d of %d linear layers", cfg.float8.value, len(names), n_linear)
    return names


@dataclass
class Precision:
    cfg: PrecisionConfig
    device_type: str
    fsdp_enabled: bool
    mixed: MixedPrecision

    @property
    def float8_tensorwise_tp(self) -> bool:
        """TP should use torchao's Float8ColwiseParallel / Float8RowwiseParallel /
        PrepareFloat8ModuleInput (float8 all-gathers). Rowwise recipes use the plain styles."""
        return self.cfg.float8 is Float8Recipe.tensorwise

    @property
    def float8_all_gather(self) -> bool:
        return uses_float8_all_gather(self.cfg, self.fsdp_enabled)

    def convert(self, model: nn.Module) -> nn.Module:
        convert_float8(model, self.cfg, self.device_type, self.fsdp_enabled)
        return model

    def autocast(self) -> ContextManager:
        return self.mixed.autocast()

    def after_optimizer_step(self, model: nn.Module) -> None:
        if self.float8_all_gather:
            float8_post_optimizer_hook(model)


def build_precision(cfg: Union[TrainConfig, PrecisionConfig], device_type: str, fsdp_enabled: bool) -> Precision:
    pcfg = cfg.precision if isinstance(cfg, TrainConfig) else cfg
    return Precision(pcfg, device_type, fsdp_enabled, mixed_precision(pcfg, device_type, fsdp_enabled))
