"""Typed schema for every config group.

Each dataclass is registered in Hydra's ConfigStore (see `titan.config.store`); the YAML files
under `conf/` are presets over these schemas. The training code only ever sees these objects,
never a DictConfig. Enums (not Literal) because OmegaConf 2.3 only validates Enums.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional


class Device(str, Enum):
    auto = "auto"  # CUDA when present, else CPU
    cpu = "cpu"
    cuda = "cuda"


class DType(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    name: str = "llama3_debug"
    dim: int = 256
    n_layers: int = 6
    n_heads: int = 16
    n_kv_heads: Optional[int] = None  # None: same as n_heads (plain multi-head attention)
    vocab_size: int = -1  # -1: taken from the tokenizer
    multiple_of: int = 256  # FFN hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    # Llama 3.1 RoPE frequency scaling; disabled when rope_scaling_factor is None.
    rope_scaling_factor: Optional[float] = None
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 8192
    tie_embeddings: bool = False
    init_std: float = 0.02
    # The context the model is made for (exported as HF max_position_embeddings); None: training.seq_len.
    context_len: Optional[int] = None
    # Model family (titan.models.registry): which module, TP plan, HF adapter and counts.
    family: str = "llama3"
    head_dim: Optional[int] = None  # None: dim // n_heads (Qwen3 sets it explicitly)
    ffn_hidden: Optional[int] = None  # explicit FFN hidden size; None: Llama's sizing rule
    qk_norm: bool = False  # RMSNorm of each query/key head before RoPE (Qwen3)
    moe: "MoEConfig" = field(default_factory=lambda: MoEConfig())
    mla: "MLAConfig" = field(default_factory=lambda: MLAConfig())


@dataclass
class MLAConfig:
    """Multi-head latent attention (family deepseek_v3; titan.models.qwen3.mla); kv_lora_rank=0: off."""

    kv_lora_rank: int = 0  # rank of the key/value latent
    q_lora_rank: int = 0  # 0: queries by one full projection
    qk_nope_head_dim: int = 128  # per-head query/key dims without position
    qk_rope_head_dim: int = 64  # rotary dims (one rotary key shared by the heads)
    v_head_dim: int = 128


class RouterScore(str, Enum):
    softmax = "softmax"  # Qwen3-MoE, Mixtral
    sigmoid = "sigmoid"  # DeepSeek-V3


@dataclass
class MoEConfig:
    """Mixture-of-experts feed-forward (titan.models.moe); num_experts=0: dense model."""

    num_experts: int = 0
    top_k: int = 2
    expert_hidden: int = 0  # hidden size of one routed expert
    n_shared_experts: int = 0  # always-on experts (DeepSeek), summed with the routed output
    score: RouterScore = RouterScore.softmax
    norm_topk: bool = True  # renormalise the k selected weights to sum to 1
    route_scale: float = 1.0  # multiplies the routing weights (DeepSeek-V3: 2.5)
    aux_loss_coef: float = 0.0  # load-balancing loss (Switch / Qwen3-MoE), added to the training loss
    bias_update_rate: float = 0.0  # aux-loss-free balancing (DeepSeek-V3); 0 disables it
    n_dense_layers: int = 0  # the first layers keep a dense FFN (DeepSeek-V3: 3)
    grouped_mm: bool = True  # torch._grouped_mm for the experts; false: a loop over experts


# ---------------------------------------------------------------------------------------------
# parallel
# ---------------------------------------------------------------------------------------------
class ReshardAfterForward(str, Enum):
    default = "default"  # reshard every block except the last (its params are needed next)
    always = "always"
    never = "never"  # ZeRO-2-like: keep gathered params until backward


class Launcher(str, Enum):
    auto = "auto"  # env from torchrun/srun if present, else self-launch nproc_per_node workers
    spawn = "spawn"  # always self-launch (elastic agent, spawn start method)
    env = "env"  # this process is one rank; rank/world size come from the environment


class CPMode(str, Enum):
    allgather = "allgather"
    ring = "ring"


class PipelineSchedule(str, Enum):
    GPipe = "GPipe"
    OneFOneB = "1F1B"
    Interleaved1F1B = "Interleaved1F1B"
    LoopedBFS = "LoopedBFS"
    InterleavedZeroBubble = "InterleavedZeroBubble"
    ZBVZeroBubble = "ZBVZeroBubble"
    DualPipeV = "DualPipeV"


@dataclass
class ParallelConfig:
    name: str = "single"
    nproc_per_node: int = 1
    launcher: Launcher = Launcher.auto
    backend: Optional[str] = None  # None: nccl on CUDA, gloo on CPU
    timeout_s: int = 300  # collective timeout; a dead peer ends the job after this
    # Mesh degrees; -1 means "whatever is left of the world size" (at most one may be -1).
    dp_replicate: int = 1
    dp_shard: int = -1
    cp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1  # expert parallel: borrowed from dp_shard (ep must divide it); MoE models only
    # FSDP2
    fsdp: bool = True  # shard with fully_shard over dp_shard (False with dp_shard=1 => DDP)
    reshard_after_forward: ReshardAfterForward = ReshardAfterForward.default
    cpu_offload: bool = False  # FSDP2 keeps sharded params, grads and optimizer state in CPU memory
    # Tensor parallel
    sequence_parallel: bool = True
    loss_parallel: bool = True
    async_tp: bool = False  # CUDA + NCCL only (symmetric memory)
    # Context parallel: K/V all-gathered per layer (fast) or passed around a ring (less memory).
    cp_mode: CPMode = CPMode.allgather
    # Pipeline parallel
    # A PipelineSchedule value (a string: "1F1B" is no Python name, and OmegaConf matches enums by name).
    pp_schedule: str = PipelineSchedule.OneFOneB.value
    pp_microbatches: int = -1  # -1: one per stage... resolved as max(pp stages, 1)
    pp_virtual_stages: int = 1  # stages per rank (2+ for interleaved / V schedules)
    pp_layers_per_stage: Optional[list[int]] = None  # explicit split; None: even split


# ---------------------------------------------------------------------------------------------
# precision
# ---------------------------------------------------------------------------------------------
class Float8Recipe(str, Enum):
    none = "none"
    tensorwise = "tensorwise"
    rowwise = "rowwise"
    rowwise_with_gw_hp = "rowwise_with_gw_hp"
    mxfp8 = "mxfp8"
    mxfp8_emulated = "mxfp8_emulated"


@dataclass
class PrecisionConfig:
    name: str = "fp32"
    param_dtype: DType = DType.float32  # compute dtype of params (FSDP param_dtype / autocast)
    reduce_dtype: DType = DType.float32  # gradient reduction dtype
    float8: Float8Recipe = Float8Recipe.none
    float8_min_dim: int = 16  # skip linears with a dim below this (or not divisible by 16)
    fsdp_float8_all_gather: bool = True  # tensorwise only: all-gather weights in float8
    optim_state_dtype: DType = DType.float32  # bfloat16: stochastic-rounded bf16 states


# ---------------------------------------------------------------------------------------------
# compile / activation checkpointing
# ---------------------------------------------------------------------------------------------
class CompileMode(str, Enum):
    off = "off"
    block = "block"  # each transformer block compiled (one graph reused by identical blocks)
    model = "model"  # the whole model as one graph


@dataclass
class CompileConfig:
    mode: CompileMode = CompileMode.off
    loss: bool = False  # compile the loss function (independent of `mode`)
    backend: str = "inductor"


class ACMode(str, Enum):
    none = "none"
    full = "full"  # every block
    selective_layer = "selective_layer"  # every `every`-th block
    selective_op = "selective_op"  # save matmul outputs, recompute the rest


@dataclass
class ActivationCheckpointConfig:
    mode: ACMode = ACMode.none
    every: int = 2  # selective_layer: checkpoint every k-th block


# ---------------------------------------------------------------------------------------------
# optimizer and schedule
# ---------------------------------------------------------------------------------------------
class OptimName(str, Enum):
    adamw = "adamw"
    adam = "adam"
    sgd = "sgd"


@dataclass
class OptimConfig:
    name: OptimName = OptimName.adamw
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    momentum: float = 0.9  # sgd only
    # Norm weights, biases and embeddings are not decayed unless this is true.
    decay_norms_and_embeddings: bool = False
    max_norm: float = 1.0  # gradient clipping; <= 0 disables
    fused: Optional[bool] = None  # None: torch's default


class LRScheduleName(str, Enum):
    wsd = "wsd"  # warmup-stable-decay
    cosine = "cosine"
    linear = "linear"
    constant = "constant"


@dataclass
class LRScheduleConfig:
    name: LRScheduleName = LRScheduleName.wsd
    warmup_steps: int = 20
    decay_fraction: float = 0.2  # wsd: last fraction of steps spent decaying
    min_lr_factor: float = 0.1  # final LR = lr * min_lr_factor


# ---------------------------------------------------------------------------------------------
# data and tokenizer
# ---------------------------------------------------------------------------------------------
class DataSource(str, Enum):
    embedded = "embedded"  # Python's own sources and pydoc topics: no download
    files = "files"  # local .txt / .jsonl / .parquet by glob
    hf = "hf"  # Hugging Face `datasets` by name (streaming)
    tokens = "tokens"  # a token store written by `python -m titan.tools.prepare_data`


@dataclass
class MixSource:
    """One source of a data mixture (`data.mix`): a corpus like DataConfig's, and its weight."""

    name: Optional[str] = None  # metrics key (tokens_seen/NAME); default source0, source1, ...
    weight: float = 1.0  # relative share of the training windows
    source: DataSource = DataSource.tokens
    path: Optional[str] = None
    hf_config: Optional[str] = None
    hf_split: str = "train"
    text_field: str = "text"
    val_fraction: float = 0.05  # on-the-fly sources (a store's split is its own)
    max_documents: Optional[int] = None


