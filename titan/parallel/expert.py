"""Expert parallelism: each rank of an `ep` group owns num_experts / ep of every MoE layer's
experts, and tokens travel to the rank owning their expert and back (all-to-all).

`parallel.ep` borrows from dp_shard (as torchtitan does): dp_shard = (dp_shard / ep) x ep, ep
innermost, so an ep group is ep data-parallel ranks reading different batches. Per MoE layer:

  router (local) -> tokens sorted by expert -> all_to_all_single (uneven splits) to the owners
  -> regroup by local expert -> grouped GEMM on the local experts -> back in arrival order
  -> all_to_all_single back -> weighted combine (local)

Expert weights are DTensors sharded on the expert dim over the ep mesh, so checkpoints hold
whole tensors and resume under another ep degree. Their gradients already sum the
contributions of the whole ep group (through the all-to-all's backward). Over the other
data-parallel ranks, those holding the same experts (dp_shard / ep, "dp_shard_mod_ep", and
dp_replicate), they are FSDP-sharded on their own mesh when dp_shard / ep > 1 (each rank keeps
1/(dp_shard/ep) of its ep shard; gradients reduce-scattered there and divided by the whole
data-parallel degree, matching FSDP's mean for the rest). With dp_shard = ep they stay out of
FSDP and `reduce_expert_grads` all-reduces them over dp_replicate and divides alike.

Under tensor parallelism every tp rank routes the whole (gathered) sequence of its batch, so
ep groups are made of ranks with the same tp index and the experts are not split by tp.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from titan.config.errors import ConfigError
from titan.models.moe import MoE, moe_layers


def validate_ep(cfg, degrees: dict[str, int]) -> None:
    """ep must split dp_shard and the experts; cp is refused with ep (not wired yet)."""
    ep = cfg.parallel.ep
    if ep == 1:
        return
    if ep < 1:
        raise ConfigError("parallel.ep", f"{ep} is not a degree; use a positive integer")
    if degrees["dp_shard"] % ep:
        raise ConfigError("parallel.ep", f"ep={ep} borrows from dp_shard={degrees['dp_shard']} and must divide it; raise dp_shard or lower ep")
    experts = cfg.model.moe.num_experts
    if experts <= 0 or experts % ep:
        raise ConfigError("parallel.ep", f"ep={ep} must divide model.moe.num_experts={experts} (a MoE model is needed)")
    if degrees["cp"] > 1:
        raise ConfigError("parallel.cp", "expert parallelism does not compose with cp > 1 yet; set parallel.cp=1")


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; its backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


class ExpertDispatch:
    """Forward hooks on one `GroupedExperts`: the pre-hook sends its (x sorted by expert,
    counts per expert) to the owners and hands the local experts their rows; the post-hook
    brings the results back in the original order."""

    def __init__(self, group, num_experts: int):
        self.group = group
        self.ep = dist.get_world_size(group)
        self.local = num_experts // self.ep
        self.saved: list = []

    def dispatch(self, module: nn.Module, inputs):
        x, counts = inputs
        # recv[s, e]: rows source rank s sends for my local expert e.
        recv = torch.empty_like(counts)
        dist.all_to_all_single(recv, counts, group=self.group)
        recv = recv.view(self.ep, self.local)
        in_splits = counts.view(self.ep, self.local).sum(1).tolist()
        out_splits = recv.sum(1).tolist()
        rows = _AllToAll.apply(x, out_splits, in_splits, self.group)
        # Arrived ordered by (source, expert): regroup by (expert, source) for the grouped GEMM.
        sizes = recv.flatten().tolist()
        starts = [sum(sizes[:c]) for c in range(len(sizes))]
        by_expert = [s * self.local + e for e in range(self.local) for s in range(self.ep)]
        perm = torch.cat([torch.arange(starts[c], starts[c] + sizes[c]) for c in by_expert]).to(x.device)
        self.saved.append((perm, in_splits, out_splits))
        return rows[perm], recv.sum(0)

    def combine(self, module: nn.Module, inputs, out: torch.Tensor) -> torch.Tensor:
        perm, in_splits, out_splits = self.saved.pop()
        arrived = torch.empty_like(out).index_copy(0, perm, out) if out.shape[0] else out
        return _AllToAll.apply(arrived, in_splits, out_splits, self.group)


def _shard_experts(experts: nn.Module, ep_mesh) -> None:
    rank, size = ep_mesh.get_local_rank(), ep_mesh.size()
    for name, param in list(experts.named_parameters(recurse=False)):
        local = param.chunk(size, dim=0)[rank]
        sharded = DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False, shape=param.shape, stride=param.stride())
        setattr(experts, name, nn.Parameter(sharded, requires_grad=param.requires_grad))


def apply_ep(model: nn.Module, ep_mesh) -> None:
    """Shard every MoE layer's experts over `ep_mesh` and route tokens through all-to-all."""
    group = ep_mesh.get_group()
    for layer in moe_layers(model):
        _shard_experts(layer.experts, ep_mesh)
        hooks = ExpertDispatch(group, layer.args.num_experts)
        layer.experts.register_forward_pre_hook(hooks.dispatch)
        layer.experts.register_forward_hook(hooks.combine)


