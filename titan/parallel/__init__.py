"""Parallelism for titan: everything torch.distributed lives here, the model stays plain.

Order on one rank (after the process group exists):
  mesh = build_mesh(resolve_degrees(cfg.parallel, world), device_type)
  model = build_model(args)                      # meta device
  (float8 conversion)
  parallelize(model, mesh, cfg.parallel, cfg.precision, before_data_parallel=[AC, compile])
      = TP -> before_data_parallel callables -> FSDP / HSDP / DDP
  materialize_and_init(model, device, seed)      # same weights as one process
`Parallel` (from `build_parallel`) bundles these with the per-step helpers the trainer needs.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from titan.config.errors import ConfigError
from titan.config.schema import ParallelConfig, PrecisionConfig
from titan.parallel.context_parallel import apply_cp
from titan.parallel.fsdp import apply_ddp, apply_fsdp
from titan.parallel.grad import all_reduce_mean, all_reduce_sum, clip_grad_norm_, plain, total_grad_norm
from titan.parallel.init import materialize_and_init
from titan.parallel.mesh import DIMS, ParallelMesh, build_mesh, dim_size, dp_rank_and_world, group_of, resolve_degrees, validate_layout
from titan.parallel.tp import apply_tp, enable_async_tp, loss_parallel_context

ModelTransform = Callable[[nn.Module], Optional[nn.Module]]


def _degree(mesh, *dims: str) -> int:
    return math.prod(dim_size(mesh, d) for d in dims)


def parallelize(
    model: nn.Module,
    mesh,
    parallel_cfg: ParallelConfig,
    precision_cfg: PrecisionConfig,
    before_data_parallel: Sequence[ModelTransform] = (),
    cpu_offload: bool = False,
) -> nn.Module:
    """Apply TP, then `before_data_parallel` (activation checkpointing, compile: they must wrap
    the TP'd blocks and be wrapped by FSDP), then FSDP/HSDP (dp_shard x cp > 1) or DDP
    (dp_replicate > 1 only). `mesh` None: one process, only the transforms run.
    A transform may return a new module or None (changed in place)."""
    if _degree(mesh, "pp") > 1:
        raise ConfigError("parallel.pp", "pp > 1 is not wired into titan.parallel.parallelize yet")
    if _degree(mesh, "cp") > 1:  # attention over the sequence shards; FSDP then shards over dp x cp
        cp_mesh = mesh["cp"]
        apply_cp(model, cp_mesh.get_group(), cp_mesh.get_local_rank(), cp_mesh.size(), parallel_cfg.cp_mode.value)
    if _degree(mesh, "tp") > 1:
        apply_tp(model, mesh["tp"], parallel_cfg.sequence_parallel, parallel_cfg.loss_parallel, parallel_cfg.async_tp)
    for transform in before_data_parallel:
        model = transform(model) or model
    if _degree(mesh, "dp_shard", "cp") > 1:
        apply_fsdp(
            model,
            mesh.data_parallel,
            precision_cfg.param_dtype,
            precision_cfg.reduce_dtype,
            parallel_cfg.reshard_after_forward,
            cpu_offload,
        )
    elif _degree(mesh, "dp_replicate") > 1:
        apply_ddp(model, mesh.data_parallel, precision_cfg.param_dtype, precision_cfg.reduce_dtype)
    return model


class Parallel:
    """One rank's parallel layout and the calls the trainer makes through it."""

    def __init__(self, parallel_cfg: ParallelConfig, precision_cfg: PrecisionConfig, world_size: int, device_type: str):
        self.cfg, self.precision_cfg = parallel_cfg, precision_cfg
        self.degrees = resolve_degrees(parallel_cfg, world_size)
        self.mesh = build_mesh(self.degrees, device_type)
        self.dp_rank, self.dp_world = dp_rank_and_world(self.mesh)
        d = self.degrees
        self.fsdp_enabled = d["dp_shard"] * d["cp"] > 1
        self.ddp_enabled = not self.fsdp_enabled and d["dp_replicate"] > 1
        self.tp_enabled = d["tp"] > 1
        self.loss_parallel = self.tp_enabled and parallel_cfg.loss_parallel
        # Ranks whose data differ (dp) or whose sequence pieces differ (cp): gradients are
        # averaged over them, so each one's loss is the mean over its own 1/loss_divisor of
        # the global batch's tokens.
        self.loss_divisor = d["dp_replicate"] * d["dp_shard"] * d["cp"]
        self.dp_cp_group = group_of(self.mesh, "dp_cp")
        self.device = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
        self.cp_size = d["cp"]
        self.cp_rank = self.mesh["cp"].get_local_rank() if self.cp_size > 1 else 0
        self.pp_group = group_of(self.mesh, "pp")

    def apply(self, model: nn.Module, precision: Any = None, before_data_parallel: Sequence[ModelTransform] = ()) -> nn.Module:
        """See `parallelize`. `precision` is accepted for the trainer's call but unused: FSDP's
        dtypes come from the PrecisionConfig given at construction."""
        return parallelize(model, self.mesh, self.cfg, self.precision_cfg, before_data_parallel)

    def materialize_and_init(self, model: nn.Module, device: torch.device, seed: int) -> None:
        materialize_and_init(model, device, seed)

    def loss_context(self):
        """Wrap the loss computation *and* backward in this."""
        return loss_parallel_context(self.loss_parallel)

    def clip_grad_norm(self, params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
        return clip_grad_norm_(params, max_norm, pp_group=self.pp_group)

    def plain_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Detached plain tensor of a loss (under loss_parallel the loss is a DTensor)."""
        return plain(loss)

    def mean_over_dp(self, value: torch.Tensor) -> float:
        """Mean of a per-rank metric over the data (+context) parallel ranks, as a float."""
        return float(all_reduce_mean(value, self.dp_cp_group))


def build_parallel(cfg, env) -> Parallel:
    """From the TrainConfig and the rank's RankEnv (process group already initialised)."""
    return Parallel(cfg.parallel, cfg.precision, env.world_size, env.device.type)


__all__ = [
    "DIMS",
    "Parallel",
    "ParallelMesh",
    "all_reduce_mean",
    "all_reduce_sum",
    "apply_ddp",
    "apply_fsdp",
    "apply_tp",
    "build_mesh",
    "build_parallel",
    "clip_grad_norm_",
    "dp_rank_and_world",
    "enable_async_tp",
    "group_of",
    "loss_parallel_context",
    "materialize_and_init",
    "parallelize",
    "plain",
    "resolve_degrees",
    "total_grad_norm",
    "validate_layout",
]
