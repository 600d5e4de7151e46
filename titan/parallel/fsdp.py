"""Data parallelism: FSDP2 (`fully_shard`), HSDP (2-D mesh: replicate x shard) and DDP.

DDP is FSDP2's replicate-only variant (`replicate_with_fsdp`): same hooks, same gradient
reduction code, same DTensor parameters as FSDP, so the init, grad-norm and checkpoint code
has one case fewer. Gradients are *averaged* over the data-parallel ranks: each rank's loss
must be its own tokens' mean (see `Parallel.loss_divisor`).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

from titan.config.schema import DType, ReshardAfterForward


def torch_dtype(dtype: Union[DType, torch.dtype, str]) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    return getattr(torch, getattr(dtype, "value", dtype))


def _mp_policy(param_dtype, reduce_dtype) -> MixedPrecisionPolicy:
    return MixedPrecisionPolicy(param_dtype=torch_dtype(param_dtype), reduce_dtype=torch_dtype(reduce_dtype))


def _sum_reductions_on_gloo(model: nn.Module, mesh) -> None:
    """gloo lacks the AVG / PREMUL_SUM reduce ops FSDP picks for NCCL: reduce with SUM and
    divide afterwards (same result)."""
    if mesh.device_type != "cpu":
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)


def apply_fsdp(
    model: nn.Module,
    dp_mesh,
    param_dtype=torch.float32,
    reduce_dtype=torch.float32,
    reshard_after_forward: ReshardAfterForward = ReshardAfterForward.default,
    cpu_offload: bool = False,
    ignored_params: Optional[set] = None,
    own_mesh: Sequence[tuple[nn.Module, object, float]] = (),
) -> nn.Module:
    """Shard `model` over `dp_mesh` (1-D: FSDP; 2-D (replicate, shard): HSDP), in place.

    Groups, each all-gathered / reduce-scattered as one collective: the embedding, each
    block, the final norm with the output projection, then the root (whatever is left, e.g.
    a tied embedding). `default` resharding keeps the last groups gathered after forward
    because backward needs them first; pipeline stages should pass `always`.
    `own_mesh`: (module, mesh, gradient divide factor) sharded first, on a mesh of their own
    (expert-parallel experts over the ranks holding the same experts); the groups above leave
    their parameters alone."""
    kwargs = dict(mesh=dp_mesh, mp_policy=_mp_policy(param_dtype, reduce_dtype))
    if ignored_params:  # e.g. expert-parallel experts, sharded and reduced on their own mesh
        kwargs["ignored_params"] = ignored_params
    if cpu_offload:
        # Pinned memory needs an accelerator; on a CPU-only run it raises.
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=dp_mesh.device_type == "cuda")
    policy = ReshardAfterForward(reshard_after_forward)
    never = policy is ReshardAfterForward.never

    def reshard(last: bool) -> bool:
        return not never and not (policy is ReshardAfterForward.default and last)

    for module, mesh, divide_factor in own_mesh:
        fully_shard(module, reshard_after_forward=reshard(last=False), **{**kwargs, "mesh": mesh})
        module.set_gradient_divide_factor(divide_factor)
    tied = getattr(model.args, "tie_embeddings", False)
    if model.tok_embeddings is not None and not tied:
        fully_shard(model.tok_embeddings, reshard_after_forward=reshard(last=False), **kwargs)
    blocks = list(model.layers.values())
    tail = [m for m in (model.norm, model.output) if m is not None] if not tied else []
    for i, block in enumerate(blocks):
        fully_shard(block, reshard_after_forward=reshard(last=i == len(blocks) - 1 and not tail), **kwargs)
    if tail:
        fully_shard(tail, reshard_after_forward=reshard(last=True), **kwargs)
    fully_shard(model, reshard_after_forward=reshard(last=True), **kwargs)
    _sum_reductions_on_gloo(model, dp_mesh)
    return model


def apply_ddp(model: nn.Module, dp_mesh, param_dtype=torch.float32, reduce_dtype=torch.float32) -> nn.Module:
    """Replicate `model` over the 1-D `dp_mesh`, in place: every rank keeps full parameters,
    gradients are all-reduced per block (so reduction overlaps the rest of backward)."""
    from torch.distributed._composable.replicate_with_fsdp import replicate

    kwargs = dict(mesh=dp_mesh, mp_policy=_mp_policy(param_dtype, reduce_dtype))
    for block in model.layers.values():
        replicate(block, **kwargs)
    replicate(model, **kwargs)
    _sum_reductions_on_gloo(model, dp_mesh)
    return model
