"""Multi-process and cluster paths: async checkpoints on several ranks, Slurm environments."""

from __future__ import annotations

import shutil

import pytest

from tests.helpers import run_titan


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["thread", "process"])
def test_async_save_every_step_on_two_ranks_never_hangs_and_resumes_bit_for_bit(tmp_path, mode):
    # Saving every step keeps a background save in flight at every poll, where a rank deciding
    # alone that its save is done would enter the finishing barrier while the other one runs the
    # next step's collectives. A short collective timeout turns such a hang into a failure.
    common = [
        "parallel=fsdp", "training.steps=20", "checkpoint.interval=1", "checkpoint.keep_last_k=9",
        f"checkpoint.async_mode={mode}", "parallel.timeout_s=60",
    ]
    full = run_titan(tmp_path / "full", *common, timeout=400).check()
    ckpts = sorted(p.name for p in (full.run_dir / "checkpoints").iterdir())
    assert ckpts == [f"step-{s:08d}" for s in range(12, 21)]
    assert all((full.run_dir / "checkpoints" / c / ".complete").exists() for c in ckpts)

    crashed = tmp_path / "crashed"  # as if killed right after the step-12 save
    shutil.copytree(full.run_dir, crashed)
    for step in range(13, 21):
        shutil.rmtree(crashed / "checkpoints" / f"step-{step:08d}")
    (crashed / "metrics.jsonl").write_text("")
    resumed = run_titan(crashed, *common, timeout=400).check()
    assert [r["step"] for r in resumed.train] == list(range(13, 21))
    assert resumed.losses == full.losses[12:]


# --------------------------------------------------------------------------------------------
# Slurm: the variables srun, an sbatch batch step and submitit set (rendezvous not exported)
# --------------------------------------------------------------------------------------------
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from tests.helpers import REPO, TINY  # noqa: E402
from titan.train import slurm  # noqa: E402

_TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "TORCHELASTIC_RUN_ID", "TITAN_RUN_ID")


def test_expand_hostlist():
    assert slurm.expand_hostlist("node[01-03,07],gpu5") == ["node01", "node02", "node03", "node07", "gpu5"]
    assert slurm.expand_hostlist("a[1-2]-b[9-10]") == ["a1-b9", "a1-b10", "a2-b9", "a2-b10"]
    assert slurm.expand_hostlist("127.0.0.[1-2]") == ["127.0.0.1", "127.0.0.2"]
    assert slurm.expand_hostlist("single") == ["single"] and slurm.expand_hostlist("") == []


def test_rank_variables_from_srun(monkeypatch):
    for key in _TORCH_VARS:
        monkeypatch.delenv(key, raising=False)
    env = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "4", "SLURM_NTASKS": "4",
           "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
           "SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert slurm.is_slurm_rank()
    assert slurm.torch_env_from_slurm() == {
        "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "gpu07",
        "MASTER_PORT": str(slurm.PORT_BASE + 123456 % slurm.PORT_SPAN)}
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")  # a one-task step (submitit) is no rank of many
    assert not slurm.is_slurm_rank()
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS")  # an sbatch batch step: no step variables at all
    assert not slurm.is_slurm_rank()


def _free_job_id() -> str:
    """A job id whose derived rendezvous port is free here (tests run side by side)."""
    while True:
        job = random.randrange(10**6, 10**7)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", slurm.PORT_BASE + job % slurm.PORT_SPAN))
            except OSError:
                continue
        return str(job)


def _slurm_env(**slurm_vars: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _TORCH_VARS and not k.startswith("SLURM_")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    env.update(slurm_vars)
    return env


def _titan(cwd, env, *overrides, steps=2):
    cmd = [sys.executable, "-m", "titan.train", *TINY, f"training.steps={steps}", *overrides]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _steps(run_dir) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


@pytest.mark.slow
def test_srun_tasks_find_their_rendezvous_from_the_node_list(tmp_path):
    # Two tasks of one srun step, MASTER_ADDR/MASTER_PORT not exported: the host is the first
    # node of the (compressed) node list, the port follows from the job id.
    job = _free_job_id()
    common = dict(SLURM_JOB_ID=job, SLURM_NTASKS="2", SLURM_STEP_NUM_TASKS="2", SLURM_STEP_ID="0",
                  SLURM_JOB_NODELIST="127.0.0.[1-2]", SLURM_STEP_NODELIST="127.0.0.[1-2]", SLURM_NNODES="1")
    procs = [_titan(tmp_path, _slurm_env(**common, SLURM_PROCID=str(r), SLURM_LOCALID=str(r), SLURM_NODEID="0"), "parallel=ddp")
             for r in range(2)]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert _steps(tmp_path / "outputs" / job) == [1, 2]  # one run dir, from the job id


@pytest.mark.slow
@pytest.mark.parametrize("where", ["sbatch", "submitit"])
def test_one_task_allocation_self_launches_its_workers(tmp_path, where):
    job = _free_job_id()
    env = dict(SLURM_JOB_ID=job, SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_NNODES="1",
               SLURM_JOB_NODELIST="node[01]", SLURM_NODELIST="node[01]", SLURM_NTASKS="1", SLURM_CPUS_ON_NODE="2")
    if where == "submitit":  # submitit runs the job as a one-task srun step
        env.update(SLURM_STEP_ID="0", SLURM_STEP_NUM_TASKS="1", SLURM_STEP_NODELIST="node[01]", SUBMITIT_EXECUTOR="slurm")
    proc = _titan(tmp_path, _slurm_env(**env), "parallel=ddp", f"hydra.run.dir={tmp_path / 'run'}")
    out = proc.communicate(timeout=400)[0]
    assert proc.returncode == 0, out
    assert _steps(tmp_path / "run") == [1, 2]
    assert sorted(p.name for p in (tmp_path / "run" / "logs").rglob("stdout.log"))  # two spawned workers


def test_sbatch_batch_step_single_process(tmp_path):
    env = dict(SLURM_JOB_ID="42", SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_JOB_NODELIST="node[01-02]", SLURM_NTASKS="16")
    proc = _titan(tmp_path, _slurm_env(**env), f"hydra.run.dir={tmp_path / 'run'}")
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out
    assert _steps(tmp_path / "run") == [1, 2]
