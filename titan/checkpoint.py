"""Distributed checkpoints (DCP): periodic and final saves, async saves, resume, retention.

Layout: RUN_DIR/checkpoints/step-00000100/ holds DCP shards from every rank, then a
`.complete` marker written last by rank 0. A directory without the marker (a run killed
mid-save) is never resumed from and is cleaned up by the next save, so a crash can lose at
most the save in flight, never the previous checkpoint. Only one save is ever in flight.
"""

from __future__ import annotations

import logging
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner

from titan.config.schema import AsyncMode, CheckpointConfig

# A single-process run saves and loads with DCP without a process group, as intended; DCP
# warns about that on every call.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

log = logging.getLogger("titan")
COMPLETE = ".complete"


class CheckpointError(RuntimeError):
    pass


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP unpickles non-tensor values with weights_only=False; a checkpoint is data, so load
    them with weights_only=True (plain Python values and tensors only, no code)."""

    def load_bytes(self, read_item, value) -> None:
        import torch
        from torch.distributed.checkpoint._nested_dict import set_element

        obj = torch.load(value, weights_only=True)
        fqn = read_item.dest_index.fqn
        if self.flatten_state_dict:  # write through to the caller's nested dict, as DCP does
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if p.is_dir() and is_complete(p))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir, or the latest complete one under a run dir / checkpoints dir."""
    path = Path(path)
    if is_complete(path):
        return path
    for root in (path / "checkpoints", path):
        found = complete_checkpoints(root)
        if found:
            return found[-1]
    if (path / ".metadata").exists():
        raise CheckpointError(f"{path} is incomplete (no {COMPLETE} marker): its save was interrupted")
    raise CheckpointError(f"no complete checkpoint in {path}")


def load_state(state: dict[str, Any], path: Path) -> None:
    """Fill `state` (a template from TrainState.state_dict()) in place from checkpoint `path`.

    Nothing pickled in the checkpoint can run code: the metadata goes through an unpickler that
    builds only DCP's own classes, values through torch.load(weights_only=True)."""
    from titan.interop.dcp_io import SafeFileReader, read_dcp_metadata
    from titan.interop.errors import CheckpointReadError

    try:
        reader = SafeFileReader(path, read_dcp_metadata(path))
    except CheckpointReadError as e:
        raise CheckpointError(str(e)) from None
    try:
        dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=not dist.is_initialized())
    except BaseException as e:  # DCP's CheckpointException derives from BaseException
        if isinstance(e, KeyboardInterrupt):
            raise
        where = reader.failed[0] if reader.failed else path
        cause = reader.failed[1] if reader.failed else e
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        raise CheckpointError(
            f"cannot read checkpoint {where}: {type(cause).__name__}: {first} "
            "(truncated or corrupted? delete this checkpoint to resume from the previous one)"
        ) from None


def restore(train_state: Any, path: Path) -> None:
    """Resume `train_state` (a TrainState) from checkpoint `path`. A checkpoint that does not
    fit this run's data settings (another seed, corpus or tokenizer) is a CheckpointError."""
    state = train_state.state_dict()
    load_state(state, path)
    try:
        train_state.load_state_dict(state)
    except ValueError as e:
        raise CheckpointError(
            f"cannot resume from {path}: {e}; resume with the settings it was saved with (training.seed, data, "
            "tokenizer, batch layout), or start afresh with checkpoint.resume=none or another hydra.run.dir"
        ) from None


def _is_writer() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


