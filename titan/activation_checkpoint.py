"""Activation checkpointing of transformer blocks: trade recomputation for activation memory.

Blocks are wrapped with torch's `checkpoint_wrapper` (non-reentrant) and put back in
`model.layers` under the same key. The wrapper adds `_checkpoint_wrapped_module.` to
`named_parameters()` names but strips it in `state_dict()` (and DCP's `get_state_dict` strips
it too), so checkpoints keep the plain names, e.g. `layers.0.attention.wq.weight`.
Apply after TP (its plans name submodules without the prefix) and before compile and FSDP.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from titan.config.errors import ConfigError
from titan.config.schema import ACMode, ActivationCheckpointConfig


def _ops(*names: str) -> set:
    """aten overloads that exist in this build (the SDPA kernels differ per device and version)."""
    return {getattr(torch.ops.aten, n).default for n in names if hasattr(torch.ops.aten, n)}


# Outputs of the compute-heavy ops are kept; everything between them (norms, activations,
# RoPE, casts) is cheap to recompute in backward.
SAVE_OPS = _ops(
    "mm",
    "addmm",
    "bmm",
    "_scaled_mm",  # float8 linears
    "_scaled_dot_product_flash_attention",  # CUDA
    "_scaled_dot_product_efficient_attention",  # CUDA
    "_scaled_dot_product_cudnn_attention",  # CUDA
    "_scaled_dot_product_flash_attention_for_cpu",  # CPU
)


def _save_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_op_contexts():
    return create_selective_checkpoint_contexts(_save_matmuls)


def _wrap(block: nn.Module, mode: ACMode) -> nn.Module:
    # No RNG state is saved for the recompute: the models have no dropout.
    if mode is ACMode.selective_op:
        return checkpoint_wrapper(block, preserve_rng_state=False, context_fn=_selective_op_contexts)
    return checkpoint_wrapper(block, preserve_rng_state=False)


def apply_activation_checkpointing(model: nn.Module, cfg: ActivationCheckpointConfig) -> nn.Module:
    """In place on `model.layers`; returns the model. `selective_layer` wraps the blocks whose
    index is a multiple of `every` (index from the key, so pipeline stages agree)."""
    if cfg.mode is ACMode.none:
        return model
    if cfg.mode is ACMode.selective_layer and cfg.every < 1:
        raise ConfigError("activation_checkpoint.every", f"must be >= 1, got {cfg.every}")
    for name, block in list(model.layers.items()):
        if cfg.mode is ACMode.selective_layer and int(name) % cfg.every != 0:
            continue
        model.layers[name] = _wrap(block, cfg.mode)
    return model