class SFTFormat(str, Enum):
    auto = "auto"  # `messages` if present, else `prompt`/`response`
    messages = "messages"  # OpenAI-style [{"role": ..., "content": ...}, ...]
    prompt_response = "prompt_response"


class SFTPacking(str, Enum):
    pack = "pack"  # whole conversations packed into seq_len rows, attention masked per conversation
    pad = "pad"  # one conversation per row, padded to the longest in the micro-batch


class SFTOverflow(str, Enum):
    truncate = "truncate"  # cut conversations longer than seq_len + 1 tokens
    drop = "drop"  # skip them


@dataclass
class DataConfig:
    source: DataSource = DataSource.embedded
    path: Optional[str] = None  # files: a glob; hf: dataset name or local data files
    hf_config: Optional[str] = None
    hf_split: str = "train"
    text_field: str = "text"
    val_fraction: float = 0.05  # share of documents held out for validation
    max_documents: Optional[int] = None  # cap (quick experiments)
    shuffle: bool = True  # false: documents (token store: windows) in source order every epoch
    prefetch: int = 2  # global batches produced ahead in a background thread; 0: in the step
    mix: list[MixSource] = field(default_factory=list)  # non-empty: a weighted mixture (docs/data.md)
    # Packed documents attend only within themselves; RoPE positions restart per document.
    document_mask: bool = False
    # task=sft: conversations (titan/data/sft.py)
    sft_format: SFTFormat = SFTFormat.auto
    sft_packing: SFTPacking = SFTPacking.pack
    sft_overflow: SFTOverflow = SFTOverflow.truncate
    chat_template: Optional[str] = None  # None: the tokenizer's, else built-in; "llama3"; or a .jinja file


