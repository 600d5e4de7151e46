"""Checks that a typed config can work, before anything is built or launched.

Each problem raises one ConfigError naming the key and the fix. Layout and precision checks
live next to the code they protect (titan/parallel, titan/precision) and are called from here.
"""

from __future__ import annotations

import logging
from pathlib import Path

from titan.config.errors import ConfigError
from titan.config.schema import DataSource, FinetuneMethod, LogBackend, PipelineSchedule, SFTPacking, Task, TokenizerKind, TrainConfig


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def validate_model(cfg: TrainConfig) -> None:
    m = cfg.model
    _require(m.dim > 0 and m.n_layers > 0 and m.n_heads > 0, "model", "dim, n_layers and n_heads must be positive")
    if m.head_dim is None:  # derived from dim
        _require(m.dim % m.n_heads == 0, "model.n_heads", f"n_heads={m.n_heads} must divide dim={m.dim}")
        _require((m.dim // m.n_heads) % 2 == 0, "model.n_heads", f"head_dim={m.dim // m.n_heads} must be even for RoPE")
    else:
        _require(m.head_dim > 0 and m.head_dim % 2 == 0, "model.head_dim", f"{m.head_dim} must be positive and even for RoPE")
    kv = m.n_kv_heads or m.n_heads
    _require(kv > 0 and m.n_heads % kv == 0, "model.n_kv_heads", f"n_kv_heads={kv} must divide n_heads={m.n_heads}")
    _require(m.vocab_size == -1 or m.vocab_size > 0, "model.vocab_size", "must be positive, or -1 to take it from the tokenizer")
    _require(m.multiple_of > 0, "model.multiple_of", "must be positive")
    _require(m.context_len is None or m.context_len > 0, "model.context_len", "must be positive, or null for training.seq_len")
    from titan.models.registry import get_family

    family = get_family(m.family)  # an unknown family names model.family and the known ones
    if family.validate is not None:
        family.validate(m)


def validate_family_layout(cfg: TrainConfig, world_size: int) -> None:
    """Refuse parallel dims the model family has no plan for."""
    from titan.models.registry import get_family
    from titan.parallel.mesh import resolve_degrees

    family = get_family(cfg.model.family)
    degrees = {**resolve_degrees(cfg.parallel, world_size), "ep": cfg.parallel.ep}
    for dim, degree in degrees.items():
        _require(
            degree == 1 or dim in family.parallel_dims,
            f"parallel.{dim}",
            f"model family {family.name} does not support {dim} > 1 yet (it supports {', '.join(sorted(family.parallel_dims))}); set parallel.{dim}=1",
        )


def validate_training(cfg: TrainConfig) -> None:
    t = cfg.training
    _require(t.steps > 0, "training.steps", "must be positive")
    _require(t.seq_len > 0, "training.seq_len", "must be positive")
    _require(t.micro_batch_size > 0, "training.micro_batch_size", "must be positive")
    _require(
        t.global_batch_size > 0 and t.global_batch_size % t.micro_batch_size == 0,
        "training.global_batch_size",
        f"{t.global_batch_size} must be a positive multiple of training.micro_batch_size={t.micro_batch_size}",
    )
    _require(t.val_interval >= 0, "training.val_interval", "must be >= 0 (0 disables validation)")
    _require(t.val_batches > 0, "training.val_batches", "must be positive")
    _require(cfg.logging.interval > 0, "logging.interval", "must be positive")
    g = t.spike_guard
    _require(g.window >= 2, "training.spike_guard.window", "must be >= 2 (a standard deviation needs two steps)")
    _require(g.sigmas > 0, "training.spike_guard.sigmas", "must be positive")
    _require(g.max_consecutive >= 1, "training.spike_guard.max_consecutive", "must be >= 1")
    bad = [w for w in g.watch if w not in ("loss", "grad_norm")]
    _require(bool(g.watch) and not bad, "training.spike_guard.watch", f"{bad or 'empty'}: a list of loss and/or grad_norm")


def validate_optim(cfg: TrainConfig) -> None:
    o, s = cfg.optim, cfg.lr_schedule
    _require(o.lr > 0, "optim.lr", "must be positive")
    _require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", "two values in [0, 1)")
    _require(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _require(s.warmup_steps >= 0, "lr_schedule.warmup_steps", "must be >= 0")
    if s.warmup_steps >= cfg.training.steps > 0:  # a short smoke run under the default warmup
        clamped = cfg.training.steps // 5
        logging.getLogger("titan").warning(
            "lr_schedule.warmup_steps=%d is not shorter than training.steps=%d: warming up over %d step(s) instead",
            s.warmup_steps, cfg.training.steps, clamped,
        )
        s.warmup_steps = clamped
    _require(0 <= s.min_lr_factor <= 1, "lr_schedule.min_lr_factor", "must be in [0, 1]")
    _require(0 <= s.decay_fraction <= 1, "lr_schedule.decay_fraction", "must be in [0, 1]")


def validate_data(cfg: TrainConfig) -> None:
    d, tok = cfg.data, cfg.tokenizer
    if d.source in (DataSource.files, DataSource.hf):
        _require(bool(d.path), "data.path", f"data.source={d.source.value} needs data.path (a glob or dataset name)")
    if d.source is DataSource.tokens:
        from titan.data.store import TokenStore

        val = TokenStore.open(d.path).manifest["splits"].get("val") or {"tokens": 0}
        _require(not (cfg.training.val_interval and not val["tokens"] and not d.mix), "data.path",
                 f"the token store {d.path} has no validation split; set training.val_interval=0 "
                 "or prepare it with data.val_fraction > 0")
    _require(0 <= d.val_fraction < 1, "data.val_fraction", "must be in [0, 1) (0: no validation)")
    if d.val_fraction == 0 and cfg.training.val_interval > 0:  # nothing held out: nothing to validate on
        cfg.training.val_interval = 0
    if tok.kind is not TokenizerKind.default:
        _require(bool(tok.path), "tokenizer.path", f"tokenizer.kind={tok.kind.value} needs tokenizer.path")
        found = Path(tok.path).expanduser()
        found = found / "tokenizer.json" if tok.kind is TokenizerKind.hf and found.is_dir() else found
        _require(found.is_file(), "tokenizer.path", f"no such file: {found}")
    else:
        _require(tok.vocab_size >= 512, "tokenizer.vocab_size", "must be >= 512 (256 byte pieces, specials and merges)")


def validate_logging(cfg: TrainConfig) -> None:
    if cfg.logging.backend is LogBackend.tensorboard:
        try:
            import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
        except ImportError:
            raise ConfigError("logging", "logging=tensorboard needs the tensorboard package: pip install tensorboard "
                              "(or use logging=none / logging=wandb)") from None


def validate_document_mask(cfg: TrainConfig, world_size: int) -> None:
    """Document masking (data.document_mask, or SFT packing, which always masks) is implemented
    for every layout but context parallelism, whose attention is its own kernel."""
    masked = cfg.data.document_mask or (cfg.task.name is Task.sft and cfg.data.sft_packing is SFTPacking.pack)
    if not masked:
        return
    from titan.parallel.mesh import resolve_degrees

    _require(
        resolve_degrees(cfg.parallel, world_size)["cp"] == 1,
        "data.document_mask" if cfg.data.document_mask else "data.sft_packing",
        "document masking is not supported with context parallelism (parallel.cp > 1); use cp=1, or "
        "data.document_mask=false (task=sft: data.sft_packing=pad)",
    )


def validate_finetune(cfg: TrainConfig, world_size: int) -> None:
    f = cfg.finetune
    if f.method is not FinetuneMethod.lora:
        return
    _require(f.rank >= 1, "finetune.rank", f"must be >= 1, got {f.rank}")
    _require(0 <= f.dropout < 1, "finetune.dropout", "must be in [0, 1)")
    _require(bool(f.target_modules), "finetune.target_modules", "name at least one linear, e.g. [wq, wv]")
    from titan.parallel.mesh import resolve_degrees

    degrees = resolve_degrees(cfg.parallel, world_size)
    _require(
        degrees["cp"] == 1,
        "parallel.cp",
        "finetune=lora runs with data, tensor and pipeline parallelism (ddp, fsdp, hsdp, tp, pp); set parallel.cp=1 or finetune=full",
    )


def validate_eval(cfg: TrainConfig) -> None:
    e = cfg.eval
    _require(e.interval >= 0, "eval.interval", "must be >= 0 (0 disables in-loop evaluation)")
    _require(not e.interval or bool(e.tasks), "eval.tasks", "eval.interval is set but no tasks are named; e.g. eval.tasks=[titan_choice,titan_copy]")
    _require(e.limit is None or e.limit > 0, "eval.limit", "must be positive (or null for every example)")
    _require(e.batch_size > 0, "eval.batch_size", "must be positive")
    _require(e.max_gen_tokens > 0, "eval.max_gen_tokens", "must be positive")
    if e.interval:
        import importlib.util

        _require(importlib.util.find_spec("lm_eval") is not None, "eval.interval",
                 "in-loop evaluation needs lm-evaluation-harness: pip install 'titan[eval]' (or set eval.interval=0)")
        _require(cfg.parallel.cp == 1, "eval.interval", "in-loop evaluation runs whole sequences; it needs parallel.cp=1 "
                 "(evaluate the checkpoints with python -m titan.tools.eval)")
        _require(cfg.parallel.pp == 1, "eval.interval", "in-loop evaluation needs the whole model on each rank group (parallel.pp=1); "
                 "evaluate a checkpoint with python -m titan.tools.eval instead")


def validate_parallel_names(cfg: TrainConfig) -> None:
    names = [s.value for s in PipelineSchedule]
    _require(cfg.parallel.pp_schedule in names, "parallel.pp_schedule", f"{cfg.parallel.pp_schedule!r} is not one of {', '.join(names)}")


def validate_checkpoint(cfg: TrainConfig) -> None:
    c = cfg.checkpoint
    _require(c.interval >= 0, "checkpoint.interval", "must be >= 0 (0: only the final save, see checkpoint.save_final)")
    _require(c.keep_last_k >= 0, "checkpoint.keep_last_k", "must be >= 0 (0 keeps all)")
    if cfg.parallel.pp > 1:  # each pipeline rank holds only its stages' weights
        for key, on in (("export_hf", c.export_hf), ("create_seed", c.create_seed), ("initial_load", c.initial_load)):
            _require(
                not on,
                f"checkpoint.{key}",
                "needs the whole model on one rank, which pipeline parallelism does not have; run it with "
                "parallel.pp=1, or convert the run's checkpoint offline with python -m titan.tools.convert",
            )
    if c.initial_load:
        spec = c.initial_load
        if spec.startswith("hf:"):
            _require(
                (Path(spec[3:]) / "config.json").is_file(),
                "checkpoint.initial_load",
                f"no Hugging Face model directory at {spec[3:]} (it needs config.json and *.safetensors); "
                "give hf:DIR of a downloaded model",
            )
        else:
            _require(Path(spec).exists(), "checkpoint.initial_load", f"no checkpoint, seed or run directory at {spec}; "
                     "give a DCP checkpoint dir, a run dir, or hf:DIR")
    if c.initial_load and c.initial_load.startswith("hf:"):  # its config.json vs model.*
        from titan.interop.compat import check_hf_initial_load

        check_hf_initial_load(c.initial_load, cfg.model, cfg.training.seq_len)
    elif c.initial_load:  # the config it was trained with vs model.*
        from titan.interop.compat import check_dcp_initial_load

        check_dcp_initial_load(c.initial_load, cfg.model, cfg.training.seq_len)
    if c.resume not in ("auto", "none"):
        _require(Path(c.resume).is_dir(), "checkpoint.resume", f"no checkpoint directory at {c.resume}; use auto, none or a path")


def resolve_micro_batch(cfg: TrainConfig, world_size: int) -> None:
    """micro_batch_size=-1 means each data-parallel rank runs its whole share in one forward."""
    t = cfg.training
    if t.micro_batch_size != -1:
        return
    from titan.parallel.mesh import resolve_degrees

    from titan.fault_tolerance import replica_groups

    degrees = resolve_degrees(cfg.parallel, world_size)
    # Fault-tolerant replica groups split the global batch like data-parallel ranks.
    dp = degrees["dp_replicate"] * degrees["dp_shard"] * replica_groups(cfg)
    _require(
        t.global_batch_size % dp == 0,
        "training.global_batch_size",
        f"{t.global_batch_size} sequences do not split evenly over {dp} data-parallel ranks; use a multiple of {dp}",
    )
    t.micro_batch_size = t.global_batch_size // dp


def validate(cfg: TrainConfig, world_size: int) -> None:
    """Everything that can be checked without building the model (resolves micro_batch_size=-1)."""
    _require(cfg.parallel.nproc_per_node >= 1, "parallel.nproc_per_node", "must be >= 1 (worker processes to start on this machine)")
    _require(world_size >= 1, "parallel.nproc_per_node", f"the job has {world_size} processes; it needs at least 1")
    resolve_micro_batch(cfg, world_size)
    validate_model(cfg)
    validate_training(cfg)
    validate_optim(cfg)
    validate_data(cfg)
    validate_checkpoint(cfg)
    validate_logging(cfg)
    validate_parallel_names(cfg)
    validate_family_layout(cfg, world_size)
    validate_document_mask(cfg, world_size)
    validate_finetune(cfg, world_size)
    validate_eval(cfg)
    from titan.fault_tolerance import validate_fault_tolerance
    from titan.parallel.mesh import validate_layout
    from titan.precision import validate_precision

    validate_layout(cfg, world_size)
    validate_precision(cfg)
    validate_fault_tolerance(cfg)
