"""SkyPilot task YAMLs: parsed by SkyPilot's own loader, and their `run` scripts executed on
this CPU with the variables SkyPilot sets on a node (one node, 2 'GPUs' = 2 gloo processes),
and relaunched, so the second launch resumes from the checkpoint the first left on the 'bucket'."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers import REPO, TINY
from titan.train.launch import free_port

sky = pytest.importorskip("sky")  # in the dev extra; importorskip only guards odd installs

YAMLS = {"single_node": 1, "multi_node": 2}


@pytest.mark.parametrize("name,nodes", YAMLS.items())
def test_skypilot_loader_accepts_task(name, nodes):
    task = sky.Task.from_yaml(str(REPO / "scripts/skypilot" / f"{name}.yaml"))
    assert task.num_nodes == nodes
    (res,) = task.resources
    assert res.accelerators == {"H100": 8}
    assert "/checkpoints" in task.storage_mounts  # the bucket that makes relaunches resume
    assert "titan.train" in task.run and "${TITAN_ARGS}" in task.run
    assert set(task.envs) >= {"TITAN_ARGS", "RUN_NAME", "CHECKPOINT_BUCKET"}


def _run_on_fake_node(name: str, root: Path, steps: int) -> subprocess.CompletedProcess:
    task = sky.Task.from_yaml(str(REPO / "scripts/skypilot" / f"{name}.yaml"))
    args = " ".join([*TINY, "parallel=fsdp", f"training.steps={steps}"])
    env = {
        **os.environ, **task.envs,
        "TITAN_ARGS": args, "RUN_NAME": "job", "RUN_ROOT": str(root), "CHECKPOINT_INTERVAL": "3",
        # What SkyPilot sets on each node of the cluster.
        "SKYPILOT_NUM_NODES": "1", "SKYPILOT_NODE_RANK": "0", "SKYPILOT_NODE_IPS": "127.0.0.1\n",
        "SKYPILOT_NUM_GPUS_PER_NODE": "2", "MASTER_PORT": str(free_port()),
        "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
    }
    return subprocess.run(["bash", "-c", task.run], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("name", YAMLS)
def test_skypilot_run_script_trains_and_resumes(name, tmp_path):
    first = _run_on_fake_node(name, tmp_path, steps=3)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "job/checkpoints/step-00000003/.complete").exists()
    if name == "single_node":  # the relaunch path is the same for both; run it once
        return
    second = _run_on_fake_node(name, tmp_path, steps=6)
    assert second.returncode == 0, second.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "job/metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6], steps  # the relaunch continued at step 4, not from scratch
