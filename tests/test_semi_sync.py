"""Semi-synchronous training over torchft replica groups (fault_tolerance.semi_sync), for real:
a lighthouse and 2 replica groups of 1 gloo rank each running torchft's DiLoCo. The weights
are the same in both groups right after every sync and differ between syncs; the outer
optimizer is SGD with Nesterov momentum at the configured values; a resume in the middle of
an interval ends bit for bit where the uninterrupted run did."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.helpers import REPO, TINY, run_titan
from tests.test_config import compose_typed
from titan.config.errors import ConfigError
from titan.config.validate import validate
from titan.interop.dcp_io import load_dcp_model_state

pytest.importorskip("torchft")  # in the dev extra

H, STEPS = 3, 6


def _two_groups(mode: str) -> list[str]:
    return ["fault_tolerance=torchft", f"fault_tolerance.semi_sync={mode}", f"fault_tolerance.sync_every={H}",
            "fault_tolerance.min_replicas=2",  # every sync waits for both groups: the test is deterministic
            f"training.steps={STEPS}", "optim.lr=1e-3", "checkpoint.interval=1", "checkpoint.keep_last_k=0"]


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["fault_tolerance.semi_sync=diloco"], "fault_tolerance.semi_sync"),  # without fault_tolerance=torchft
        (["fault_tolerance=torchft", "fault_tolerance.semi_sync=local_sgd", "fault_tolerance.sync_every=0"],
         "fault_tolerance.sync_every"),
        (["fault_tolerance=torchft", "fault_tolerance.semi_sync=diloco", "training.steps=10", "fault_tolerance.sync_every=4"],
         "fault_tolerance.sync_every"),  # the last steps would never sync
        (["fault_tolerance=torchft", "fault_tolerance.semi_sync=diloco", "fault_tolerance.outer_lr=0"], "fault_tolerance.outer_lr"),
        (["fault_tolerance=torchft", "fault_tolerance.semi_sync=diloco", "fault_tolerance.outer_momentum=1.0"],
         "fault_tolerance.outer_momentum"),
        (["fault_tolerance=torchft", "fault_tolerance.semi_sync=diloco", "fault_tolerance.outer_momentum=0"],
         "fault_tolerance.outer_nesterov"),
        (["fault_tolerance=torchft", "fault_tolerance.semi_sync=diloco", "training.spike_guard.enabled=true"],
         "training.spike_guard.enabled"),
        (["fault_tolerance=torchft", "fault_tolerance.semi_sync=local_sgd", "profiling.nan_check=skip"], "profiling.nan_check"),
    ],
)
def test_semi_sync_config_errors_name_the_key(overrides, key):
    cfg = compose_typed(*overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=1)
    assert err.value.key == key, str(err.value)


def test_semi_sync_defaults_are_the_diloco_papers():
    ft = compose_typed("fault_tolerance=torchft", "fault_tolerance.semi_sync=diloco").fault_tolerance
    assert (ft.outer_lr, ft.outer_momentum, ft.outer_nesterov) == (0.7, 0.9, True)
    validate(compose_typed("fault_tolerance=torchft", "fault_tolerance.semi_sync=diloco"), world_size=1)


def _ckpt(run_dir: Path, group: int, step: int) -> Path:
    return (run_dir if group == 0 else run_dir / f"replica_{group}") / "checkpoints" / f"step-{step:08d}"


def _full_state(ckpt: Path, tmp: Path, tag: str = "") -> dict:
    """A checkpoint read by torch's own DCP converter (not titan's loader)."""
    out = tmp / f"{tag}{ckpt.parent.parent.name}-{ckpt.name}.pt"
    dcp_to_torch_save(ckpt, out)
    return torch.load(out, weights_only=False)


def _train_records(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r]


def _same(a: dict, b: dict) -> bool:
    assert a.keys() == b.keys()
    return all(torch.equal(a[k], b[k]) for k in a)


def _run_and_check_syncs(run_dir: Path, tmp: Path, mode: str) -> dict:
    """Train 2 groups x 1 rank for two intervals, checkpointing every step; check what holds for
    any semi-sync mode; return every checkpoint, read by torch's DCP converter."""
    run = run_titan(run_dir, *_two_groups(mode), timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"{mode} across groups every {H} steps" in run.stdout + run.stderr  # the start-up summary says it
    state = {(g, s): _full_state(_ckpt(run_dir, g, s), tmp) for g in (0, 1) for s in range(1, STEPS + 1)}
    model = {k: v["model"] for k, v in state.items()}

    # Right after a sync (steps 3 and 6) both groups hold the same weights; in between, each
    # group's own inner steps on its half of the batch make them differ.
    for s in range(1, STEPS + 1):
        assert _same(model[0, s], model[1, s]) == (s % H == 0), s
    # Training works: the loss goes down (each group logs the loss of its own slice of the
    # batch, so compare the mean over both groups and a whole interval: first vs last).
    logs = [_train_records(run_dir), _train_records(run_dir / "replica_1")]
    first, last = (sum(r["loss"] for g in logs for r in g[i:i + H]) / (2 * H) for i in (0, STEPS - H))
    assert last < first - 0.05, [[r["loss"] for r in g] for g in logs]
    for records in logs:
        assert [r["ft_syncs"] for r in records] == [s // H for s in range(1, STEPS + 1)]
        assert records[-1]["ft_participants"] == 2
    # Where in the interval each checkpoint is (a resume continues the interval there).
    for s in range(1, STEPS + 1):
        semi = state[0, s]["semi_sync"]
        assert (semi["local_step"], semi["syncs"]) == (s % H, s // H)
    return state


@pytest.mark.slow
def test_local_sgd_groups_agree_after_each_sync(tmp_path):
    (tmp_path / "tmp").mkdir()
    state = _run_and_check_syncs(tmp_path / "run", tmp_path / "tmp", "local_sgd")
    assert set(state[0, 1]["semi_sync"]) == {"local_step", "syncs"}  # plain averaging: no outer optimizer


@pytest.mark.slow
def test_diloco_groups_agree_after_each_sync_and_resume_mid_interval(tmp_path):
    run_dir, tmp = tmp_path / "run", tmp_path / "tmp"
    tmp.mkdir()
    state = _run_and_check_syncs(run_dir, tmp, "diloco")
    model = {k: v["model"] for k, v in state.items()}

    # The synced weights and the outer optimizer are checkpointed: mid-interval the synced
    # weights are the last sync's model.
    assert _same(state[0, 4]["semi_sync"]["synced_weights"], model[0, 3])
    assert _same(state[0, 6]["semi_sync"]["synced_weights"], model[0, 6])
    # The second sync is one step of SGD(lr 0.7, momentum 0.9, Nesterov) on the averaged
    # pseudo-gradient g: buf6 = 0.9 buf3 + g, w6 = w3 - 0.7 (g + 0.9 buf6).
    outer3, outer6 = state[0, 3]["semi_sync"]["outer_optim"], state[0, 6]["semi_sync"]["outer_optim"]
    assert outer6["param_groups"][0]["lr"] == 0.7 and outer6["param_groups"][0]["nesterov"] is True
    for name, w3 in model[0, 3].items():
        buf3, buf6 = outer3["state"][name]["momentum_buffer"], outer6["state"][name]["momentum_buffer"]
        g = buf6 - 0.9 * buf3
        assert g.abs().max() > 0, name
        torch.testing.assert_close(model[0, 6][name], w3 - 0.7 * (g + 0.9 * buf6), rtol=0, atol=1e-6)

    # Resume both groups from step 4 (one step into an interval): the run ends bit for bit
    # where the uninterrupted one did.
    for g in (0, 1):
        for s in (5, 6):
            shutil.rmtree(_ckpt(run_dir, g, s))
    resumed = run_titan(run_dir, *_two_groups("diloco"), timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for g in (0, 1):
        assert _same(_full_state(_ckpt(run_dir, g, STEPS), tmp, "resumed")["model"], model[g, STEPS]), g


@pytest.mark.slow
def test_killed_group_rejoins_diloco_at_a_sync(tmp_path):
    """2 groups x 2 DDP ranks (parameters are DTensors), one rank of group 1 SIGKILLed mid-run
    under DiLoCo: group 0 keeps stepping and syncing alone; group 1 restarts from its
    checkpoint, heals from group 0's live state at a sync (torchft's DiLoCo sends its synced
    weights and outer momentum along) and from then on both groups hold the same weights
    after every sync."""
    from tests.test_fault_tolerance import _complete_steps, _records, _train_losses, _wait_for, _worker_pid

    args = [sys.executable, "-m", "titan.train", f"hydra.run.dir={tmp_path}", *TINY, "parallel=ddp",
            "parallel.nproc_per_node=2", "training.global_batch_size=8", "fault_tolerance=torchft",
            "fault_tolerance.semi_sync=diloco", f"fault_tolerance.sync_every={H}", "fault_tolerance.timeout_s=30",
            "training.steps=99999", f"checkpoint.interval={H}", "checkpoint.keep_last_k=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}
    console = open(tmp_path / "console.txt", "w")
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=console, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    group1_dir = tmp_path / "replica_1"
    group0, group1 = tmp_path / "metrics.jsonl", group1_dir / "metrics.jsonl"
    try:
        _wait_for(lambda: len(_train_losses(_records(group1))) >= H + 1, 300, "group 1 to pass its first sync")
        pid = _wait_for(lambda: _worker_pid(1), 30, "a worker of group 1")
        killed_at_step = max(_train_losses(_records(group1)))
        os.kill(pid, signal.SIGKILL)
        t_kill = time.monotonic()
        logs = lambda: "".join(f.read_text(errors="replace") for f in (group1_dir / "logs").rglob("*.log"))  # noqa: E731
        def back_in_step():  # healed from group 0's live state, or back so fast it had nothing to catch up
            rejoined = any(r["ft_participants"] == 2 for s, r in _train_losses(_records(group1)).items() if s > killed_at_step + H)
            return "healed from a live group" in logs() or rejoined

        _wait_for(back_in_step, 300, "group 1 to heal or rejoin at a sync")
        recover_s = time.monotonic() - t_kill
        healed_at = max(_train_losses(_records(group1)))  # the heal happens inside the sync step
        common = _wait_for(lambda: sorted(s for s in _complete_steps(tmp_path) & _complete_steps(group1_dir)
                                          if s > healed_at + H), 300, "a common checkpoint after the rejoin")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        console.close()
    print(f"time to recover under DiLoCo (SIGKILL -> group 1 healed at a sync): {recover_s:.1f} s")

    g0 = _train_losses(_records(group0))
    # Group 0 never stopped (it synced alone meanwhile, or, when group 1 was back within seconds
    # from its fork server, met it again at its next sync).
    assert sorted(g0) == list(range(1, max(g0) + 1))
    step = common[0]
    a = load_dcp_model_state(_ckpt(tmp_path, 0, step))
    b = load_dcp_model_state(_ckpt(tmp_path, 1, step))
    assert _same(a, b), step
    assert _train_losses(_records(group1))[step]["ft_participants"] == 2
