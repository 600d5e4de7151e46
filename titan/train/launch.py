"""Start the job's ranks: in this process, or as `nproc_per_node` spawned workers.

The config was composed and validated once, here in the launching process; workers receive
the typed (picklable) config, never a DictConfig, and never run Hydra themselves.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import socket
import uuid
from pathlib import Path
from typing import Optional

from titan.config.schema import Launcher, TrainConfig
from titan.train import interrupt
from titan.train.env import env_local_world_size, env_world_size, launched_by_env


def free_port() -> int:
    """A free localhost port, so concurrent jobs (multirun, parallel tests) never collide."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerFailed(RuntimeError):
    """A plain error (torch's ChildFailedError does not survive pickling across joblib).
    `line` is what the CLI prints and `exit_code` its status: a rank's user error keeps its own
    line ('config error: ...', exit 2), a crash says 'error: ...' (exit 1)."""

    def __init__(self, message: str, exit_code: int = 1, line: Optional[str] = None):
        super().__init__(message)
        self.exit_code = exit_code
        self.line = line or f"error: {message}"


def _failure_text(failure) -> tuple[str, str]:
    """(message, traceback) of a failed rank, from its elastic error file (its per-rank log)."""
    detail = failure.message
    if isinstance(detail, dict):  # {"message": "ExcType: text", "extraInfo": {"py_callstack": ...}}
        return str(detail.get("message", detail)), str((detail.get("extraInfo") or {}).get("py_callstack", ""))
    return str(detail), ""


def _worker_failed(err, log_dir: Path = Path("RUN_DIR/logs")) -> WorkerFailed:
    """One line for a user error on any rank (the others' failures follow from it); for a crash
    the first failure with its traceback. Either way the per-rank error file keeps the traceback."""
    from titan.train.worker import RankUserError

    prefix = f"{RankUserError.__name__}: "
    for rank, failure in sorted(err.failures.items()):
        message, _ = _failure_text(failure)
        if message.startswith(prefix):
            line, _, code = message[len(prefix):].rpartition(RankUserError.CODE_SEPARATOR)
            log_hint = f" (rank {rank}; traceback in {failure.error_file})" if os.path.isfile(failure.error_file) else ""
            return WorkerFailed(line, int(code), line + log_hint)
    rank, failure = err.get_first_failure()
    message, traceback = _failure_text(failure)
    # A rank killed by a signal (OOM killer, kill -9) leaves no error file ("<N/A>").
    where = f"traceback in {failure.error_file}" if os.path.isfile(failure.error_file) else f"its output is in {log_dir}"
    text = f"rank {rank} failed (exit code {failure.exitcode}): {message}; {where}"
    return WorkerFailed(text + (f"\n{traceback.rstrip()}" if traceback else ""))


@contextlib.contextmanager
def _quiet_agent():
    """The elastic agent logs each failed worker's traceback, and the spawn module a line per
    rank it terminates: titan reports the failure itself (`_worker_failed`)."""
    loggers = [logging.getLogger(n) for n in ("torch.distributed.elastic.multiprocessing.api", "torch.multiprocessing.spawn")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


# What every worker imports (DCP and DTensor, the trainer; dynamo, which building a model on
# the meta device pulls in): imported once by the fork server, not once per worker.
WORKER_IMPORTS = ["titan.train.worker", "titan.train.trainer", "titan.checkpoint", "titan.metrics", "torch._dynamo"]


def spawn_workers(cfg: TrainConfig, max_restarts: int = 0) -> Optional[float]:
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from titan.train.worker import run_worker

    nproc = cfg.parallel.nproc_per_node
    log_dir = Path(cfg.run_dir) / "logs"
    launch_cfg = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"titan-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        max_restarts=max_restarts,  # > 0 for fault-tolerant replica groups
        # Workers fork from a server that imported torch and titan once, instead of each
        # importing them again (seconds of CPU per worker); the server itself never
        # touches a device, so this is as safe as spawn for CUDA.
        start_method="forkserver",
        monitor_interval=0.1,
        log_line_prefix_template="[rank${rank}]",
        # SIGINT stays ours (titan.train.interrupt): Ctrl-C reaches the workers, which stop cleanly.
        signals_to_handle="SIGTERM,SIGHUP,SIGQUIT",
        # Every rank's stdout/stderr goes to logs/; rank 0 is also shown on the console.
        logs_specs=DefaultLogsSpecs(log_dir=str(log_dir), redirects=Std.ALL, tee={0: Std.ALL}),
    )
    multiprocessing.set_forkserver_preload(WORKER_IMPORTS)
    try:
        with interrupt.launcher_handling(), _quiet_agent():
            results = elastic_launch(launch_cfg, run_worker)(cfg)
    except ChildFailedError as err:
        if interrupt.requested():
            raise interrupt.Interrupted(_interrupted_message(cfg)) from None
        raise _worker_failed(err, log_dir) from None
    return results[0]


def _interrupted_message(cfg: TrainConfig) -> str:
    from titan.checkpoint import complete_checkpoints

    if cfg.checkpoint.interval <= 0:
        return "stopped by Ctrl-C (checkpointing is off: set checkpoint.interval=N to be able to resume)"
    found = complete_checkpoints(Path(cfg.run_dir) / "checkpoints")
    if not found:
        return "stopped by Ctrl-C before any checkpoint was saved"
    return f"stopped by Ctrl-C; latest checkpoint {found[-1]}: run the same command (hydra.run.dir={cfg.run_dir}) to resume"


def launch(cfg: TrainConfig) -> Optional[float]:
    """Run the job; returns rank 0's final validation loss (what an Optuna sweep minimises)."""
    from titan.train.worker import run_worker

    from titan.train.preflight import preflight

    if cfg.parallel.launcher is Launcher.env or (cfg.parallel.launcher is Launcher.auto and launched_by_env()):
        rank = int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0)
        preflight(cfg, env_world_size(), env_local_world_size(), announce=rank == 0)
        result = run_worker(cfg)
    elif cfg.fault_tolerance.enabled:  # a lighthouse and each replica group, restartable
        from titan.fault_tolerance import launch_replica_groups

        groups = cfg.fault_tolerance.replica_groups
        preflight(cfg, cfg.parallel.nproc_per_node, cfg.parallel.nproc_per_node * groups)
        result = launch_replica_groups(cfg, spawn_workers)
    elif cfg.parallel.nproc_per_node == 1:
        preflight(cfg, 1, 1)
        result = run_worker(cfg)
    else:
        preflight(cfg, cfg.parallel.nproc_per_node, cfg.parallel.nproc_per_node)
        result = spawn_workers(cfg)
    if interrupt.requested():
        raise interrupt.Interrupted(_interrupted_message(cfg))
    return result
