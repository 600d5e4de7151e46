"""Multi-process runs through the real CLI: self-launch, parity with one process, resharded resume.

(Per-layout numerics for every preset are in test_parallel_numerics.py; these check the whole
path: launcher, data sharding, metrics from rank 0, sharded checkpoints.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import run_titan

STEPS = ["training.steps=6", "lr_schedule.warmup_steps=2"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return run_titan(tmp_path_factory.mktemp("single") / "r", *STEPS).check()


def assert_close(a: list[float], b: list[float], rtol: float = 1e-5) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert abs(x - y) <= rtol * abs(y), (a, b)


@pytest.mark.parametrize("layout", ["fsdp", "tp", "cp", "pp"])
def test_two_processes_match_single(single, tmp_path, layout):
    run = run_titan(tmp_path / "r", *STEPS, f"parallel={layout}").check()
    assert_close(run.losses, single.losses)
    assert all(r["tokens_per_sec"] > 0 for r in run.train)
    assert (run.run_dir / "logs").is_dir()  # every rank's output is kept


def test_resume_under_another_layout(single, tmp_path):
    """Saved with fsdp on 4 ranks; resumed with fsdp_tp (2x2) on 4, pp on 2 and single on 1."""
    common = [*STEPS, "checkpoint.interval=3", "checkpoint.keep_last_k=0"]
    fsdp4 = run_titan(tmp_path / "fsdp4", *common, "parallel=fsdp", "parallel.nproc_per_node=4").check()
    assert_close(fsdp4.losses, single.losses)
    for layout in (["parallel=fsdp_tp"], ["parallel=pp"], ["parallel=single"]):
        resumed_dir = tmp_path / layout[0].split("=")[1]
        shutil.copytree(fsdp4.run_dir, resumed_dir)
        shutil.rmtree(resumed_dir / "checkpoints" / "step-00000006")
        (resumed_dir / "metrics.jsonl").write_text("")
        resumed = run_titan(resumed_dir, *common, *layout).check()
        assert [r["step"] for r in resumed.train] == [4, 5, 6]
        assert_close(resumed.losses, fsdp4.losses[3:])


def test_failing_rank_ends_the_job_with_its_error(tmp_path):
    """Ranks that fail (here: a corrupted checkpoint shard) end the job with the error shown."""
    common = [*STEPS, "parallel=ddp", "checkpoint.interval=3"]
    run = run_titan(tmp_path / "r", *common, "training.steps=3").check()
    shard = next((run.run_dir / "checkpoints" / "step-00000003").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:64])
    failed = run_titan(run.run_dir, *common, timeout=300)
    assert failed.returncode == 1
    # One line (no agent log, no traceback) naming the problem and the rank's error file, which
    # keeps the whole traceback ("titan: ..." lines: the tokenizer trained on first use).
    lines = [line for line in failed.stderr.strip().splitlines() if not line.startswith("titan: ")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "cannot read checkpoint" in lines[0], failed.stderr
    error_file = Path(lines[0].rsplit("traceback in ", 1)[1].rstrip(")"))
    assert error_file.is_relative_to(run.run_dir / "logs")
    assert "titan.checkpoint.CheckpointError: cannot read" in json.loads(error_file.read_text())["message"]["extraInfo"]["py_callstack"]
