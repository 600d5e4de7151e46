"""Shared test helpers: run titan through its real CLI and read what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A run that takes seconds: 2-layer dim-64 model, short sequences, small vocabulary.
TINY = [
    "model=llama3_tiny",
    "training.seq_len=32",
    "training.global_batch_size=4",
    "training.val_interval=0",
    "lr_schedule.warmup_steps=2",
    "logging.interval=1",
    "data.max_documents=200",
]


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    run_dir: Path
    records: list = field(default_factory=list)

    @property
    def train(self) -> list[dict]:
        """Training records, the last one per step (a resumed run may repeat steps)."""
        by_step = {r["step"]: r for r in self.records if "loss" in r}
        return [by_step[s] for s in sorted(by_step)]

    @property
    def val(self) -> list[dict]:
        return [r for r in self.records if "val_loss" in r]

    @property
    def losses(self) -> list[float]:
        return [r["loss"] for r in self.train]

    def check(self) -> "Run":
        assert self.returncode == 0, f"exit {self.returncode}\nSTDOUT:\n{self.stdout[-4000:]}\nSTDERR:\n{self.stderr[-4000:]}"
        return self


def run_titan(run_dir: Path, *overrides: str, tiny: bool = True, timeout: float = 600, env: dict | None = None, module: str = "titan.train") -> Run:
    # TITAN_TEST_DEVICE=cuda runs the CLI tests on a GPU (benchmarks/gpu_check.sh).
    device = [f"training.device={os.environ['TITAN_TEST_DEVICE']}"] if os.environ.get("TITAN_TEST_DEVICE") and module == "titan.train" else []
    args = [sys.executable, "-m", module, f"hydra.run.dir={run_dir}", *(TINY if tiny else []), *device, *overrides]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(args, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    metrics = Path(run_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    return Run(proc.returncode, proc.stdout, proc.stderr, Path(run_dir), records)
