"""benchmarks/step_floor.py: the profiled split of a real Trainer step adds up."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from step_floor import measure, table  # noqa: E402


def test_floor_splits_a_real_step_into_matmul_attention_and_the_rest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = measure(["model=llama3_tiny", "training.seq_len=64", "training.global_batch_size=2"], steps=2, warmup=1, profiled=2)
    assert r["matmul_ms"] > 0 and r["attention_ms"] > 0 and r["matmul_gflops"] > 0
    # the kernels are a part of the profiled step, so the floor is above the step's throughput
    assert r["matmul_ms"] + r["attention_ms"] < r["profiled_step_ms"]
    assert r["floor_tokens_per_s"] > r["tokens_per_step"] / (r["profiled_step_ms"] / 1e3)
    assert "floor (matmul + attention only)" in table(r)
