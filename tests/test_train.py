"""End-to-end single-process training through the real CLI."""

from __future__ import annotations

import json
import shutil

from tests.helpers import run_titan

METRIC_KEYS = {"step", "loss", "grad_norm", "lr", "tokens_per_sec", "mfu", "memory_gib", "tflops", "data_time_frac"}


def test_loss_falls_and_metrics_are_written(tmp_path):
    run = run_titan(
        tmp_path / "r", "training.steps=40", "optim.lr=3e-3", "training.val_interval=20", "training.val_batches=2"
    ).check()
    assert [r["step"] for r in run.train] == list(range(1, 41))
    assert METRIC_KEYS <= set(run.train[0])
    first, last = run.losses[0], sum(run.losses[-5:]) / 5
    assert last < first - 1.0, f"loss did not fall: {first:.3f} -> {last:.3f}"
    assert [r["step"] for r in run.val] == [20, 40] and run.val[-1]["val_loss"] < run.val[0]["val_loss"] + 0.5
    assert all(r["tokens_per_sec"] > 0 and 0 < r["mfu"] < 1 and r["memory_gib"] > 0 for r in run.train)
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["final_val_loss"] == run.val[-1]["val_loss"]
    assert (run.run_dir / ".hydra" / "config.yaml").exists()


def test_same_seed_same_losses_bit_for_bit(tmp_path):
    a = run_titan(tmp_path / "a", "training.steps=5").check()
    b = run_titan(tmp_path / "b", "training.steps=5").check()
    c = run_titan(tmp_path / "c", "training.steps=5", "training.seed=7").check()
    assert a.losses == b.losses
    assert a.losses != c.losses


def test_resume_continues_bit_for_bit(tmp_path):
    common = ["training.steps=12", "checkpoint.interval=6", "checkpoint.keep_last_k=0", "training.val_interval=6"]
    full = run_titan(tmp_path / "full", *common).check()
    ckpts = sorted(p.name for p in (full.run_dir / "checkpoints").iterdir())
    assert ckpts == ["step-00000006", "step-00000012"]

    # A run that "died" after its step-6 checkpoint: resume from it in the same run dir.
    crashed = tmp_path / "crashed"
    shutil.copytree(full.run_dir, crashed)
    shutil.rmtree(crashed / "checkpoints" / "step-00000012")
    (crashed / "metrics.jsonl").write_text("")
    resumed = run_titan(crashed, *common).check()
    assert "resumed from" in resumed.stdout
    assert [r["step"] for r in resumed.train] == list(range(7, 13))
    assert resumed.losses == full.losses[6:]
    assert [r["val_loss"] for r in resumed.val] == [r["val_loss"] for r in full.val][1:]


def test_incomplete_and_corrupt_checkpoints(tmp_path):
    common = ["training.steps=4", "checkpoint.interval=2", "checkpoint.keep_last_k=0"]
    run = run_titan(tmp_path / "r", *common).check()
    # An interrupted save (no .complete marker) is never resumed from: auto picks step 2.
    (run.run_dir / "checkpoints" / "step-00000004" / ".complete").unlink()
    again = run_titan(run.run_dir, *common, "training.steps=5").check()
    assert "step-00000002" in again.stdout and [r["step"] for r in again.train][-3:] == [3, 4, 5]
    # A corrupted shard is reported with its path, and nothing is overwritten.
    ckpt = run.run_dir / "checkpoints" / "step-00000005"
    shard = next(ckpt.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    broken = run_titan(run.run_dir, *common, "training.steps=6", f"checkpoint.resume={ckpt}")
    assert broken.returncode != 0
    assert "cannot read checkpoint" in broken.stderr and str(ckpt) in broken.stderr
    assert (ckpt / ".complete").exists()


def test_wandb_offline_files(tmp_path):
    run = run_titan(tmp_path / "r", "training.steps=3", "logging=wandb", env={"WANDB_API_KEY": ""}).check()
    offline = list((run.run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert offline, list(run.run_dir.rglob("*"))[:20]
    state = json.loads((run.run_dir / "wandb.json").read_text())
    assert state["last_step"]["train"] == 3


def test_async_checkpoints_thread_and_process(tmp_path):
    common = ["training.steps=6", "checkpoint.interval=2", "checkpoint.keep_last_k=2"]
    sync = run_titan(tmp_path / "sync", *common).check()
    for mode in ("thread", "process"):
        run = run_titan(tmp_path / mode, *common, f"checkpoint.async_mode={mode}").check()
        assert run.losses == sync.losses  # saving in the background never changes training
        ckpts = sorted(p.name for p in (run.run_dir / "checkpoints").iterdir())
        assert ckpts == ["step-00000004", "step-00000006"]  # keep_last_k, all complete
        assert all((run.run_dir / "checkpoints" / c / ".complete").exists() for c in ckpts)
        assert all(r["checkpoint_block_s"] >= 0 for r in run.train)