class TokenizerKind(str, Enum):
    default = "default"  # sentencepiece model trained on the embedded corpus, cached
    sentencepiece = "sentencepiece"
    tiktoken = "tiktoken"  # tiktoken-style BPE file (Llama 3 format)
    hf = "hf"  # a Hugging Face tokenizer.json (file, or the directory holding it)


@dataclass
class TokenizerConfig:
    kind: TokenizerKind = TokenizerKind.default
    path: Optional[str] = None
    vocab_size: int = 2048  # default kind only
    cache_dir: Optional[str] = None  # default kind: where the trained model is cached


# ---------------------------------------------------------------------------------------------
# logging, checkpointing, profiling
# ---------------------------------------------------------------------------------------------
class LogBackend(str, Enum):
    none = "none"  # console + metrics.jsonl
    wandb = "wandb"
    tensorboard = "tensorboard"


@dataclass
class LoggingConfig:
    backend: LogBackend = LogBackend.none
    interval: int = 10  # steps between metric records
    project: str = "titan"
    entity: Optional[str] = None
    group: Optional[str] = None  # None: the sweep (multirun) name, if any
    name: Optional[str] = None  # None: derived from the overrides
    mode: Optional[str] = None  # None: online with a key, else offline
    tags: list[str] = field(default_factory=list)
    peak_tflops: Optional[float] = None  # per-device peak for MFU; None: table or measured