def expert_params(model: nn.Module) -> set[nn.Parameter]:
    return {p for layer in moe_layers(model) for p in layer.experts.parameters()}


def count_over(model: nn.Module, group) -> None:
    """Router loads (aux loss, bias update, metrics) counted over all data-parallel ranks."""
    if group is None:
        return
    for layer in moe_layers(model):
        layer.reduce_counts = lambda counts, g=group: _summed(counts, g)


def _summed(counts: torch.Tensor, group) -> torch.Tensor:
    out = counts.detach().clone()
    dist.all_reduce(out, group=group)
    return out


@torch.no_grad()
def reduce_expert_grads(model: nn.Module, replica_group, dp_degree: int) -> None:
    """Expert gradients: sum over the ranks holding the same experts, then / dp (a mean over
    the data-parallel ranks, like FSDP's for every other parameter)."""
    # In module order: every rank must issue the same all-reduces in the same order (a set's
    # order follows object ids, which differ between processes, and would sum w1 with w3).
    for p in (p for experts in expert_modules(model) for p in experts.parameters()):
        if p.grad is None:
            continue
        local = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        if replica_group is not None:
            dist.all_reduce(local, group=replica_group)
        local.div_(dp_degree)


@dataclass
class ExpertMeshes:
    ep: object  # the ranks that split the experts (all-to-all group)
    replicas: Optional[object]  # flattened (dp_replicate, dp_shard_mod_ep): ranks holding the same experts; None if one
    fsdp: Optional[object]  # what expert weights are FSDP-sharded over (dp_shard_mod_ep, HSDP with dp_replicate); None: not sharded


def ep_meshes(degrees: dict[str, int], ep: int, device_type: str) -> ExpertMeshes:
    """The world with dp_shard split into (dp_shard / ep, ep), ranks laid out as in
    titan.parallel.mesh, and the meshes cut from it (one root, so FSDP composes with EP)."""
    from torch.distributed.device_mesh import init_device_mesh

    d = degrees
    shape = (d["pp"], d["dp_replicate"], d["dp_shard"] // ep, ep, d["cp"], d["tp"])
    names = ("pp", "dp_replicate", "dp_shard_mod_ep", "ep", "cp", "tp")
    world = init_device_mesh(device_type, shape, mesh_dim_names=names)
    replicas, fsdp = None, None
    if d["dp_replicate"] * (d["dp_shard"] // ep) > 1:
        replicas = world["dp_replicate", "dp_shard_mod_ep"]._flatten("ep_replicas")
    if d["dp_shard"] // ep > 1:
        fsdp = world["dp_replicate", "dp_shard_mod_ep"] if d["dp_replicate"] > 1 else world["dp_shard_mod_ep"]
    return ExpertMeshes(world["ep"], replicas, fsdp)


def expert_modules(model: nn.Module) -> list[nn.Module]:
    return [layer.experts for layer in moe_layers(model)]


__all__ = ["ExpertMeshes", "MoE", "apply_ep", "count_over", "ep_meshes", "expert_modules", "expert_params", "reduce_expert_grads", "validate_ep"]
