"""torchft fault tolerance, for real: a lighthouse and 2 replica groups x 2 gloo ranks, one
rank of group 1 killed with SIGKILL mid-run. Group 0 keeps stepping alone; group 1's elastic
agent restarts it, it heals from group 0's live state and both finish with the same model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, TINY
from titan.fault_tolerance import GROUP_ENV
from titan.interop.dcp_io import load_dcp_model_state

pytest.importorskip("torchft")  # in the dev extra


def _records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _worker_pid(group: int) -> int | None:
    """A worker process of that group. The group's elastic agent sets GROUP_ENV after it
    started, so only what it starts carries it in its initial environment: the fork server
    and, forked from it, the workers (a marked process whose parent is marked too)."""
    marked = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = dict(kv.split("=", 1) for kv in (proc / "environ").read_text().split("\0") if "=" in kv)
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if env.get(GROUP_ENV) == str(group):
            marked[int(proc.name)] = parent
    workers = sorted(pid for pid, parent in marked.items() if parent in marked)
    return workers[0] if workers else None


def _wait_for(predicate, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _train_losses(records: list[dict]) -> dict[int, dict]:
    return {r["step"]: r for r in records if "loss" in r}


def _complete_steps(run_dir: Path) -> set[int]:
    return {int(d.name.split("-")[1]) for d in (run_dir / "checkpoints").glob("step-*") if (d / ".complete").exists()}


@pytest.mark.slow
def test_killed_group_heals_live_and_models_agree(tmp_path):
    # Long enough never to end by itself: the test stops the job once it has what it checks.
    args = [sys.executable, "-m", "titan.train", f"hydra.run.dir={tmp_path}", *TINY, "parallel=ddp",
            "parallel.nproc_per_node=2", "fault_tolerance=torchft", "fault_tolerance.timeout_s=20",
            "training.steps=100000", "checkpoint.interval=10", "checkpoint.keep_last_k=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}
    console = open(tmp_path / "console.txt", "w")  # a file, not a pipe nobody drains
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=console, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    group1_dir = tmp_path / "replica_1"
    group0, group1 = tmp_path / "metrics.jsonl", group1_dir / "metrics.jsonl"
    try:
        # Kill once both groups train together: a group that starts late (a loaded machine) lets
        # group 1 step alone first, and a kill then restarts both from scratch with nothing to heal.
        together = lambda: sum(r["ft_participants"] == 2 for r in _train_losses(_records(group1)).values())  # noqa: E731
        _wait_for(lambda: together() >= 3, 300, "group 1 to train 3 steps with group 0")
        pid = _wait_for(lambda: _worker_pid(1), 30, "a worker of group 1")
        killed_at_step = max(_train_losses(_records(group1)))
        os.kill(pid, signal.SIGKILL)
        t_kill = time.monotonic()

        def rejoined_at():  # the first step group 1 trains with group 0 again, after the kill
            recs = _train_losses(_records(group1))
            return min((s for s, r in recs.items() if s > killed_at_step + 1 and r["ft_participants"] == 2), default=None)

        rejoin_step = _wait_for(rejoined_at, 300, "group 1 to heal and rejoin")
        recover_s = time.monotonic() - t_kill
        # A checkpoint both groups wrote after the rejoin: the models must be the same.
        common = _wait_for(lambda: sorted(s for s in _complete_steps(tmp_path) & _complete_steps(group1_dir)
                                          if s >= rejoin_step), 300, "a common checkpoint after the rejoin")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        console.close()
    print(f"time to recover (SIGKILL -> group 1 stepping with group 0 again): {recover_s:.1f} s")

    g0, g1 = _train_losses(_records(group0)), _train_losses(_records(group1))
    # Group 0 never stopped: every step from its first (1, or later when it started late and healed
    # from group 1) through the kill to the rejoin...
    first = min(g0)
    assert first <= killed_at_step and [s for s in sorted(g0) if s <= rejoin_step] == list(range(first, rejoin_step + 1))
    # (Whether group 0 also stepped alone depends on timing: a fork-server restart is back in
    # about a second, often before group 0's next quorum. The heal below proves the restart.)
    logs = "".join(f.read_text(errors="replace") for f in (group1_dir / "logs").rglob("*.log"))
    assert "healed from a live group" in logs
    step = common[0]
    a = load_dcp_model_state(tmp_path / "checkpoints" / f"step-{step:08d}")
    b = load_dcp_model_state(group1_dir / "checkpoints" / f"step-{step:08d}")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert g0[step]["loss"] == g1[step]["loss"] and g0[step]["ft_participants"] == 2
