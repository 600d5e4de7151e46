"""Start the job's ranks: in this process, or as `nproc_per_node` spawned workers.

The config was composed and validated once, here in the launching process; workers receive
the typed (picklable) config, never a DictConfig, and never run Hydra themselves.
"""

from __future__ import annotations

import socket
import uuid
from pathlib import Path
from typing import Optional

from titan.config.schema import Launcher, TrainConfig
from titan.train.env import launched_by_env


def free_port() -> int:
    """A free localhost port, so concurrent jobs (multirun, parallel tests) never collide."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerFailed(RuntimeError):
    """A plain error (torch's ChildFailedError does not survive pickling across joblib)."""


def _first_failure(err) -> str:
    rank, failure = err.get_first_failure()
    detail = failure.message
    if isinstance(detail, dict):  # the elastic error file: {"message": ..., "extraInfo": {...}}
        detail = detail.get("message", detail)
    return f"rank {rank} failed (exit code {failure.exitcode}); its log: {failure.error_file or 'see logs/'}\n{detail}"


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
        start_method="spawn",
        monitor_interval=0.1,
        log_line_prefix_template="[rank${rank}]",
        # Every rank's stdout/stderr goes to logs/; rank 0 is also shown on the console.
        logs_specs=DefaultLogsSpecs(log_dir=str(log_dir), redirects=Std.ALL, tee={0: Std.ALL}),
    )
    try:
        results = elastic_launch(launch_cfg, run_worker)(cfg)
    except ChildFailedError as err:
        raise WorkerFailed(_first_failure(err)) from None
    return results[0]


def launch(cfg: TrainConfig) -> Optional[float]:
    """Run the job; returns rank 0's final validation loss (what an Optuna sweep minimises)."""
    from titan.train.worker import run_worker

    if cfg.parallel.launcher is Launcher.env or (cfg.parallel.launcher is Launcher.auto and launched_by_env()):
        return run_worker(cfg)
    from titan.data import build_tokenizer

    if cfg.fault_tolerance.enabled:  # a lighthouse and each replica group, restartable
        from titan.fault_tolerance import launch_replica_groups

        build_tokenizer(cfg.tokenizer)
        launch_replica_groups(cfg, spawn_workers)
        return None
    if cfg.parallel.nproc_per_node == 1:
        return run_worker(cfg)
    build_tokenizer(cfg.tokenizer)  # train/cache the default tokenizer once, before the ranks start
    return spawn_workers(cfg)
