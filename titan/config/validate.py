"""Checks that a typed config can work, before anything is built or launched.

Each problem raises one ConfigError naming the key and the fix. Layout and precision checks
live next to the code they protect (titan/parallel, titan/precision) and are called from here.
"""

from __future__ import annotations

from pathlib import Path

from titan.config.errors import ConfigError
from titan.config.schema import DataSource, PipelineSchedule, TokenizerKind, TrainConfig


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def validate_model(cfg: TrainConfig) -> None:
    m = cfg.model
    _require(m.dim > 0 and m.n_layers > 0 and m.n_heads > 0, "model", "dim, n_layers and n_heads must be positive")
    _require(m.dim % m.n_heads == 0, "model.n_heads", f"n_heads={m.n_heads} must divide dim={m.dim}")
    _require((m.dim // m.n_heads) % 2 == 0, "model.n_heads", f"head_dim={m.dim // m.n_heads} must be even for RoPE")
    kv = m.n_kv_heads or m.n_heads
    _require(kv > 0 and m.n_heads % kv == 0, "model.n_kv_heads", f"n_kv_heads={kv} must divide n_heads={m.n_heads}")
    _require(m.vocab_size == -1 or m.vocab_size > 0, "model.vocab_size", "must be positive, or -1 to take it from the tokenizer")
    _require(m.multiple_of > 0, "model.multiple_of", "must be positive")


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
    _require(
        s.warmup_steps < cfg.training.steps,
        "lr_schedule.warmup_steps",
        f"warmup ({s.warmup_steps} steps) must be shorter than training.steps={cfg.training.steps}; "
        "lower lr_schedule.warmup_steps or raise training.steps",
    )
    _require(0 <= s.min_lr_factor <= 1, "lr_schedule.min_lr_factor", "must be in [0, 1]")
    _require(0 <= s.decay_fraction <= 1, "lr_schedule.decay_fraction", "must be in [0, 1]")


def validate_data(cfg: TrainConfig) -> None:
    d, tok = cfg.data, cfg.tokenizer
    if d.source in (DataSource.files, DataSource.hf):
        _require(bool(d.path), "data.path", f"data.source={d.source.value} needs data.path (a glob or dataset name)")
    _require(0 < d.val_fraction < 1, "data.val_fraction", "must be in (0, 1)")
    if tok.kind is not TokenizerKind.default:
        _require(bool(tok.path), "tokenizer.path", f"tokenizer.kind={tok.kind.value} needs tokenizer.path")
        _require(Path(tok.path).is_file(), "tokenizer.path", f"no such file: {tok.path}")
    else:
        _require(tok.vocab_size >= 512, "tokenizer.vocab_size", "must be >= 512 (256 byte pieces, specials and merges)")


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
    _require(c.interval >= 0, "checkpoint.interval", "must be >= 0 (0 disables saving)")
    _require(c.keep_last_k >= 0, "checkpoint.keep_last_k", "must be >= 0 (0 keeps all)")
    if cfg.parallel.pp > 1:  # each pipeline rank holds only its stages' weights
        for key, on in (("export_hf", c.export_hf), ("create_seed", c.create_seed), ("initial_load", c.initial_load)):
            _require(
                not on,
                f"checkpoint.{key}",
                "needs the whole model on one rank, which pipeline parallelism does not have; run it with "
                "parallel.pp=1, or convert the run's checkpoint offline with python -m titan.tools.convert",
            )
    if c.resume not in ("auto", "none"):
        _require(Path(c.resume).is_dir(), "checkpoint.resume", f"no checkpoint directory at {c.resume}; use auto, none or a path")


def resolve_micro_batch(cfg: TrainConfig, world_size: int) -> None:
    """micro_batch_size=-1 means each data-parallel rank runs its whole share in one forward."""
    t = cfg.training
    if t.micro_batch_size != -1:
        return
    from titan.parallel.mesh import resolve_degrees

    degrees = resolve_degrees(cfg.parallel, world_size)
    dp = degrees["dp_replicate"] * degrees["dp_shard"]
    _require(
        t.global_batch_size % dp == 0,
        "training.global_batch_size",
        f"{t.global_batch_size} sequences do not split evenly over {dp} data-parallel ranks; use a multiple of {dp}",
    )
    t.micro_batch_size = t.global_batch_size // dp


def validate(cfg: TrainConfig, world_size: int) -> None:
    """Everything that can be checked without building the model (resolves micro_batch_size=-1)."""
    resolve_micro_batch(cfg, world_size)
    validate_model(cfg)
    validate_training(cfg)
    validate_optim(cfg)
    validate_data(cfg)
    validate_checkpoint(cfg)
    validate_parallel_names(cfg)
    validate_eval(cfg)
    from titan.parallel.mesh import validate_layout
    from titan.precision import validate_precision

    validate_layout(cfg, world_size)
    validate_precision(cfg)
