"""Memory and scale planner: what one training step of a config costs on each rank.

Nothing real is allocated: parameter shapes come from the model built on the meta device and
the rest is analytical. All sizes are bytes per rank; the pipeline rank with the highest peak
decides the verdict. docs/planner.md derives every term and compares them with measurements.

Storage conventions (they follow titan's code, not a generic textbook):
- parameters and gradients are kept in fp32 on every layout: FSDP2 holds fp32 shards (the
  master weights) and casts to `param_dtype` when it gathers; without FSDP a bf16 run uses
  autocast over fp32 weights. Optimizer states are `optim_state_dtype`.
- activations are counted tensor by tensor as autograd saves them in `titan.models.llama3`
  (measured with saved-tensor hooks, see tests/test_plan.py), in `param_dtype`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

from titan.config.errors import ConfigError
from titan.config.schema import (
    ACMode,
    Device,
    DType,
    Float8Recipe,
    OptimName,
    PipelineSchedule,
    ReshardAfterForward,
    TrainConfig,
)
from titan.models import LlamaArgs, active_params, build_model, count_params, flops_per_token, model_args

GIB = 1024**3
DTYPE_BYTES = {DType.float32: 4, DType.bfloat16: 2, DType.float16: 2}
FP32 = 4
H100_BF16_TFLOPS = 989.0  # dense bf16 peak, H100 SXM

# Column-parallel weights are split on dim 0 by TP, row-parallel ones on dim 1; 1-D params
# (norms) are replicated. The embedding is vocab-parallel: also dim 0. A MoE router's gate is
# replicated over tp, and routed experts (E, ., .) are split by expert parallelism, not by TP
# (titan/parallel/tp.py, expert.py).
_ROWWISE = ("attention.wo.weight", "feed_forward.w2.weight", "shared.w2.weight")
_TP_REPLICATED = ("router.gate.weight",)
_ROUTED_EXPERTS = ("experts.w1", "experts.w2", "experts.w3")


# ---------------------------------------------------------------------------------------------
# layout
# ---------------------------------------------------------------------------------------------
@dataclass
class Layout:
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    pp: int
    fsdp: bool  # parameters sharded over dp_shard x cp (FSDP2 / HSDP)
    sequence_parallel: bool
    loss_parallel: bool
    cp_mode: str = "allgather"  # titan.parallel.context_parallel: allgather | ring
    ep: int = 1  # expert parallel, borrowed from dp_shard

    @property
    def world(self) -> int:
        return self.dp_replicate * self.dp_shard * self.cp * self.tp * self.pp

    @property
    def shard(self) -> int:
        """Ranks a parameter is FSDP-sharded over (1: not sharded)."""
        return self.dp_shard * self.cp if self.fsdp else 1

    @property
    def expert_shard(self) -> int:
        """Ranks a routed expert's ep shard is FSDP-sharded over: those holding the same experts
        (dp_shard / ep); without ep, like any parameter."""
        if self.ep == 1:
            return self.shard
        return self.dp_shard // self.ep if self.fsdp else 1

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def replicate(self) -> int:
        """Ranks gradients are all-reduced over: dp_replicate (HSDP/DDP)."""
        return self.dp_replicate


def resolve_degrees(cfg: TrainConfig, world_size: int) -> dict[str, int]:
    """Mesh degrees with the one -1 filled, by titan.parallel.mesh's rule (re-stated here so
    planning does not import torch.distributed; a test checks the two agree)."""
    dims = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
    given = {d: getattr(cfg.parallel, d) for d in dims}
    free = [d for d, v in given.items() if v == -1]
    bad = [d for d, v in given.items() if v == 0 or v < -1]
    if bad or len(free) > 1:
        key = bad[0] if bad else free[1]
        raise ConfigError(f"parallel.{key}", "each degree is a positive integer, and at most one is -1 (the rest)")
    fixed = math.prod(v for v in given.values() if v != -1)
    if free:
        if world_size % fixed:
            raise ConfigError(f"parallel.{free[0]}", f"-1 cannot fill world size {world_size}: the other degrees multiply to {fixed}")
        given[free[0]] = world_size // fixed
    elif fixed != world_size:
        raise ConfigError("parallel", f"the degrees multiply to {fixed} ranks, but world_size is {world_size}")
    return given


def resolve_layout(cfg: TrainConfig, world_size: int) -> Layout:
    d = resolve_degrees(cfg, world_size)
    p = cfg.parallel
    # Mirrors titan.parallel: FSDP when dp_shard x cp > 1, otherwise DDP or a single replica.
    return Layout(
        dp_replicate=d["dp_replicate"],
        dp_shard=d["dp_shard"],
        cp=d["cp"],
        tp=d["tp"],
        pp=d["pp"],
        fsdp=d["dp_shard"] * d["cp"] > 1,
        sequence_parallel=p.sequence_parallel and d["tp"] > 1,
        loss_parallel=p.loss_parallel and d["tp"] > 1,
        cp_mode=str(getattr(getattr(p, "cp_mode", None), "value", getattr(p, "cp_mode", None)) or "allgather"),
        ep=getattr(p, "ep", 1),
    )


# ---------------------------------------------------------------------------------------------
# parameters (shapes from the meta model)
# ---------------------------------------------------------------------------------------------
@dataclass
class ParamShapes:
    """Unique parameter shapes by role. `block` is block 0; `layers` every block's (MoE models
    may keep dense blocks first)."""

    block: dict[str, tuple[int, ...]]
    embedding: tuple[int, ...]
    output: tuple[int, ...]
    final_norm: tuple[int, ...]
    tied: bool
    total: int  # count_params of the whole model
    layers: Optional[list[dict[str, tuple[int, ...]]]] = None

    def layer(self, i: int) -> dict[str, tuple[int, ...]]:
        return self.layers[i] if self.layers else self.block

    @property
    def block_numel(self) -> int:
        return sum(math.prod(s) for s in self.block.values())


def param_shapes(args: LlamaArgs) -> ParamShapes:
    model = build_model(args)  # meta device: shapes only
    layers = [{n: tuple(p.shape) for n, p in layer.named_parameters()} for layer in model.layers.values()]
    return ParamShapes(
        block=layers[0],
        layers=layers,
        embedding=tuple(model.tok_embeddings.weight.shape),
        output=tuple(model.output.weight.shape),
        final_norm=tuple(model.norm.weight.shape),
        tied=args.tie_embeddings,
        total=count_params(model),
    )


def local_numel(name: str, shape: tuple[int, ...], layout: Layout, sharded: bool = True) -> int:
    """Elements of one parameter on one rank: TP split (routed experts: EP split), then
    FSDP2's dim-0 split (padded up) when `sharded`."""
    dims = list(shape)
    if name.endswith(_ROUTED_EXPERTS):
        dims[0] = math.ceil(dims[0] / layout.ep)
        shard = layout.expert_shard
    else:
        if len(dims) == 2 and not name.endswith(_TP_REPLICATED):
            split = 1 if name.endswith(_ROWWISE) else 0
            dims[split] = math.ceil(dims[split] / layout.tp)
        shard = layout.shard
    if sharded:
        dims[0] = math.ceil(dims[0] / shard)
    return math.prod(dims)


