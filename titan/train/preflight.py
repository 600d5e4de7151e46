"""Checks in the launching process, before any rank builds anything: say what is starting,
check that the tokenizer fits the model, and refuse a step that cannot fit in memory (the
planner's estimate against this machine), rather than run for minutes into an out-of-memory
kill."""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Optional

from titan.config.errors import ConfigError
from titan.config.schema import Device, TrainConfig

log = logging.getLogger("titan")
GIB = 1024**3


def check_vocab(cfg: TrainConfig, tokenizer_vocab: int) -> None:
    """An explicit model.vocab_size must hold every token id the tokenizer produces."""
    model_vocab = cfg.model.vocab_size
    if 0 < model_vocab < tokenizer_vocab:
        raise ConfigError(
            "model.vocab_size",
            f"{model_vocab} is smaller than the tokenizer's vocabulary ({tokenizer_vocab} ids): token ids would "
            f"index past the embedding; set model.vocab_size=-1 (take it from the tokenizer) or >= {tokenizer_vocab}",
        )


def _cgroup_limit() -> Optional[int]:
    """Memory left under this container's cgroup (v2) limit, if it has one."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((root / "memory.current").read_text())
    except (OSError, ValueError):
        return None


def available_cpu_memory() -> int:
    """Bytes of RAM a new run can use: MemAvailable, capped by a cgroup limit."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    limit = _cgroup_limit()
    return min(available, limit) if limit is not None else available


def memory_per_rank(device_type: str, local_ranks: int) -> tuple[int, str]:
    """(bytes one rank may use, what that is) on this machine."""
    if device_type == "cuda":
        import torch

        # Properties only (no allocation); this rank's own GPU under torchrun/srun.
        props = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        return props.total_memory, f"{props.name} memory"
    ram = available_cpu_memory()
    return ram // max(1, local_ranks), f"available RAM shared by {local_ranks} process(es)" if local_ranks > 1 else "available RAM"


def check_memory(cfg: TrainConfig, world_size: int, local_ranks: int, device_type: str) -> None:
    from titan.plan import plan

    budget, what = memory_per_rank(device_type, local_ranks)
    planned = copy.deepcopy(cfg)
    planned.training.device = Device(device_type)  # the planner counts CPU activations its own way
    try:
        estimate = plan(planned, world_size=world_size, device_memory_gib=budget / GIB, headroom=0.0)
    except ConfigError:
        raise
    except Exception as e:  # the estimate is advice: never stop a run because the planner failed
        log.warning("memory check skipped (the planner failed: %s: %s)", type(e).__name__, e)
        return
    worst = estimate.worst
    if worst.peak <= budget:
        return
    top = ", ".join(f"{name} {size / GIB:.2f} GiB" for name, size in worst.consumers()[:3] if size >= 0.01 * worst.peak)
    activations_first = worst.consumers()[0][0] in ("activations", "backward working set")
    key = "training.seq_len" if activations_first else "model"
    fix = (
        "lower training.seq_len or training.micro_batch_size, use activation_checkpoint=full, or shard over more ranks"
        if activations_first
        else "use a smaller model, or shard it over more ranks (parallel=fsdp parallel.nproc_per_node=N)"
    )
    raise ConfigError(
        key,
        f"one training step needs about {worst.peak / GIB:.2f} GiB per rank ({top}) but this machine has "
        f"{budget / GIB:.2f} GiB ({what}); {fix}; `python -m titan.tools.plan` with the same overrides shows the breakdown",
    )


def preflight(cfg: TrainConfig, world_size: int, local_ranks: int, announce: bool = True) -> None:
    from titan.data import build_tokenizer
    from titan.train.env import pick_device_type

    device_type = pick_device_type(cfg.training.device)
    if announce:
        log.info(
            "starting %s on %d %s process(es), run dir %s: building the model (the first step of a big config "
            "can take a while)", cfg.model.name, world_size, device_type.upper(), cfg.run_dir,
        )
    tokenizer = build_tokenizer(cfg.tokenizer)  # trains/caches the default tokenizer once, before the ranks start
    check_vocab(cfg, tokenizer.vocab_size)
    if not cfg.checkpoint.create_seed:  # a seed checkpoint takes no training step
        check_memory(cfg, world_size, local_ranks, device_type)
