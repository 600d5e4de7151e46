"""Ctrl-C through the real CLI: a clean stop with exit 130 and a final checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, TINY


def _start(run_dir: Path, *overrides: str) -> subprocess.Popen:
    # A new session stands for the terminal: Ctrl-C signals its whole process group.
    cmd = [sys.executable, "-m", "titan.train", f"hydra.run.dir={run_dir}", *TINY, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if metrics.exists() and any(json.loads(line).get("step", 0) >= step for line in metrics.read_text().splitlines()):
            return
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"no step {step} within {timeout}s")


def _ctrl_c(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGINT)


def _finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def _complete_steps(run_dir: Path) -> list[int]:
    root = run_dir / "checkpoints"
    return sorted(int(p.name.split("-")[1]) for p in root.glob("step-*") if (p / ".complete").exists()) if root.exists() else []


@pytest.mark.parametrize("layout", ["single", pytest.param("ddp", marks=pytest.mark.slow)])
def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path, layout):
    run_dir = tmp_path / "r"
    proc = _start(run_dir, "training.steps=100000", "checkpoint.interval=100000", f"parallel={layout}")
    _wait_for_step(proc, run_dir, 2)
    _ctrl_c(proc)
    code, out, err = _finish(proc)
    assert code == 130, err[-3000:]
    assert "Traceback" not in out + err, (out + err)[-3000:]
    line = [x for x in err.splitlines() if x.startswith("interrupted:")]
    assert len(line) == 1 and "latest checkpoint" in line[0], err[-3000:]
    saved = _complete_steps(run_dir)
    assert len(saved) == 1 and saved[0] >= 2
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert saved[0] == max(steps)  # the checkpoint holds the last step trained


@pytest.mark.slow
def test_second_ctrl_c_stops_at_once_without_saving(tmp_path):
    run_dir = tmp_path / "r"
    # Steps long enough (about a second here) that both Ctrl-Cs land inside one step.
    proc = _start(run_dir, "training.steps=100000", "checkpoint.interval=100000", "model=llama3_debug",
                  "training.seq_len=512", "training.global_batch_size=8")
    _wait_for_step(proc, run_dir, 1)
    _ctrl_c(proc)
    time.sleep(0.3)
    _ctrl_c(proc)
    code, out, err = _finish(proc)
    assert code == 130, err[-3000:]
    assert "Traceback" not in out + err, (out + err)[-3000:]
    assert [x for x in err.splitlines() if x.startswith("interrupted:")], err[-3000:]
    assert _complete_steps(run_dir) == []