def block_numel(shapes: dict[str, tuple[int, ...]], layout: Layout, sharded: bool = True) -> int:
    return sum(local_numel(n, s, layout, sharded) for n, s in shapes.items())


# ---------------------------------------------------------------------------------------------
# pipeline stages
# ---------------------------------------------------------------------------------------------
_V_SHAPED = (PipelineSchedule.ZBVZeroBubble, PipelineSchedule.DualPipeV)
_INTERLEAVED = (PipelineSchedule.Interleaved1F1B, PipelineSchedule.InterleavedZeroBubble)


@dataclass
class StageRank:
    pp_rank: int
    layers: int
    has_embedding: bool
    has_output: bool
    in_flight: float  # micro-batches whose activations this rank holds at its peak (whole-rank units)
    layer_ids: tuple[int, ...] = ()  # which blocks (model.layers keys)


def stage_layers(n_layers: int, n_stages: int, explicit: Optional[list[int]]) -> list[int]:
    if explicit:
        if len(explicit) != n_stages or sum(explicit) != n_layers:
            raise ConfigError(
                "parallel.pp_layers_per_stage",
                f"needs {n_stages} entries summing to {n_layers}, got {explicit}",
            )
        return list(explicit)
    base, extra = divmod(n_layers, n_stages)
    return [base + (1 if s < extra else 0) for s in range(n_stages)]


def chunks_in_flight(schedule: PipelineSchedule, pp: int, v: int, n_mb: int, rank: int) -> float:
    """Forward chunks (one stage x one micro-batch) whose activations wait for their backward,
    at the worst moment for `rank`. From the schedules' warm-up depth: 1F1B holds pp - rank;
    interleaved 1F1B warms up (v-1)*pp + 2*(pp-1-rank) chunks; GPipe / breadth-first hold all;
    ZB-V matches 1F1B's peak (2 chunks per micro-batch); DualPipeV holds one micro-batch more."""
    if pp == 1:
        return 1.0
    if schedule in (PipelineSchedule.GPipe, PipelineSchedule.LoopedBFS):
        return float(n_mb * v)
    if schedule in _INTERLEAVED and v > 1:
        return float(min(n_mb * v, (v - 1) * pp + 2 * (pp - 1 - rank) + 1))
    if schedule is PipelineSchedule.ZBVZeroBubble:
        return float(min(2 * n_mb, 2 * pp))
    if schedule is PipelineSchedule.DualPipeV:
        return float(min(2 * n_mb, 2 * (pp + 1)))
    return float(min(n_mb, pp - rank) * v)  # 1F1B (and interleaved with one stage per rank)


