"""profiling= options: traces and memory records land in the run dir; NaN checks stop or skip."""

from __future__ import annotations

import json

from tests.helpers import run_titan


def test_trace_and_memory_record(tmp_path):
    run = run_titan(tmp_path / "r", "training.steps=4", "profiling=trace", "profiling.trace_interval=2").check()
    traces = sorted(p.name for p in (run.run_dir / "profiles").glob("trace_*.json"))
    assert traces == ["trace_step2_rank0.json", "trace_step4_rank0.json"]
    events = json.loads((run.run_dir / "profiles" / traces[0]).read_text())["traceEvents"]
    assert any("aten::mm" in e.get("name", "") for e in events)
    memory = [json.loads(line) for line in (run.run_dir / "profiles" / "memory_rank0.jsonl").read_text().splitlines()]
    assert [m["step"] for m in memory] == [1, 2, 3, 4] and all(m["peak_gib"] > 0 for m in memory)


def test_nan_stops_the_run_naming_the_step(tmp_path):
    # Weights of size 1e30 overflow in the first matmuls: the loss is not finite at step 1.
    run = run_titan(tmp_path / "r", "training.steps=4", "model.init_std=1e30", "checkpoint.interval=1")
    assert run.returncode == 1
    assert "at step 1" in run.stderr and "nan_check=stop" in run.stderr
    assert not (run.run_dir / "checkpoints").exists() or not any((run.run_dir / "checkpoints").iterdir())


def test_nan_skip_drops_the_updates(tmp_path):
    run = run_titan(tmp_path / "r", "training.steps=3", "model.init_std=1e30", "profiling.nan_check=skip").check()
    assert "update skipped" in run.stdout + run.stderr
    assert len(run.train) == 3
