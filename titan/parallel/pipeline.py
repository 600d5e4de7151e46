"""Pipeline parallelism: cut the model into stages over the `pp` mesh dim and run them with a
`torch.distributed.pipelining` schedule.

A stage is the Llama3 itself with the parts it does not own set to None (embedding on the
first stage only, final norm + output on the last, a slice of `layers`). Layers keep their
global keys, so every stage's parameter names are the full model's: checkpoints written under
one pp degree load under another, and `materialize_and_init` gives each stage exactly the
full model's weights.

Stages are placed on pp ranks in "loop" order (stage s on rank s % pp) or, for the V-shaped
schedules, in "v" order (rank r holds stages r and 2*pp-1-r, so rank 0 holds the first and
the last stage).

One `Pipeline.step` runs one trainer micro-batch (training.micro_batch_size sequences), cut
into `pp_microbatches` pipeline microbatches (-1: one per stage); gradient accumulation, if
any, calls it once per micro-batch, as the non-PP trainer calls forward/backward.

Loss scaling: the trainer's loss is the token-*summed* CE divided by this rank's token count
for the whole step, so the microbatch losses add up to the non-PP loss and their gradients
add up to the non-PP gradient. Schedules are therefore built with `scale_grads=False` (torch's
default divides every gradient by the number of microbatches, which is right only for a
per-microbatch *mean* loss).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from titan.config.errors import ConfigError
from titan.config.schema import ParallelConfig, PipelineSchedule

S = PipelineSchedule
SINGLE_STAGE = {S.GPipe, S.OneFOneB}  # one stage per rank
V_SHAPED = {S.ZBVZeroBubble, S.DualPipeV}  # exactly two stages per rank, "v" placement


def _schedule_class(name: PipelineSchedule):
    from torch.distributed import pipelining as pl

    return {
        S.GPipe: pl.ScheduleGPipe,
        S.OneFOneB: pl.Schedule1F1B,
        S.Interleaved1F1B: pl.ScheduleInterleaved1F1B,
        S.LoopedBFS: pl.ScheduleLoopedBFS,
        S.InterleavedZeroBubble: pl.ScheduleInterleavedZeroBubble,
        S.ZBVZeroBubble: pl.ScheduleZBVZeroBubble,
        S.DualPipeV: pl.ScheduleDualPipeV,
    }[PipelineSchedule(name)]


# ---------------------------------------------------------------------------------------------
# Pure planning: stage counts, layer split, placement, microbatches (no process group)
# ---------------------------------------------------------------------------------------------
def stages_per_rank(schedule: PipelineSchedule, virtual_stages: int) -> int:
    """Stages each pp rank holds under `schedule` (2 for the V schedules, as the planner
    assumes, whether pp_virtual_stages says 1 or 2); raises ConfigError for a mismatch."""
    schedule = PipelineSchedule(schedule)
    if virtual_stages < 1:
        raise ConfigError("parallel.pp_virtual_stages", f"{virtual_stages} is not a stage count; use 1 or more")
    if schedule in SINGLE_STAGE and virtual_stages != 1:
        raise ConfigError(
            "parallel.pp_virtual_stages",
            f"{schedule.value} runs one stage per rank, got {virtual_stages}; set it to 1 or pick a "
            "multi-stage schedule (Interleaved1F1B, LoopedBFS, InterleavedZeroBubble)",
        )
    if schedule in V_SHAPED:  # always two stages per rank; the default 1 is taken to mean that
        if virtual_stages not in (1, 2):
            raise ConfigError(
                "parallel.pp_virtual_stages", f"{schedule.value} runs exactly 2 stages per rank (V shape), got {virtual_stages}; set it to 2"
            )
        return 2
    return virtual_stages


def split_stages(n_layers: int, pp: int, virtual_stages: int = 1, layers_per_stage: Optional[list[int]] = None) -> list[list[int]]:
    """Layer indices of each of the pp x virtual_stages stages, in model order.

    Even split by default. When it does not divide, the spare layers go to the middle stages
    first, then the first stage, never the last: the last stage already computes the output
    projection and the loss (the heaviest single matmul for a large vocabulary)."""
    n_stages = pp * virtual_stages
    if layers_per_stage is not None:
        counts = list(layers_per_stage)
        if len(counts) != n_stages:
            raise ConfigError(
                "parallel.pp_layers_per_stage",
                f"{len(counts)} entries for {n_stages} stages (pp={pp} x pp_virtual_stages={virtual_stages}); give one per stage",
            )
        if any(c < 0 for c in counts) or sum(counts) != n_layers:
            raise ConfigError(
                "parallel.pp_layers_per_stage", f"{counts} must be non-negative and sum to model.n_layers={n_layers} (sums to {sum(counts)})"
            )
    else:
        if n_layers < n_stages:
            raise ConfigError(
                "parallel.pp",
                f"{n_stages} stages (pp={pp} x pp_virtual_stages={virtual_stages}) need at least that many layers; "
                f"the model has {n_layers}",
            )
        base, spare = divmod(n_layers, n_stages)
        counts = [base] * n_stages
        for s in (list(range(1, n_stages - 1)) + [0])[:spare]:
            counts[s] += 1
    starts = [sum(counts[:s]) for s in range(n_stages)]
    return [list(range(start, start + c)) for start, c in zip(starts, counts)]


def stage_to_rank(stage: int, pp: int, v_shaped: bool) -> int:
    """pp rank holding `stage`: loop order, or V order (r holds r and 2*pp-1-r)."""
    if v_shaped:
        return stage if stage < pp else 2 * pp - 1 - stage
    return stage % pp


def rank_stages(pp_rank: int, pp: int, n_stages: int, v_shaped: bool) -> list[int]:
    """Stages held by `pp_rank`, in model order."""
    return [s for s in range(n_stages) if stage_to_rank(s, pp, v_shaped) == pp_rank]


def resolve_microbatches(parallel_cfg: ParallelConfig, micro_batch_size: int, pp: Optional[int] = None) -> tuple[int, int]:
    """(n_microbatches, rows per pipeline microbatch) for one `Pipeline.step` call, which takes
    one trainer micro-batch of `micro_batch_size` sequences (gradient accumulation, if any,
    calls `step` once per micro-batch). pp_microbatches=-1: one microbatch per stage.
    Raises ConfigError when the count does not fit the batch or the schedule."""
    pp = parallel_cfg.pp if pp is None else pp
    schedule = PipelineSchedule(parallel_cfg.pp_schedule)
    n_stages = pp * stages_per_rank(schedule, parallel_cfg.pp_virtual_stages)
    n = parallel_cfg.pp_microbatches if parallel_cfg.pp_microbatches != -1 else n_stages
    if n < 1 or micro_batch_size % n:
        raise ConfigError(
            "parallel.pp_microbatches",
            f"{n} pipeline microbatches do not split training.micro_batch_size={micro_batch_size} "
            f"(sequences per forward per data-parallel rank); use a divisor of it, or raise the batch",
        )
    needed = {S.OneFOneB: pp, S.DualPipeV: n_stages}.get(schedule, 1)
    if n < needed:
        raise ConfigError(
            "parallel.pp_microbatches",
            f"{schedule.value} with {n_stages} stages needs at least {needed} microbatches per step, got {n}",
        )
    if schedule in (S.Interleaved1F1B, S.InterleavedZeroBubble) and n % max(1, n // pp):
        raise ConfigError("parallel.pp_microbatches", f"{schedule.value} needs a microbatch count ({n}) that is a multiple of pp={pp}, or below it")
    return n, micro_batch_size // n


def validate_pipeline(cfg, pp: int, dp: int) -> None:
    """Pipeline checks of `titan.parallel.mesh.validate_layout` (pure, fast): schedule vs.
    virtual stages, layer split, microbatch count, no tied embedding."""
    p, m, t = cfg.parallel, cfg.model, cfg.training
    v = stages_per_rank(p.pp_schedule, p.pp_virtual_stages)
    split_stages(m.n_layers, pp, v, p.pp_layers_per_stage)
    if m.tie_embeddings:
        raise ConfigError("model.tie_embeddings", "a tied embedding/output cannot be split over pipeline stages; set it to false with pp > 1")
    if m.moe.num_experts > 0 and m.moe.aux_loss_coef > 0:  # the schedules differentiate the last stage's loss only
        raise ConfigError(
            "model.moe.aux_loss_coef",
            "the MoE auxiliary loss is not carried through pipeline schedules; set it to 0 with pp > 1 "
            "and balance the experts with model.moe.bias_update_rate (auxiliary-loss-free)",
        )
    micro = t.micro_batch_size if t.micro_batch_size > 0 else t.global_batch_size // dp
    resolve_microbatches(p, micro, pp)


# ---------------------------------------------------------------------------------------------
# Stage modules
# ---------------------------------------------------------------------------------------------
def build_stage_modules(model: nn.Module, stage_layers: list[int], stage_idx: int, n_stages: int) -> nn.Module:
    """Prune `model` (a Llama3, normally on meta) in place to one stage: the embedding only on
    stage 0, norm + output only on the last stage, only `stage_layers` of `layers` (keys
    unchanged, so names stay the full model's). Returns the same module."""
    if getattr(model.args, "tie_embeddings", False) and n_stages > 1:
        raise ConfigError("model.tie_embeddings", "a tied embedding/output cannot be split over pipeline stages; set it to false with pp > 1")
    if stage_idx != 0:
        model.tok_embeddings = None
    if stage_idx != n_stages - 1:
        model.norm = None
        model.output = None
    keep = {str(i) for i in stage_layers}
    for key in list(model.layers.keys()):
        if key not in keep:
            del model.layers[key]
    return model


def _stage_models(model_or_factory: Union[nn.Module, Callable[[], nn.Module]], count: int) -> list[nn.Module]:
    """`count` unpruned models to cut stages from. A factory is called per stage; a model is
    used itself for the last and deep-copied (before any pruning) for the others: cheap on
    meta, where a copy holds no storage, only module objects."""
    if not isinstance(model_or_factory, nn.Module):
        return [model_or_factory() for _ in range(count)]
    if count > 1 and any(not p.is_meta for p in model_or_factory.parameters()):
        raise ValueError("several stages per rank from one model need a meta-device model (or a factory)")
    return [copy.deepcopy(model_or_factory) for _ in range(count - 1)] + [model_or_factory]


def merged_view(parts: list[nn.Module]) -> nn.Module:
    """One module over this rank's stage modules, sharing their submodules: its parameter and
    state-dict names are the full model's, so the optimizer, `get_model_state_dict`, gradient
    clipping and train()/eval() can treat a multi-stage rank like one model. Not callable."""
    if len(parts) == 1:
        return parts[0]
    view = _RankView()
    for part in parts:
        for name, child in part.named_children():
            if isinstance(child, nn.ModuleDict):
                merged = view._modules.setdefault(name, nn.ModuleDict())
                merged.update(child)
            elif child is not None:
                view.add_module(name, child)
    return view


class _RankView(nn.Module):
    def forward(self, *args, **kwargs):
        raise RuntimeError("a rank's merged view of its pipeline stages is not callable; run the Pipeline")


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------
@dataclass
class Pipeline:
    """This rank's stages and schedule. `step` trains on one step's local batch; `eval_loss`
    runs forward only. Both must be called on every rank of the job (inputs are only read on
    the rank holding the first stage, labels on the one holding the last)."""

    schedule: object
    stages: list  # torch PipelineStage, one per local stage, in model order
    model_parts: list[nn.Module]
    n_stages: int
    n_microbatches: int
    microbatch_size: int
    pp_group: dist.ProcessGroup
    v_shaped: bool
    loss_context: Callable[[], ContextManager] = contextlib.nullcontext
    eval_loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None
    hidden_shape: tuple = ()  # activations between stages (one microbatch), for eval's recv
    hidden_dtype: torch.dtype = torch.float32
    rank_model: nn.Module = field(init=False)

    def __post_init__(self):
        self.rank_model = merged_view(self.model_parts)
        self.pp = dist.get_world_size(self.pp_group)
        self.pp_rank = dist.get_rank(self.pp_group)

    @property
    def has_first(self) -> bool:
        return any(s.is_first for s in self.stages)

    @property
    def has_last(self) -> bool:
        return any(s.is_last for s in self.stages)

    @property
    def last_stage_rank(self) -> int:
        """pp rank (in the pp group) holding the last stage."""
        return stage_to_rank(self.n_stages - 1, self.pp, self.v_shaped)

    def step(self, inputs: Optional[torch.Tensor], labels: Optional[torch.Tensor], **kwargs) -> Optional[torch.Tensor]:
        """Forward + backward over one trainer micro-batch (n_microbatches x microbatch_size
        rows); gradients accumulate in the stage parameters (FSDP reduces them at the end of
        each call). Returns the summed microbatch loss, i.e. the loss the non-PP trainer
        computes for this micro-batch, on the rank holding the last stage; None elsewhere.
        `kwargs` (e.g. `document_ids`, batch-first tensors) are split into microbatches like
        the inputs and given to every stage's forward, on every rank."""
        args = (inputs,) if self.has_first else ()
        losses: Optional[list] = [] if self.has_last else None
        with self.loss_context():
            self.schedule.step(*args, target=labels if self.has_last else None, losses=losses, return_outputs=False, **kwargs)
        if losses is None:
            return None
        return torch.stack([_plain(loss.detach()) for loss in losses]).sum()

    @torch.no_grad()
    def eval_loss(self, inputs: Optional[torch.Tensor], labels: Optional[torch.Tensor], **kwargs) -> torch.Tensor:
        """Mean token CE of the batch (forward only, stage by stage, microbatch by microbatch),
        on every rank: broadcast from the last stage over the pp group.

        Not `schedule.eval()`: that reuses the training loss (scaled by the training token
        count) and flips every stage between train and eval setups on each call."""
        loss_fn = self.eval_loss_fn or _token_mean_ce
        device = self.stages[0].device
        total = torch.zeros((), device=device, dtype=torch.float32)
        n = self._batch_rows(inputs, labels)
        if n % self.microbatch_size:
            raise ValueError(f"eval batch of {n} rows is not a multiple of the pipeline microbatch ({self.microbatch_size})")
        with self.loss_context():
            for start in range(0, n, self.microbatch_size):
                rows = slice(start, start + self.microbatch_size)
                out = self._forward_microbatch(inputs[rows] if self.has_first else None, {k: v[rows] for k, v in kwargs.items()})
                if self.has_last:
                    total += _plain(loss_fn(out, labels[rows])).float()
        total /= max(1, n // self.microbatch_size)
        dist.broadcast(total, group=self.pp_group, group_src=self.last_stage_rank)
        _reshard(self.model_parts)
        return total

    def n_eval_microbatches(self, inputs: torch.Tensor) -> int:
        """Microbatches `eval_loss` averages over for a batch like `inputs` (every rank holds
        the inputs in the trainer)."""
        return max(1, inputs.shape[0] // self.microbatch_size)

    def _batch_rows(self, inputs, labels) -> int:
        """Rows of the batch, known to every rank (only the ends hold the tensors)."""
        local = inputs if inputs is not None and self.has_first else labels if self.has_last else None
        rows = torch.tensor([0 if local is None else local.shape[0]], device=self.stages[0].device)
        dist.all_reduce(rows, op=dist.ReduceOp.MAX, group=self.pp_group)
        return int(rows)

    def _forward_microbatch(self, tokens: Optional[torch.Tensor], kwargs: Optional[dict] = None) -> Optional[torch.Tensor]:
        """Run every stage in model order; activations cross ranks with send/recv. Each rank
        walks all stage indices, so a send always meets the receiver waiting for it."""
        mine = {s.stage_index: s for s in self.stages}
        h = tokens
        for idx in range(self.n_stages):
            owner = stage_to_rank(idx, self.pp, self.v_shaped)
            prev = stage_to_rank(idx - 1, self.pp, self.v_shaped) if idx > 0 else owner
            if idx > 0 and owner != prev:  # activation crosses ranks
                if self.pp_rank == prev:
                    dist.send(_local(h).contiguous(), group=self.pp_group, group_dst=owner)
                elif self.pp_rank == owner:
                    h = torch.empty(self.hidden_shape, device=self.stages[0].device, dtype=self.hidden_dtype)
                    dist.recv(h, group=self.pp_group, group_src=prev)
            if idx in mine:
                h = mine[idx].submod(h, **(kwargs or {}))
        return h if self.has_last else None


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A loss as a plain tensor (under loss parallel it is a replicated DTensor)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's piece of an activation: what the schedules send between stages."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _reshard(parts: list[nn.Module]) -> None:
    """Free FSDP's gathered parameters after a forward-only pass: with no backward to follow,
    modules that keep them after forward (`reshard_after_forward` never) would hold them."""
    from torch.distributed.fsdp import FSDPModule

    for part in parts:
        for module in part.modules():
            if isinstance(module, FSDPModule):
                module.reshard()


def _token_mean_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="mean")


def build_pipeline(
    model: Union[nn.Module, Callable[[], nn.Module]],
    parallel_mesh,
    parallel_cfg: ParallelConfig,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    micro_batch_size: int,
    seq_len: int,
    device: torch.device,
    apply_parallel: Callable[[nn.Module], Optional[nn.Module]],
    hidden_dtype: torch.dtype = torch.float32,
    loss_context: Callable[[], ContextManager] = contextlib.nullcontext,
    eval_loss_fn: Optional[Callable] = None,
    positions: Optional[torch.Tensor] = None,
) -> Pipeline:
    """This rank's stages (pruned from `model`, a meta Llama3 or a factory of them, then
    `apply_parallel`: TP / AC / compile / FSDP per stage) and the configured schedule.

    `micro_batch_size`: sequences per `step` call (the trainer's micro-batch), split into
    `parallel_cfg.pp_microbatches` pipeline microbatches (see `resolve_microbatches`).
    `seq_len` is the local sequence length (after context-parallel sharding), used for the
    static stage shapes, as is `hidden_dtype` (the dtype of the residual stream).
    `loss_context` wraps every schedule step and eval pass (loss parallel, autocast).
    `positions`: the RoPE positions of the local tokens under context parallelism (the same
    for every microbatch), given to every stage's forward. Parameters stay where `model` put
    them (meta): materialise each of `.model_parts` next."""
    from torch.distributed.pipelining import PipelineStage

    schedule_name = PipelineSchedule(parallel_cfg.pp_schedule)
    pp_mesh = parallel_mesh["pp"]
    pp, pp_rank, pp_group = pp_mesh.size(), pp_mesh.get_local_rank(), pp_mesh.get_group()
    v = stages_per_rank(schedule_name, parallel_cfg.pp_virtual_stages)
    n_stages = pp * v
    n_micro, mb = resolve_microbatches(parallel_cfg, micro_batch_size, pp)

    v_shaped = schedule_name in V_SHAPED
    my_stages = rank_stages(pp_rank, pp, n_stages, v_shaped)
    parts = []
    for part, stage_idx in zip(_stage_models(model, len(my_stages)), my_stages):
        args = part.args
        layer_split = split_stages(args.n_layers, pp, v, parallel_cfg.pp_layers_per_stage)
        build_stage_modules(part, layer_split[stage_idx], stage_idx, n_stages)
        part = apply_parallel(part) or part
        if positions is not None:
            _pass_positions(part, positions)
        parts.append(part)

    hidden_seq = seq_len // _sequence_parallel_degree(parallel_mesh, parallel_cfg)
    # Static shapes (no shape-inference round trip at the first step). requires_grad on the
    # activations is part of the metadata: without it a stage sends no input gradient back.
    hidden = lambda: torch.empty(mb, hidden_seq, args.dim, dtype=hidden_dtype, device="meta", requires_grad=True)  # noqa: E731
    stages = []
    for part, stage_idx in zip(parts, my_stages):
        first, last = stage_idx == 0, stage_idx == n_stages - 1
        inputs = torch.empty(mb, seq_len, dtype=torch.long, device="meta") if first else hidden()
        outputs = torch.empty(mb, seq_len, args.vocab_size, dtype=hidden_dtype, device="meta", requires_grad=True) if last else hidden()
        stages.append(PipelineStage(part, stage_idx, n_stages, device, input_args=inputs, output_args=outputs, group=pp_group))

    cls = _schedule_class(schedule_name)
    schedule = cls(stages[0] if schedule_name in SINGLE_STAGE else stages, n_microbatches=n_micro, loss_fn=loss_fn, scale_grads=False)
    return Pipeline(
        schedule=schedule,
        stages=stages,
        model_parts=parts,
        n_stages=n_stages,
        n_microbatches=n_micro,
        microbatch_size=mb,
        pp_group=pp_group,
        v_shaped=v_shaped,
        loss_context=loss_context,
        eval_loss_fn=eval_loss_fn,
        hidden_shape=(mb, hidden_seq, args.dim),
        hidden_dtype=hidden_dtype,
    )


def _pass_positions(stage: nn.Module, positions: torch.Tensor) -> None:
    """The schedules call a stage with its activations only: hand it the context-parallel
    positions by a hook instead (a hook, not a wrapper module, keeps the parameter names)."""

    def hook(module, args, kwargs):
        return args, {**kwargs, "positions": positions}

    stage.register_forward_pre_hook(hook, with_kwargs=True)


def _sequence_parallel_degree(parallel_mesh, parallel_cfg: ParallelConfig) -> int:
    """How much the residual stream between blocks is cut on the sequence dim by TP's sequence
    parallelism (the blocks' plain-tensor outputs are the local shards)."""
    tp = parallel_mesh.size("tp")
    return tp if tp > 1 and parallel_cfg.sequence_parallel else 1