def pipeline_ranks(cfg: TrainConfig, layout: Layout, n_mb: int) -> list[StageRank]:
    p = cfg.parallel
    pp = layout.pp
    v = p.pp_virtual_stages if pp > 1 else 1
    if p.pp_schedule in _V_SHAPED and pp > 1:
        v = 2
    n_stages = pp * v
    if cfg.model.n_layers < n_stages:
        raise ConfigError("parallel.pp", f"{n_stages} stages need at least {n_stages} layers, the model has {cfg.model.n_layers}")
    per_stage = stage_layers(cfg.model.n_layers, n_stages, p.pp_layers_per_stage if pp > 1 else None)
    first = [sum(per_stage[:s]) for s in range(n_stages)]
    ranks = []
    for r in range(pp):
        if p.pp_schedule in _V_SHAPED and pp > 1:
            stages = [r, n_stages - 1 - r]  # V shape: rank 0 holds the first and the last stage
        else:
            stages = [r + i * pp for i in range(v)]  # looped
        chunks = chunks_in_flight(p.pp_schedule, pp, v, n_mb, r)
        ranks.append(
            StageRank(
                pp_rank=r,
                layers=sum(per_stage[s] for s in stages),
                has_embedding=0 in stages,
                has_output=n_stages - 1 in stages,
                in_flight=chunks / v,
                layer_ids=tuple(i for s in sorted(stages) for i in range(first[s], first[s] + per_stage[s])),
            )
        )
    return ranks


# ---------------------------------------------------------------------------------------------
# activations
# ---------------------------------------------------------------------------------------------
def block_saved_bytes(args: LlamaArgs, tokens: float, act: int, layout: Layout, cpu: bool) -> dict[str, float]:
    """Tensors one Llama block saves for backward, for `tokens` tokens on this rank (already
    divided by cp), by role. `act` = bytes per element of the compute dtype.

    - each RMSNorm saves its input and 1/rms; the CPU build runs the composite kernel, which
      also keeps the normalised tensor, both upcast to fp32 (the fused CUDA kernel saves only
      the input, in its dtype);
    - the matmul inputs n1 = norm(x) and n2 = norm(h): under TP+SP they are the all-gathered,
      full-sequence tensors, so they are *not* divided by tp;
    - SDPA keeps q, k, v (k/v after the GQA repeat, so n_heads wide), its output (= wo's
      input) and the fp32 logsumexp. Under CP the attention module keeps K/V of the kv heads
      only: gathered over the whole sequence (allgather mode) or local (ring mode);
    - SwiGLU keeps w1's output (silu input), silu's output and w3's output (the product's
      inputs) and the product (w2's input): 4 x ffn_hidden.
    RoPE saves only its cos/sin table (a buffer); the residual adds save nothing."""
    tp, sp = layout.tp, layout.tp if layout.sequence_parallel else 1
    d, f, heads = args.dim, args.ffn_hidden, args.n_heads
    width = heads * args.head_dim
    norm_elem = 2 * FP32 if cpu else act
    if layout.cp > 1:
        kv_tokens = tokens * (layout.cp if layout.cp_mode == "allgather" else 1)
        kv = 2 * kv_tokens * args.kv_heads * args.head_dim * act / tp
    else:
        kv = 2 * tokens * width * act / tp
    return {
        ("norm inputs + normalised (fp32)" if cpu else "norm inputs"): 2 * tokens * (d * norm_elem + FP32) / sp,
        "matmul inputs n1, n2": 2 * tokens * d * act,
        "q": tokens * width * act / tp,
        "k, v": kv,
        "attention output": tokens * width * act / tp,
        "logsumexp": tokens * heads * FP32 / tp,
        "SwiGLU (w1, silu, w3, product)": 4 * tokens * f * act / tp,
    }


