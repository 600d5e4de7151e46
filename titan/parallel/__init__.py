"""Parallelism for titan: everything torch.distributed lives here, the model stays plain.

Order on one rank (after the process group exists):
  mesh = build_mesh(resolve_degrees(cfg.parallel, world), device_type)
  model = build_model(args)                      # meta device
  (float8 conversion)
  parallelize(model, mesh, cfg.parallel, cfg.precision, before_data_parallel=[AC, compile])
      = TP -> before_data_parallel callables -> FSDP / HSDP / DDP
  materialize_and_init(model, device, seed)      # same weights as one process
With pp > 1 the model is first cut into pipeline stages (`titan.parallel.pipeline`) and each
stage goes through `parallelize` on its own (`Parallel.build_pipeline`).
`Parallel` (from `build_parallel`) bundles these with the per-step helpers the trainer needs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
from torch import nn

from titan.config.errors import ConfigError
from titan.config.schema import ParallelConfig, PrecisionConfig, ReshardAfterForward
from titan.parallel.context_parallel import apply_cp
from titan.parallel.expert import ExpertMeshes, apply_ep, count_over, ep_meshes, expert_modules, expert_params, reduce_expert_grads
from titan.parallel.fsdp import apply_ddp, apply_fsdp
from titan.parallel.grad import add_replicated, all_reduce_mean, all_reduce_sum, clip_grad_norm_, plain, total_grad_norm
from titan.parallel.init import materialize_and_init
from titan.parallel.pipeline import Pipeline, build_pipeline, split_stages
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
    experts: Optional[ExpertMeshes] = None,
) -> nn.Module:
    """Apply TP, then `before_data_parallel` (activation checkpointing, compile: they must wrap
    the TP'd blocks and be wrapped by FSDP), then FSDP/HSDP (dp_shard x cp > 1) or DDP
    (dp_replicate > 1 only). `mesh` None: one process, only the transforms run.
    A transform may return a new module or None (changed in place).
    With pp > 1, `model` is one pipeline stage (see `Parallel.build_pipeline`); FSDP's
    `default` resharding then keeps the stage's parameters gathered from forward to backward:
    every microbatch would otherwise all-gather them again, and a stage holds 1/pp of them."""
    if _degree(mesh, "pp") > 1:
        if getattr(model, "tok_embeddings", None) is not None and getattr(model, "output", None) is not None:
            raise ConfigError("parallel.pp", "pp > 1: build the model through Parallel.build_pipeline, which parallelises each stage")
        if parallel_cfg.reshard_after_forward is ReshardAfterForward.default:
            parallel_cfg = dataclasses.replace(parallel_cfg, reshard_after_forward=ReshardAfterForward.never)
    if _degree(mesh, "cp") > 1:  # attention over the sequence shards; FSDP then shards over dp x cp
        cp_mesh = mesh["cp"]
        apply_cp(model, cp_mesh.get_group(), cp_mesh.get_local_rank(), cp_mesh.size(), parallel_cfg.cp_mode.value)
    if experts is not None:  # experts sharded over ep, tokens routed by all-to-all
        apply_ep(model, experts.ep)
    if _degree(mesh, "tp") > 1:
        apply_tp(model, mesh["tp"], parallel_cfg.sequence_parallel, parallel_cfg.loss_parallel, parallel_cfg.async_tp)
    for transform in before_data_parallel:
        model = transform(model) or model
    if _degree(mesh, "dp_shard", "cp") > 1:
        # Experts: FSDP over the ranks holding the same ones (gradients divided by the whole
        # data-parallel degree, as FSDP does for the rest), or outside FSDP when that is one rank.
        own_mesh, ignored = (), None
        if experts is not None and experts.fsdp is not None:
            dp_degree = _degree(mesh, "dp_replicate", "dp_shard", "cp")
            own_mesh = [(module, experts.fsdp, float(dp_degree)) for module in expert_modules(model)]
        elif experts is not None:
            ignored = expert_params(model)
        apply_fsdp(
            model,
            mesh.data_parallel,
            precision_cfg.param_dtype,
            precision_cfg.reduce_dtype,
            parallel_cfg.reshard_after_forward,
            parallel_cfg.cpu_offload,
            ignored_params=ignored,
            own_mesh=own_mesh,
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
        self.pp_enabled = d["pp"] > 1
        self.pp_group = group_of(self.mesh, "pp")
        self.pp_rank = self.mesh["pp"].get_local_rank() if self.pp_enabled else 0
        self.experts: Optional[ExpertMeshes] = None
        self._models: list = []
        if parallel_cfg.ep > 1:
            self.experts = ep_meshes(d, parallel_cfg.ep, device_type)

    def apply(self, model: nn.Module, before_data_parallel: Sequence[ModelTransform] = ()) -> nn.Module:
        """See `parallelize`. FSDP's dtypes come from the PrecisionConfig given at construction."""
        count_over(model, self.dp_cp_group)  # MoE loads over the whole batch, whatever the layout
        self._models.append(model)
        return parallelize(model, self.mesh, self.cfg, self.precision_cfg, before_data_parallel, experts=self.experts)

    def build_pipeline(
        self,
        model: Union[nn.Module, Callable[[], nn.Module]],
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        micro_batch_size: int,
        seq_len: int,
        before_data_parallel: Sequence[ModelTransform] = (),
        context: Optional[Callable] = None,
    ) -> Pipeline:
        """This rank's pipeline stages, each parallelised like a whole model (`apply`), and the
        configured schedule. `loss_fn` is the trainer's (token-summed CE / tokens_per_rank);
        `micro_batch_size` the sequences per `Pipeline.step` (training.micro_batch_size);
        `seq_len` the full sequence length (under cp, feed the pipeline `cp_inputs`' local
        slices: the positions are passed to the stages here); `context` wraps each schedule
        step (loss parallel, autocast; default `loss_context`). Materialise each of
        `.model_parts` afterwards."""
        if not self.pp_enabled:
            raise ConfigError("parallel.pp", "build_pipeline needs pp > 1")
        hidden_dtype = torch.float32
        if self.fsdp_enabled:  # FSDP casts parameters, so the residual stream is in param_dtype
            from titan.parallel.fsdp import torch_dtype

            hidden_dtype = torch_dtype(self.precision_cfg.param_dtype)
        positions = None
        if self.cp_size > 1:  # every microbatch holds the same load-balanced slice of positions
            from titan.parallel.context_parallel import cp_positions

            positions = cp_positions(seq_len, self.cp_rank, self.cp_size, device=self.device)
        return build_pipeline(
            model,
            self.mesh,
            self.cfg,
            loss_fn,
            micro_batch_size,
            seq_len // self.cp_size,
            self.device,
            lambda stage: self.apply(stage, before_data_parallel=before_data_parallel),
            hidden_dtype=hidden_dtype,
            loss_context=context or self.loss_context,
            positions=positions,
        )

    def materialize_and_init(self, model: nn.Module, device: torch.device, seed: int) -> None:
        # CPU offload: FSDP2 expects the sharded parameters in CPU memory (it copies each
        # group to the device for its forward / backward); buffers such as RoPE stay on it.
        param_device = torch.device("cpu") if self.cfg.cpu_offload else device
        materialize_and_init(model, param_device, seed, buffer_device=device)

    def loss_context(self):
        """Wrap the loss computation *and* backward in this."""
        return loss_parallel_context(self.loss_parallel)

    def clip_grad_norm(self, params: Iterable[Union[torch.Tensor, nn.Module]], max_norm: float) -> torch.Tensor:
        """Clip to the whole model's gradient norm. `params`: parameters, or modules (e.g. a
        pipeline's `model_parts`) whose parameters are taken; under pp the norm combines
        every stage's."""
        flat = [q for p in params for q in (p.parameters() if isinstance(p, nn.Module) else (p,))]
        e = self.experts
        if e is not None and e.fsdp is None:  # experts outside FSDP: mean their gradients here
            for model in self._models:
                reduce_expert_grads(model, e.replicas.get_group() if e.replicas is not None else None, self.loss_divisor)
        return clip_grad_norm_(flat, max_norm, pp_group=self.pp_group)

    def plain_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Detached plain tensor of a loss (under loss_parallel the loss is a DTensor)."""
        return plain(loss)

    def mean_over_dp(self, value: Optional[torch.Tensor]) -> float:
        """Mean of a per-rank metric over the data (+context) parallel ranks, as a float, the
        same on every rank. Under pp, ranks without the value pass None (a pipeline's loss
        lives on the last stage only): each pp group first takes the mean of the values its
        ranks hold, so the result is the global loss on every rank, rank 0 included."""
        if self.pp_enabled:
            value = self._mean_over_pp_holders(value)
        return float(all_reduce_mean(value, self.dp_cp_group))

    def _mean_over_pp_holders(self, value: Optional[torch.Tensor]) -> torch.Tensor:
        both = torch.zeros(2, device=self.device)
        if value is not None:
            both[0], both[1] = plain(value).float().to(self.device), 1.0
        torch.distributed.all_reduce(both, group=self.pp_group)
        if both[1] == 0:
            raise RuntimeError("mean_over_dp: no pipeline rank held a value")
        return both[0] / both[1]


def build_parallel(cfg, env) -> Parallel:
    """From the TrainConfig and the rank's RankEnv (process group already initialised)."""
    return Parallel(cfg.parallel, cfg.precision, env.world_size, env.device.type)


__all__ = [
    "DIMS",
    "add_replicated",
    "Parallel",
    "Pipeline",
    "ParallelMesh",
    "all_reduce_mean",
    "all_reduce_sum",
    "apply_ddp",
    "apply_fsdp",
    "apply_tp",
    "build_mesh",
    "build_parallel",
    "build_pipeline",
    "clip_grad_norm_",
    "dp_rank_and_world",
    "enable_async_tp",
    "group_of",
    "loss_parallel_context",
    "materialize_and_init",
    "parallelize",
    "plain",
    "resolve_degrees",
    "split_stages",
    "total_grad_norm",
    "validate_layout",
]