class Checkpointer:
    def __init__(self, cfg: CheckpointConfig, run_dir: str):
        self.cfg = cfg
        self.root = Path(run_dir) / "checkpoints"
        self.pending: Optional[tuple[Any, Path, float]] = None  # (future, dir, start time)
        self.async_pg = None
        if cfg.async_mode is not AsyncMode.off and dist.is_initialized():
            # Async saves run their collectives on a side group so they never interleave with training's.
            self.async_pg = dist.new_group(backend="gloo")
        self.last_save_s = 0.0  # start of a save to its completion
        self.blocked_s = 0.0  # how long training waited on saves since the last `take_blocked`

    # -- resume ---------------------------------------------------------------------------
    def resume_path(self) -> Optional[Path]:
        if self.cfg.resume == "none":
            return None
        if self.cfg.resume == "auto":
            found = complete_checkpoints(self.root)
            return found[-1] if found else None
        return resolve_checkpoint(self.cfg.resume)

    # -- save -----------------------------------------------------------------------------
    def should_save(self, step: int, last_step: int) -> bool:
        """Every `interval` steps (0: never), and the last step unless save_final=false, so
        every run ends with weights to sample from, export or resume."""
        periodic = self.cfg.interval > 0 and step % self.cfg.interval == 0
        return periodic or (step == last_step and self.cfg.save_final)

    def save(self, state: dict[str, Any], step: int, wait: bool = False) -> None:
        start = time.perf_counter()
        try:
            self._save(state, step, wait)
        finally:
            self.blocked_s += time.perf_counter() - start

    def save_on_interrupt(self, state: Any, step: int) -> None:
        """Ctrl-C stopped the run after `step`: save it, unless saving is off or it is saved
        already (a periodic save of this step, or the checkpoint the run resumed from)."""
        path = step_dir(self.root, step)
        if self.cfg.interval <= 0 or step == 0 or is_complete(path) or (self.pending and self.pending[1] == path):
            return
        log.info("saving a checkpoint at step %d before stopping (Ctrl-C again to skip it)", step)
        self.save(state.state_dict(), step)

    def take_blocked(self) -> float:
        """Seconds training spent blocked in saves since the last call (for metrics)."""
        blocked, self.blocked_s = self.blocked_s, 0.0
        return blocked

    def _save(self, state: dict[str, Any], step: int, wait: bool) -> None:
        self.wait()  # never two saves in flight
        path = step_dir(self.root, step)
        if _is_writer():
            shutil.rmtree(path, ignore_errors=True)  # a leftover from an interrupted save
            path.mkdir(parents=True, exist_ok=True)
        if dist.is_initialized():
            dist.barrier()
        t0 = time.perf_counter()
        if self.cfg.async_mode is AsyncMode.off:
            dcp.save(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
            self._finish(path, t0)
            return
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        kind = AsyncCheckpointerType.PROCESS if self.cfg.async_mode is AsyncMode.process else AsyncCheckpointerType.THREAD
        future = dcp.async_save(
            state, checkpoint_id=str(path), process_group=self.async_pg, async_checkpointer_type=kind, no_dist=not dist.is_initialized()
        )
        self.pending = (future, path, t0)
        if wait:
            self.wait()

    def poll(self) -> None:
        """Finish an async save once every rank's writes are done (called every step).

        The ranks decide together: finishing ends in a barrier, and a rank that entered it on
        its own view while another went on into the next step's collectives would hang both."""
        from titan.train.agree import all_ranks

        if self.pending is not None and all_ranks(self.pending[0].done()):
            self.wait()

    def wait(self) -> None:
        if self.pending is None:
            return
        future, path, t0 = self.pending
        self.pending = None
        future.result()
        self._finish(path, t0)

    def _finish(self, path: Path, t0: float) -> None:
        if dist.is_initialized():
            dist.barrier(group=self.async_pg)  # every rank's shards are on disk
        self.last_save_s = time.perf_counter() - t0
        if _is_writer():
            (path / COMPLETE).write_text(f"{time.time()}\n")
            log.info("saved checkpoint %s (%.2fs)", path, self.last_save_s)
            self._prune()

    def _prune(self) -> None:
        for stale in self.root.glob("step-*"):  # interrupted saves, except the one in flight
            if stale.is_dir() and not is_complete(stale) and (self.pending is None or stale != self.pending[1]):
                shutil.rmtree(stale, ignore_errors=True)
        if self.cfg.keep_last_k > 0:
            for old in complete_checkpoints(self.root)[: -self.cfg.keep_last_k]:
                shutil.rmtree(old, ignore_errors=True)

    def close(self) -> None:
        self.wait()