def sac_saved_bytes(args: LlamaArgs, tokens: float, act: int, layout: Layout) -> float:
    """Per-op selective AC (titan's policy): the block input plus every matmul and attention
    output. Row-parallel outputs (wo, w2) are partial sums of the full sequence under TP."""
    tp, sp = layout.tp, layout.tp if layout.sequence_parallel else 1
    d, f, kv = args.dim, args.ffn_hidden, args.kv_heads * args.head_dim
    width = args.n_heads * args.head_dim
    per_token = (
        d / sp  # block input
        + (width + 2 * kv) / tp  # wq, wk, wv
        + width / tp  # attention output
        + 2 * d  # wo and w2 outputs
        + 2 * f / tp  # w1, w3
    ) * act + args.n_heads * FP32 / tp
    return tokens * per_token


@dataclass
class Activations:
    """One rank's saved tensors and backward transients (bytes)."""

    per_block: float  # what one block keeps for one micro-batch, after AC
    blocks: float  # per_block x layers x micro-batches in flight
    head: float  # final norm + output projection inputs (last stage, one micro-batch)
    block_backward: float  # while one block runs backward: its recompute + activation grads
    loss_backward: float  # the loss backward (0 off the last stage)
    logits_grad: float  # the logits' gradient, alive during the output projection's backward
    per_layer: float  # one block, one micro-batch, no AC


def activations(args: LlamaArgs, cfg: TrainConfig, layout: Layout, rank: StageRank, tokens: float, act: int, cpu: bool) -> Activations:
    """`tokens`: one micro-batch (PP micro-batch when pp > 1) on this rank, after cp."""
    full = sum(block_saved_bytes(args, tokens, act, layout, cpu).values())
    sp = layout.tp if layout.sequence_parallel else 1
    block_input = tokens * args.dim * act / sp
    ac, n = cfg.activation_checkpoint, rank.layers
    if ac.mode is ACMode.full:
        per_block, recompute = block_input, full
    elif ac.mode is ACMode.selective_layer:
        # titan wraps the blocks whose index is a multiple of `every`: about n / every of them.
        wrapped = math.ceil(n / max(ac.every, 1))
        per_block, recompute = (wrapped * block_input + (n - wrapped) * full) / max(n, 1), full
    elif ac.mode is ACMode.selective_op:
        per_block = sac_saved_bytes(args, tokens, act, layout)
        recompute = max(full - per_block, 0.0)
    else:
        per_block, recompute = full, 0.0

    # Backward of one block: gradients of the widest tensors (SwiGLU) and of the stream.
    block_grads = tokens * (3 * args.ffn_hidden / layout.tp + 2 * args.dim) * act
    head = loss = logits_grad = 0.0
    if rank.has_output:
        # The final norm's input and the output projection's (gathered) input stay saved for
        # one micro-batch. The loss keeps the fp32 log-softmax; its backward briefly holds that,
        # its gradient and the logits' fp32 gradient: 3 x tokens x vocab x 4 bytes (/tp when
        # the loss is vocab-parallel).
        norm_elem = 2 * FP32 if cpu else act
        head = tokens * (args.dim * norm_elem / sp + args.dim * act)
        vocab = args.vocab_size / (layout.tp if layout.loss_parallel else 1)
        loss = 3 * tokens * vocab * FP32
        logits_grad = tokens * vocab * act
    return Activations(per_block, per_block * n * rank.in_flight, head, recompute + block_grads, loss, logits_grad, full)


# ---------------------------------------------------------------------------------------------
# per-rank memory
# ---------------------------------------------------------------------------------------------
@dataclass
class RankMemory:
    """One pipeline rank. The peak is the larger of the optimizer step and the worst moment of
    backward; the backward fields hold their values at that moment, so they add up to it."""

    pp_rank: int
    layers: int
    has_embedding: bool
    has_output: bool
    in_flight: float  # micro-batches whose activations this rank holds
    params: float
    grads: float
    optim_states: float
    optim_step: float  # optimizer temporaries (foreach lists / per-parameter)
    fsdp_buffers: float  # gathered (unsharded) parameters: current + prefetched group
    compute_copies: float  # weight copies without FSDP: DDP's unsharded params, autocast's cache
    grads_during_backward: float  # gradients already allocated at the backward peak
    activations: float  # saved activations still alive at the backward peak
    working: float  # the transient at that moment: loss, recomputed block, FSDP grad buffers
    backward_moment: str  # where in backward the peak is
    peak: float = 0.0
    peak_phase: str = ""

    def __post_init__(self) -> None:
        self.peak = max(self.backward_peak, self.optimizer_peak)
        self.peak_phase = f"backward, {self.backward_moment}" if self.backward_peak >= self.optimizer_peak else "optimizer step"

    @property
    def backward_peak(self) -> float:
        return self.params + self.optim_states + self.grads_during_backward + self.fsdp_buffers + self.compute_copies + self.activations + self.working

    @property
    def optimizer_peak(self) -> float:
        return self.params + self.optim_states + self.grads + self.optim_step

    def consumers(self) -> list[tuple[str, float]]:
        """What makes up the peak, biggest first."""
        parts = {"parameters (fp32)": self.params, "optimizer states": self.optim_states}
        if self.peak_phase == "optimizer step":
            parts.update({"gradients": self.grads, "optimizer temporaries": self.optim_step})
        else:
            parts.update(
                {
                    "gradients": self.grads_during_backward,
                    "FSDP gathered parameters": self.fsdp_buffers,
                    "weight copies (DDP / autocast)": self.compute_copies,
                    "activations": self.activations,
                    "backward working set": self.working,
                }
            )
        return sorted(((k, v) for k, v in parts.items() if v > 0), key=lambda kv: -kv[1])


