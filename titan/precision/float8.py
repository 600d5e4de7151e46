"""Float8 training for nn.Linear with torchao: tensorwise, rowwise and rowwise_with_gw_hp.

Float8Linear keeps its weight in high precision and casts weight, input and grad_output to
float8 around each `_scaled_mm` (which has a CPU kernel: numerics match GPU runs, speed does not).
"""

from __future__ import annotations

import dataclasses
import logging
import sys

from torch import nn

from titan.config.schema import Float8Recipe, PrecisionConfig
from titan.precision._torchao import quiet_torchao_import
from titan.precision.filters import FLOAT8_MULTIPLE, linear_filter

log = logging.getLogger("titan")

FLOAT8_RECIPES = (Float8Recipe.tensorwise, Float8Recipe.rowwise, Float8Recipe.rowwise_with_gw_hp)


def uses_float8_all_gather(cfg: PrecisionConfig, fsdp_enabled: bool) -> bool:
    """FSDP2 all-gathers float8 weights (half the bytes of bf16) only for tensorwise scaling:
    torchao has no float8 all-gather for per-row scales."""
    return cfg.float8 is Float8Recipe.tensorwise and fsdp_enabled and cfg.fsdp_float8_all_gather


def convert_float8_linears(model: nn.Module, cfg: PrecisionConfig, fsdp_enabled: bool) -> list[str]:
    """Swap eligible nn.Linear layers for torchao Float8Linear in place; returns their names.

    Works on a meta-device model: Float8Linear keeps the original (meta) weight, so `to_empty`
    and `init_weights` afterwards materialise it as usual.
    """
    with quiet_torchao_import():
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    ao_cfg = Float8LinearConfig.from_recipe_name(cfg.float8.value)
    if uses_float8_all_gather(cfg, fsdp_enabled):
        ao_cfg = dataclasses.replace(ao_cfg, enable_fsdp_float8_all_gather=True)
    elif cfg.float8 is not Float8Recipe.tensorwise and fsdp_enabled and cfg.fsdp_float8_all_gather:
        # Documented as tensorwise-only in the schema; ignoring it keeps the default usable.
        log.info("precision: fsdp_float8_all_gather ignored for %s (tensorwise only)", cfg.float8.value)

    keep = linear_filter(cfg.float8_min_dim, FLOAT8_MULTIPLE)
    names = [fqn for fqn, m in model.named_modules() if keep(m, fqn)]
    convert_to_float8_training(model, module_filter_fn=keep, config=ao_cfg)
    return names


def float8_post_optimizer_hook(model: nn.Module) -> None:
    """After optimizer.step with float8 all-gather: compute every float8 weight's scale in one
    all-reduce instead of one per weight at the next all-gather. No-op for other models."""
    fsdp_utils = sys.modules.get("torchao.float8.fsdp_utils")
    if fsdp_utils is None:  # torchao float8 never loaded: nothing can need it
        return
    float8_weight = fsdp_utils.WeightWithDynamicFloat8CastTensor
    if any(isinstance(getattr(p, "_local_tensor", None), float8_weight) for p in model.parameters()):
        fsdp_utils.precompute_float8_dynamic_scale_for_fsdp(model)
