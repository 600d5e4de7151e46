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