def _units(shapes: ParamShapes, rank: StageRank, layout: Layout) -> list[float]:
    """FSDP groups on this rank, as unsharded (after TP) element counts: each block, the
    embedding, norm+output; with tied weights the root holds embedding, norm and output."""
    units = [float(block_numel(shapes.layer(i), layout, sharded=False)) for i in rank.layer_ids]
    emb = local_numel("tok_embeddings.weight", shapes.embedding, layout, sharded=False)
    tail = local_numel("output.weight", shapes.output, layout, sharded=False) + math.prod(shapes.final_norm)
    if shapes.tied and layout.pp == 1:
        units.append(float(emb + math.prod(shapes.final_norm)))
    else:
        if rank.has_embedding:
            units.append(float(emb))
        if rank.has_output:
            units.append(float(tail))
    return units


def _backward_peak(a: Activations, n: int, block_grads: float, head_grads: float, all_grads: float, accumulated: bool, block_bufs: float, output_bufs: float) -> tuple[str, float, float, float]:
    """(moment, gradients, activations, transient) at the worst moment of backward.

    Backward walks from the loss to the first block, freeing each block's saved tensors and
    (with one micro-batch per step) allocating its gradients. Memory is linear along the walk,
    so the worst moment is one of: the loss backward, the output projection's backward, or
    the last or the first block's backward. With several micro-batches per step the gradients
    already exist. Without AC the start dominates; with full AC the end (grads of every block
    + one recomputed block) can."""
    base = all_grads if accumulated else 0.0
    growth = 0.0 if accumulated else block_grads
    moments = []
    if a.loss_backward:
        moments.append(("loss", base, a.blocks + a.head, a.loss_backward))
        moments.append(("output projection", base, a.blocks + a.head, a.logits_grad + output_bufs))
    if n:
        start = base + (0.0 if accumulated else head_grads)
        moments.append(("last block", start, a.blocks, a.block_backward + block_bufs))
        moments.append(("first block", start + (n - 1) * growth, a.blocks - (n - 1) * a.per_block, a.block_backward + block_bufs))
    return max(moments, key=lambda m: m[1] + m[2] + m[3])


