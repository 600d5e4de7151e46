"""`profiling=` options: torch.profiler traces, memory records, NCCL flight recorder, NaN checks."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

import torch

from titan.config.schema import ProfilingConfig
from titan.metrics import peak_memory_gib

log = logging.getLogger("titan")


class NonFiniteLoss(RuntimeError):
    """Raised by nan_check=stop; checkpoints are never written after the bad step."""


def enable_flight_recorder(cfg: ProfilingConfig, run_dir: str, backend: str) -> None:
    """Must run before the process group exists: NCCL reads these variables at init."""
    if not cfg.flight_recorder:
        return
    if backend != "nccl":
        log.warning("profiling.flight_recorder records NCCL collectives; this run uses %s, so it is off", backend)
        return
    os.environ.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", "20000")
    os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
    os.environ.setdefault("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", str(Path(run_dir) / "flight_recorder" / "rank_"))
    (Path(run_dir) / "flight_recorder").mkdir(parents=True, exist_ok=True)


class StepProfiler:
    """Every `trace_interval` steps, trace `trace_steps` steps into RUN_DIR/profiles/ (open the
    JSON in Perfetto or chrome://tracing); optionally record memory every step."""

    def __init__(self, cfg: ProfilingConfig, run_dir: str, rank: int, device: torch.device):
        self.cfg, self.rank, self.device = cfg, rank, device
        self.dir = Path(run_dir) / "profiles"
        self.prof: Optional[torch.profiler.profile] = None
        self.started_at = 0
        self.memory_file = None
        if cfg.trace_interval or cfg.memory_record:
            self.dir.mkdir(parents=True, exist_ok=True)
        if cfg.memory_record:
            if device.type == "cuda":
                torch.cuda.memory._record_memory_history(max_entries=100_000)
            self.memory_file = open(self.dir / f"memory_rank{rank}.jsonl", "a", buffering=1)

    def step_begin(self, step: int) -> None:
        if self.cfg.trace_interval and self.prof is None and step % self.cfg.trace_interval == 0:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True)
            self.prof.start()
            self.started_at = step

    def step_end(self, step: int) -> None:
        if self.memory_file is not None:
            self.memory_file.write(json.dumps({"step": step, "peak_gib": peak_memory_gib(self.device)}) + "\n")
        if self.prof is not None and step - self.started_at + 1 >= self.cfg.trace_steps:
            self._export(step)

    def _export(self, step: int) -> None:
        self.prof.stop()
        path = self.dir / f"trace_step{self.started_at}_rank{self.rank}.json"
        self.prof.export_chrome_trace(str(path))
        log.info("profiler trace written to %s", path)
        self.prof = None
        if self.device.type == "cuda" and self.cfg.memory_record:
            torch.cuda.memory._dump_snapshot(str(self.dir / f"memory_snapshot_step{step}_rank{self.rank}.pickle"))

    def close(self, step: int) -> None:
        if self.prof is not None:  # the run ended inside a trace window: keep what was recorded
            self._export(step)
        if self.memory_file is not None:
            self.memory_file.close()
