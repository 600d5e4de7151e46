"""Global gradient-norm clipping and small metric reductions.

The norm must be the one of the *whole* model's gradient, the same number one process would
compute, whatever the layout: DTensor gradients (FSDP / TP shards) are reduced over their
mesh by DTensor itself; parameters split over pipeline stages are combined over `pp_group`.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def _norm_power(grads: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    """sum |g|^p (or max |g| for inf) over `grads`, which all live on one mesh (or none).

    On CPU each gradient's norm accumulates in fp64: torch's fp32 CPU norm kernel sums lane by
    lane, which on a gradient with a few large rows (the output projection's: the batch's
    tokens) comes out 1e-5 to 5e-5 relative low, by an amount that depends on how the tensor
    is sharded. GPU kernels reduce in a tree, accurate to ~1e-7 in fp32 already."""
    if grads[0].device.type == "cpu":
        norms = [torch.linalg.vector_norm(g, norm_type, dtype=torch.float64) for g in grads]
        norm = torch.linalg.vector_norm(torch.stack(norms), norm_type)
    else:
        norm = torch.nn.utils.get_total_norm(grads, norm_type=norm_type)
    if isinstance(norm, DTensor):  # sharded: reduce over the mesh to the true value
        norm = norm.full_tensor()
    return norm if norm_type == float("inf") else norm**norm_type


@torch.no_grad()
def total_grad_norm(params: Iterable[torch.Tensor], norm_type: float = 2.0, pp_group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Norm of all gradients of `params` across every rank and mesh dim (fp32 scalar)."""
    norm_type = float(norm_type)
    by_mesh: dict = {}  # DTensors on different meshes (e.g. TP-only vs FSDP-only params) can't stack
    for p in params:
        if p.grad is not None:
            g = p.grad
            key = g.device_mesh if isinstance(g, DTensor) else None
            by_mesh.setdefault(key, []).append(g)
    device = next(iter(by_mesh.values()))[0].device if by_mesh else torch.device("cpu")
    parts = [_norm_power(gs, norm_type).float().to(device) for gs in by_mesh.values()]
    inf = norm_type == float("inf")
    total = torch.zeros((), device=device) if not parts else (torch.stack(parts).max() if inf else torch.stack(parts).sum())
    if pp_group is not None:
        dist.all_reduce(total, op=dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM, group=pp_group)
    return total if inf else total ** (1.0 / norm_type)


@torch.no_grad()
def clip_grad_norm_(
    params: Iterable[torch.Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    pp_group: Optional[dist.ProcessGroup] = None,
) -> torch.Tensor:
    """Scale gradients in place so their global norm is at most `max_norm` (<= 0: measure
    only). Returns the global norm before clipping, as a plain tensor."""
    params = [p for p in params if p.grad is not None]
    total = total_grad_norm(params, norm_type, pp_group)
    if max_norm > 0:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        # Scaling is elementwise, so each rank scales its local shards directly.
        local = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in params]
        if local:
            torch._foreach_mul_(local, coef.to(local[0].device))
    return total


def plain(value: torch.Tensor) -> torch.Tensor:
    """A detached plain tensor: a loss computed under `loss_parallel` is a replicated DTensor,
    which cannot be added to plain tensors (e.g. a running total)."""
    value = value.detach()
    return value.full_tensor() if isinstance(value, DTensor) else value


def all_reduce_sum(value: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Sum of `value` over `group` (a copy; the input is untouched). None: one rank."""
    out = plain(value).clone()
    if group is not None:
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def all_reduce_mean(value: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Mean of `value` over `group` (SUM then divide: gloo has no AVG for all ops)."""
    size = 1 if group is None else dist.get_world_size(group)
    return all_reduce_sum(value, group) / size