def rank_memory(args: LlamaArgs, shapes: ParamShapes, cfg: TrainConfig, layout: Layout, rank: StageRank, tokens: float, micro_batches: int, cpu: bool) -> RankMemory:
    prec = cfg.precision
    act = DTYPE_BYTES[prec.param_dtype]
    state_bytes = DTYPE_BYTES[prec.optim_state_dtype]

    # Parameters held by this rank (a tied weight counts once unless PP puts its two uses on
    # different ranks).
    blocks = [block_numel(shapes.layer(i), layout) for i in rank.layer_ids]
    block_local = max(blocks, default=0)
    local = list(blocks)
    head_local = 0
    if rank.has_embedding:
        local.append(local_numel("tok_embeddings.weight", shapes.embedding, layout))
    if rank.has_output:
        if not (shapes.tied and rank.has_embedding):
            head_local += local_numel("output.weight", shapes.output, layout)
        head_local += local_numel("norm.weight", shapes.final_norm, layout)
        local.append(head_local)
    n_local = float(sum(local))
    biggest = float(max(local))

    n_states = {OptimName.adamw: 2, OptimName.adam: 2, OptimName.sgd: 1 if cfg.optim.momentum > 0 else 0}[cfg.optim.name]
    params, grads = n_local * FP32, n_local * FP32
    optim_states = n_local * n_states * state_bytes

    # FSDP2 gathers one group at a time and prefetches the next: two groups unsharded (all of
    # them with reshard_after_forward=never). A group's backward adds its unsharded gradient
    # (compute dtype) and the reduce-scatter input (reduce_dtype).
    gathered = block_bufs = output_bufs = 0.0
    if layout.fsdp:
        units = _units(shapes, rank, layout)
        gather = act
        if prec.float8 is Float8Recipe.tensorwise and prec.fsdp_float8_all_gather:
            gather = 1  # float8 all-gather (applies to the linears; ends approximated alike)
        never = cfg.parallel.reshard_after_forward is ReshardAfterForward.never
        gathered = (sum(units) if never else sum(sorted(units)[-2:])) * gather
        grad_bytes = act + DTYPE_BYTES[prec.reduce_dtype]
        block_bufs = (max(units[: rank.layers]) if rank.layers else 0.0) * grad_bytes
        output_bufs = (units[-1] if rank.has_output else 0.0) * grad_bytes
    # Without FSDP, weights are used through a second copy kept from forward to backward:
    # DDP (FSDP2's replicate) gathers into unsharded params of the compute dtype even on one
    # shard (measured: a full fp32 copy); a single process in bf16 keeps autocast's cache.
    ddp = not layout.fsdp and layout.replicate > 1
    compute_copies = n_local * act if ddp or (not layout.fsdp and act < FP32) else 0.0

    a = activations(args, cfg, layout, rank, tokens, act, cpu)
    moment, grads_bwd, acts, working = _backward_peak(
        a, rank.layers, block_local * FP32, head_local * FP32, grads, micro_batches > 1, block_bufs, output_bufs
    )

    # Optimizer temporaries: torch's foreach AdamW (the CUDA default) builds one full list of
    # sqrt(exp_avg_sq); the per-parameter loop (CPU default, bf16-state optimizers) only a few
    # tensors the size of the largest parameter; fused kernels none (Adam's default on CPU in fp32).
    cpu_fused_adam = cpu and cfg.optim.fused is None and cfg.optim.name is not OptimName.sgd
    if cfg.optim.fused or (cpu_fused_adam and prec.optim_state_dtype is DType.float32):
        optim_step = 0.0
    elif cpu or prec.optim_state_dtype is not DType.float32:
        optim_step = 2.0 * biggest * FP32
    else:
        optim_step = n_local * state_bytes if n_states else 0.0

    return RankMemory(
        pp_rank=rank.pp_rank,
        layers=rank.layers,
        has_embedding=rank.has_embedding,
        has_output=rank.has_output,
        in_flight=rank.in_flight,
        params=params,
        grads=grads,
        optim_states=optim_states,
        optim_step=optim_step,
        fsdp_buffers=gathered,
        compute_copies=compute_copies,
        grads_during_backward=grads_bwd,
        activations=acts,
        working=working,
        backward_moment=moment,
    )


# ---------------------------------------------------------------------------------------------
# communication (bytes each rank sends per optimizer step; ring algorithms)
# ---------------------------------------------------------------------------------------------
def communication(args: LlamaArgs, shapes: ParamShapes, cfg: TrainConfig, layout: Layout, rank: StageRank, tokens: float, accum: int, n_mb: int) -> dict[str, float]:
    """Per mesh dim. All-gather / reduce-scatter of X bytes over n ranks: (n-1)/n x X sent per
    rank; all-reduce: twice that. Assumptions: FSDP gathers every forward and (when it
    reshards) every backward and reduce-scatters every backward, i.e. once per micro-batch
    (titan does not skip gradient sync while accumulating); HSDP/DDP all-reduce likewise."""
    prec = cfg.precision
    act = DTYPE_BYTES[prec.param_dtype]
    red = DTYPE_BYTES[prec.reduce_dtype]
    gather = 1 if prec.float8 is Float8Recipe.tensorwise and prec.fsdp_float8_all_gather else act
    out: dict[str, float] = {}
    units = _units(shapes, rank, layout)
    unsharded = sum(units)  # after TP, before FSDP
    passes = accum * (n_mb if layout.pp > 1 else 1)  # forward+backward passes per step

    n = layout.shard
    if layout.ep > 1:  # routed experts (after ep) go through FSDP on their own, smaller mesh
        experts = sum(local_numel(k, v, layout, sharded=False) for i in rank.layer_ids for k, v in shapes.layer(i).items() if k.endswith(_ROUTED_EXPERTS))
        unsharded -= experts
        ne = layout.expert_shard
        if ne > 1:
            out["dp_shard / ep: expert FSDP all-gather + reduce-scatter"] = passes * experts * (2 * gather + red) * (ne - 1) / ne
    if n > 1:
        reshard = cfg.parallel.reshard_after_forward
        regather = 0.0 if reshard is ReshardAfterForward.never else unsharded
        if reshard is ReshardAfterForward.default and layout.pp == 1:
            regather -= units[-1]  # the last group stays gathered for backward
        out["dp_shard x cp: FSDP all-gather"] = passes * (unsharded + regather) * gather * (n - 1) / n
        out["dp_shard x cp: FSDP reduce-scatter"] = passes * unsharded * red * (n - 1) / n
    r = layout.replicate
    if r > 1:
        out["dp_replicate: gradient all-reduce"] = passes * (unsharded / n) * red * 2 * (r - 1) / r

    tp = layout.tp
    if tp > 1:
        # Per block: gather before attention and MLP, reduce(-scatter) after wo and w2, in
        # forward, mirrored in backward: 8 tensors of tokens x dim (all-reduce without SP has the
        # same volume as reduce-scatter + all-gather). Recomputed blocks gather again.
        ac = cfg.activation_checkpoint
        recomputed = {ACMode.full: 4.0, ACMode.selective_op: 2.0}.get(ac.mode, 0.0)
        if ac.mode is ACMode.selective_layer:
            recomputed = 4.0 / max(ac.every, 1)
        per_block = 8 + recomputed
        ends = 4 * (int(rank.has_embedding) + int(rank.has_output))
        out["tp: activation gathers / reduce-scatters"] = passes * (rank.layers * per_block + ends) * tokens * args.dim * act * (tp - 1) / tp

    if layout.pp > 1:
        # Each chunk sends its output forward and its input gradient backward.
        chunks = 2 if cfg.parallel.pp_schedule in _V_SHAPED else cfg.parallel.pp_virtual_stages
        per_mb = 2 * chunks * tokens * args.dim * act / (tp if layout.sequence_parallel else 1)
        out["pp: stage activations send/recv"] = accum * n_mb * per_mb

    cp = layout.cp
    if cp > 1:
        # One copy of each K/V head (not the GQA repeats). allgather: gather in forward,
        # reduce-scatter the gradients in backward; ring: cp-1 shifts of the local block in
        # forward, and in backward again with the gradients travelling along.
        local_kv = 2 * tokens * args.kv_heads * args.head_dim / tp * act
        forward = (cp - 1) * local_kv
        backward = forward * (2 if layout.cp_mode == "ring" else 1)
        recompute = forward if cfg.activation_checkpoint.mode is ACMode.full else 0.0
        out[f"cp: K/V {layout.cp_mode} (+ gradients)"] = passes * rank.layers * (forward + backward + recompute)
    return out