class AsyncMode(str, Enum):
    off = "off"
    thread = "thread"
    process = "process"


class ExportDtype(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


@dataclass
class CheckpointConfig:
    interval: int = 0  # steps between saves; 0: only the final save (save_final)
    keep_last_k: int = 2  # 0 keeps all
    resume: str = "auto"  # auto | none | PATH
    async_mode: AsyncMode = AsyncMode.off
    save_final: bool = True  # save at the last step (also with interval=0); false: not
    initial_load: Optional[str] = None  # weights at step 0: hf:PATH, a DCP/seed dir or a run dir
    export_hf: bool = False  # write the final weights in Hugging Face format to RUN_DIR/hf
    export_dtype: ExportDtype = ExportDtype.float32  # dtype of the RUN_DIR/hf weights
    create_seed: bool = False  # write initialised step-0 weights to RUN_DIR/seed and exit


class NanCheck(str, Enum):
    off = "off"  # train on regardless
    stop = "stop"  # stop the run naming the step; no checkpoint is written after it
    skip = "skip"  # drop that step's update and go on


@dataclass
class ProfilingConfig:
    trace_interval: int = 0  # every N steps record a torch.profiler trace; 0: off
    trace_steps: int = 2
    memory_record: bool = False  # per-step memory record (CPU RSS / CUDA snapshot)
    flight_recorder: bool = False  # NCCL flight recorder
    nan_check: NanCheck = NanCheck.stop  # a non-finite loss or gradient norm


# ---------------------------------------------------------------------------------------------
# fault tolerance
# ---------------------------------------------------------------------------------------------
class SemiSync(str, Enum):
    none = "none"  # every step: gradients averaged across replica groups
    local_sgd = "local_sgd"  # every sync_every steps: weights averaged (torchft LocalSGD)
    diloco = "diloco"  # every sync_every steps: an outer optimizer step on the averaged weight delta (torchft DiLoCo)


@dataclass
class FaultToleranceConfig:
    """torchft: replica groups (each a whole copy of the layout) average gradients through a
    Manager that tolerates a group dying; a restarted group heals from a live peer's state."""

    enabled: bool = False
    replica_groups: int = 2  # groups in the job; the global batch is split over all of them
    group_id: int = 0  # this process's group: set by the self-launcher, or per torchrun job
    lighthouse: Optional[str] = None  # http://host:port; None: $TORCHFT_LIGHTHOUSE, or self-launch starts one
    min_replicas: int = 1  # groups that must be alive to commit a step
    max_restarts: int = 3  # self-launch: times a failed group is restarted
    timeout_s: int = 60  # quorum and cross-group collective timeout
    # Semi-synchronous training across groups (docs/scale-out.md): synchronous inside a group,
    # across groups only every sync_every steps.
    semi_sync: SemiSync = SemiSync.none
    sync_every: int = 100  # inner steps between cross-group syncs (H)
    outer_lr: float = 0.7  # diloco: outer SGD (the DiLoCo paper's defaults)
    outer_momentum: float = 0.9
    outer_nesterov: bool = True


# ---------------------------------------------------------------------------------------------
# training and root
# ---------------------------------------------------------------------------------------------
@dataclass
class EvalConfig:
    """Downstream evaluation with lm-evaluation-harness (titan/eval/): in the training loop every
    `interval` steps, and by `python -m titan.tools.eval`. titan's local tasks
    (titan/eval/tasks/) are always found; `include_path` adds more task YAML dirs."""

    interval: int = 0  # steps between in-loop evaluations (and the last step); 0: off
    tasks: list[str] = field(default_factory=list)
    limit: Optional[int] = None  # examples per task (None: all)
    num_fewshot: Optional[int] = None  # None: each task's default
    batch_size: int = 8  # sequences per forward, per data-parallel rank
    max_gen_tokens: int = 64  # cap on tokens generated per request (generate_until tasks)
    include_path: Optional[str] = None
    seed: int = 1234  # lm-eval's few-shot sampling seed


@dataclass
class SpikeGuardConfig:
    """Skip the update of a step whose loss or grad norm is above mean + sigmas x std of the
    last `window` accepted steps (titan/train/spike_guard.py)."""

    enabled: bool = False
    window: int = 50  # accepted steps the mean and std are taken over
    sigmas: float = 6.0  # how many standard deviations above the mean is a spike
    min_history: int = 20  # accepted steps before the guard judges at all
    max_consecutive: int = 5  # after this many skips in a row, accept the step as the new level
    watch: list[str] = field(default_factory=lambda: ["loss", "grad_norm"])


@dataclass
class TrainingConfig:
    steps: int = 300
    seq_len: int = 256
    global_batch_size: int = 8  # sequences per optimizer step, whole job
    # Sequences per forward, per data-parallel rank; the rest of the global batch is gradient
    # accumulation. -1: global_batch_size / data-parallel degree (no accumulation).
    micro_batch_size: int = -1
    seed: int = 42
    dry_run: bool = False  # build on the meta device, print size and FLOPs, exit
    device: Device = Device.auto
    deterministic: bool = False  # torch.use_deterministic_algorithms
    val_interval: int = 100  # 0 disables validation
    val_batches: int = 4
    threads: Optional[int] = None  # torch intra-op threads per rank on CPU; None: auto
    spike_guard: SpikeGuardConfig = field(default_factory=SpikeGuardConfig)


class Task(str, Enum):
    pretrain = "pretrain"  # next-token loss on every token of packed documents
    sft = "sft"  # conversations; loss on assistant tokens only


@dataclass
class TaskConfig:
    name: Task = Task.pretrain


class FinetuneMethod(str, Enum):
    full = "full"  # every weight trains
    lora = "lora"  # base weights frozen; low-rank adapters on target_modules train


@dataclass
class FinetuneConfig:
    method: FinetuneMethod = FinetuneMethod.full
    rank: int = 8
    alpha: float = 16.0  # adapter output scaled by alpha / rank
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["wq", "wk", "wv", "wo"])


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)
    activation_checkpoint: ActivationCheckpointConfig = field(
        default_factory=ActivationCheckpointConfig
    )
    optim: OptimConfig = field(default_factory=OptimConfig)
    lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    profiling: ProfilingConfig = field(default_factory=ProfilingConfig)
    fault_tolerance: FaultToleranceConfig = field(default_factory=FaultToleranceConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Filled by the launcher, not by users: where this run writes, and Hydra's group choices.
    run_dir: str = "outputs/run"
    choices: dict[str, Any] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    sweep_name: Optional[str] = None
