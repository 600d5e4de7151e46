"""What a run is about to do, printed once by rank 0 before step 1 (start-up summary), and what
to do with it afterwards (closing hints): the commands that make sense next, this run's path
filled in."""

from __future__ import annotations

import os
import shlex
import time
from pathlib import Path
from typing import Any, Optional

from titan.config.schema import TrainConfig


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n))


def _layout(cfg: TrainConfig, degrees: dict[str, int], world: int) -> str:
    used = ", ".join(f"{dim} {d}" for dim, d in degrees.items() if d > 1) or "no parallelism"
    procs = "process" if world == 1 else "processes"
    return f"{cfg.choices.get('parallel', cfg.parallel.name)} ({used}) on {world} {procs}"


def _data(cfg: TrainConfig) -> str:
    d = cfg.data
    where = {"embedded": "Python's own sources and docs (ships with Python)"}.get(d.source.value, d.path or "?")
    if d.source.value == "hf" and d.hf_config:
        where += f" ({d.hf_config}, split {d.hf_split})"
    held = f"{d.val_fraction:.0%} held out for validation" if cfg.training.val_interval and d.val_fraction else "no validation"
    cap = f", first {d.max_documents} documents" if d.max_documents else ""
    if cfg.task.name.value == "sft":  # conversations, loss on the assistant's tokens only
        where = d.path or "question/answer pairs from the standard library's docstrings (embedded)"
        packing = "packed" if d.sft_packing.value == "pack" else "padded"
        return f"sft conversations: {where}, {packing}; {held} (conversations)"
    return f"{d.source.value}: {where}{cap}; {held}"


def _tokenizer(cfg: TrainConfig, tokenizer: Any) -> str:
    t = cfg.tokenizer
    path = getattr(tokenizer, "path", None) or t.path
    text = f"{t.kind.value}, vocab {tokenizer.vocab_size}"
    if path and os.path.exists(path):
        age = time.time() - os.path.getmtime(path)
        if t.kind.value == "default":
            text += f", trained {age:.0f} s ago on first use" if age < 600 else ", from the cache"
        text += f" ({path})"
    return text


def _replicas(cfg: TrainConfig) -> str:
    ft = cfg.fault_tolerance
    text = f"group {ft.group_id} of {ft.replica_groups} (torchft), "
    if ft.semi_sync.value == "none":
        return text + "gradients averaged across groups every step"
    text += f"{ft.semi_sync.value} across groups every {ft.sync_every} steps"
    if ft.semi_sync.value == "diloco":
        text += f" (outer SGD lr {ft.outer_lr:g}, momentum {ft.outer_momentum:g}{', Nesterov' if ft.outer_nesterov else ''})"
    return text


def startup_summary(cfg: TrainConfig, c: Any, world_size: int, device: Any, resume: Optional[Path]) -> str:
    """At most one screen: model, layout, device and precision, tokens per step, data and
    tokenizer, run dir, resume. `c` is the built `Components`."""
    t = cfg.training
    dp = c.parallel.dp_world
    micro = t.micro_batch_size if t.micro_batch_size > 0 else t.global_batch_size // dp
    tokens = t.global_batch_size * t.seq_len
    if resume is not None:
        start = f"resumes from {resume} at step {c.state.step}"
    elif cfg.checkpoint.initial_load:
        start = f"starts from the weights in {cfg.checkpoint.initial_load}"
    else:
        start = f"starts from scratch (seed {t.seed})"
    extras = [f"compile={cfg.compile.mode.value}" if cfg.compile.mode.value != "off" else "",
              f"activation_checkpoint={cfg.activation_checkpoint.mode.value}" if cfg.activation_checkpoint.mode.value != "none" else ""]
    rows = [
        ("model", f"{cfg.choices.get('model', cfg.model.name)}: {_count(c.n_params)} parameters "
                  f"(dim {c.args.dim}, {c.args.n_layers} layers), {_count(c.flops_per_token)} FLOP/token"),
        ("layout", _layout(cfg, dict(c.parallel.degrees), world_size)),
        ("device", f"{device.type}, precision {cfg.precision.name}" + "".join(f", {e}" for e in extras if e)),
        ("batch", f"{tokens:,} tokens per step = {t.global_batch_size} sequences x {t.seq_len} tokens "
                  f"(micro-batch {micro} x {c.accum_steps} accumulation x {dp} data-parallel)"),
        ("steps", f"{t.steps} ({_count(tokens * t.steps)} tokens), optimizer {cfg.optim.name.value} lr {cfg.optim.lr:g}"),
        ("data", _data(cfg)),
        ("tokenizer", _tokenizer(cfg, c.tokenizer)),
        ("run dir", str(cfg.run_dir)),
        ("start", start),
    ]
    if cfg.fault_tolerance.enabled:
        rows.insert(2, ("replicas", _replicas(cfg)))
    if cfg.compile.mode.value != "off":
        rows.append(("note", "the first step compiles the model (on a CPU tens of seconds)"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(["titan run"] + [f"  {k:<{width}}  {v}" for k, v in rows])


def next_commands(cfg: TrainConfig, checkpoint_saved: bool) -> str:
    """Closing hints: sample, export, compare, with this run's path (quoted for a shell)."""
    run = shlex.quote(str(cfg.run_dir))
    if not checkpoint_saved:
        return ("next: no checkpoint was saved (checkpoint.save_final=false); "
                f"compare the loss curve with: python -m titan.tools.compare {run}")
    return "\n".join([
        "next:",
        f"  python -m titan.tools.generate checkpoint={run} prompt='def '   # sample from it",
        f"  python -m titan.tools.convert {run} {shlex.quote(str(Path(cfg.run_dir) / 'hf'))} --to hf   # export for transformers",
        f"  python -m titan.tools.compare {run}   # loss curves (add more run dirs to compare)",
    ])