# ---------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------
@dataclass
class Plan:
    model: str
    n_params: int
    layout: dict[str, int | bool]
    world_size: int
    seq_len: int
    micro_batch_size: int
    global_batch_size: int
    accum_steps: int
    pp_microbatches: int
    tokens_per_microbatch: float  # on one rank (after cp), one forward (PP micro-batch if pp > 1)
    ranks: list[RankMemory]
    worst: RankMemory
    per_layer_activation: float
    activation_detail: dict[str, float]
    communication: dict[str, float]
    flops_per_token: float
    flops_per_step: float
    peak_tflops: float
    mfu: float
    step_time_s: float
    tokens_per_s: float
    device_memory: float
    headroom: float
    usable_memory: float
    fits: bool
    notes: list[str]
    active_params: int = 0  # parameters one token uses (MoE: the routed experts it picks)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["worst"]["consumers"] = dict(self.worst.consumers())
        return d


def _check_divisible(cfg: TrainConfig, layout: Layout) -> None:
    """The shape checks training makes before launch (a plan of an impossible layout is noise)."""
    from titan.config.validate import validate_model

    validate_model(cfg)
    m, tp = cfg.model, layout.tp
    for key, value in (("model.n_heads", m.n_heads), ("model.n_kv_heads", m.n_kv_heads or m.n_heads)):
        if value % tp:
            raise ConfigError(key, f"{value} is not divisible by parallel.tp={tp}")
    if cfg.training.seq_len % (layout.cp * (tp if layout.sequence_parallel else 1)):
        raise ConfigError("training.seq_len", f"{cfg.training.seq_len} must be divisible by cp x tp (with sequence parallelism)")


def plan(
    cfg: TrainConfig,
    world_size: Optional[int] = None,
    device_memory_gib: float = 80.0,
    headroom: float = 0.1,
    peak_tflops: Optional[float] = None,
    mfu: float = 0.4,
) -> Plan:
    """Estimate memory, communication and speed of `cfg` on `world_size` ranks.

    world_size None: parallel.nproc_per_node when a degree is -1, else the product of the
    degrees. `headroom`: share of device memory kept free (allocator fragmentation, CUDA
    context, NCCL buffers)."""
    p, t = cfg.parallel, cfg.training
    if world_size is None:
        degrees = [p.dp_replicate, p.dp_shard, p.cp, p.tp, p.pp]
        world_size = p.nproc_per_node if -1 in degrees else math.prod(degrees)
    if not 0 <= headroom < 1:
        raise ConfigError("headroom", f"must be in [0, 1), got {headroom}")
    if not 0 < mfu <= 1:
        raise ConfigError("mfu", f"must be in (0, 1], got {mfu}")
    layout = resolve_layout(cfg, world_size)
    _check_divisible(cfg, layout)
    notes: list[str] = []

    vocab = cfg.model.vocab_size if cfg.model.vocab_size > 0 else cfg.tokenizer.vocab_size
    args = model_args(cfg.model, vocab, t.seq_len)
    shapes = param_shapes(args)
    cpu = t.device is Device.cpu

    # micro_batch_size -1: each data-parallel rank's whole share in one forward (as training).
    global_batch = t.global_batch_size
    micro = t.micro_batch_size if t.micro_batch_size > 0 else max(1, global_batch // layout.dp)
    if global_batch < micro * layout.dp:
        global_batch = micro * layout.dp
        notes.append(f"training.global_batch_size={t.global_batch_size} is below one sequence per data-parallel rank; planned with {global_batch}")
    accum = max(1, global_batch // (micro * layout.dp))
    if layout.pp > 1:  # the runtime's default: one microbatch per stage (V schedules: 2 per rank)
        from titan.parallel.pipeline import stages_per_rank

        n_mb = p.pp_microbatches if p.pp_microbatches > 0 else layout.pp * stages_per_rank(PipelineSchedule(p.pp_schedule), p.pp_virtual_stages)
    else:
        n_mb = 1
    if micro % n_mb:
        notes.append(f"micro_batch_size={micro} does not split into {n_mb} pipeline micro-batches; planned with fractional ones")
    tokens = micro / n_mb * t.seq_len / layout.cp
    micro_batches = accum * n_mb

    ranks = pipeline_ranks(cfg, layout, n_mb)
    memories = [rank_memory(args, shapes, cfg, layout, r, tokens, micro_batches, cpu) for r in ranks]
    worst = max(memories, key=lambda m: m.peak)
    comms = [communication(args, shapes, cfg, layout, r, tokens, accum, n_mb) for r in ranks]
    comm = {k: max(c.get(k, 0.0) for c in comms) for k in comms[0]}
    moe = getattr(args, "moe", None)
    if moe is not None and p.ep > 1:  # dispatch + combine, forward and backward, every MoE layer
        moe_layers = sum(args.is_moe_layer(i) for i in range(args.n_layers)) / layout.pp
        act = DTYPE_BYTES[cfg.precision.param_dtype]
        comm["ep: token all-to-all (dispatch + combine)"] = (
            4 * accum * n_mb * moe_layers * tokens * moe.top_k * args.dim * act * (p.ep - 1) / p.ep
        )
        if layout.expert_shard == 1 and layout.dp > p.ep:
            notes.append(f"ep={p.ep}: routed experts are replicated over dp_replicate (dp_shard = ep: nothing left to shard them over)")
    detail = block_saved_bytes(args, tokens, DTYPE_BYTES[cfg.precision.param_dtype], layout, cpu)

    fpt = flops_per_token(args, shapes.total, t.seq_len)
    tokens_per_step = global_batch * t.seq_len
    flops_step = fpt * tokens_per_step
    peak = peak_tflops or cfg.logging.peak_tflops or H100_BF16_TFLOPS
    step_time = flops_step / (layout.world * peak * 1e12 * mfu)
    if cfg.activation_checkpoint.mode is not ACMode.none:
        notes.append("activation checkpointing recomputes forward work that the MFU convention does not count: expect a lower MFU")

    device_memory = device_memory_gib * GIB
    usable = device_memory * (1 - headroom)
    return Plan(
        model=cfg.model.name,
        n_params=shapes.total,
        layout={**{k: getattr(layout, k) for k in ("dp_replicate", "dp_shard", "cp", "tp", "pp", "ep")}, "fsdp": layout.fsdp},
        world_size=layout.world,
        seq_len=t.seq_len,
        micro_batch_size=micro,
        global_batch_size=global_batch,
        accum_steps=accum,
        pp_microbatches=n_mb,
        tokens_per_microbatch=tokens,
        ranks=memories,
        worst=worst,
        per_layer_activation=sum(detail.values()),
        activation_detail=detail,
        communication=comm,
        flops_per_token=fpt,
        flops_per_step=flops_step,
        peak_tflops=peak,
        mfu=mfu,
        step_time_s=step_time,
        tokens_per_s=tokens_per_step / step_time,
        device_memory=device_memory,
        headroom=headroom,
        usable_memory=usable,
        fits=worst.peak <= usable,
        notes=notes,
        active_params=active_params(args, shapes.total),
    )
