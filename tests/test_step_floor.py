"""benchmarks/step_floor.py: the kernels recorded from a real Trainer step replay, and add up."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from step_floor import measure, table  # noqa: E402


def test_floor_splits_a_real_step_into_matmul_attention_and_the_rest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = measure(["model=llama3_tiny", "training.seq_len=64", "training.global_batch_size=2"], rounds=3, warmup=1)
    cfg_layers = 2  # llama3_tiny
    # forward: 7 linears per layer + the output projection; backward: two matmuls for each
    assert r["matmul_calls"] == 3 * (7 * cfg_layers + 1)
    assert r["attention_calls"] == 2 * cfg_layers  # SDPA forward and backward per layer
    assert r["matmul_ms"] > 0 and r["attention_ms"] > 0 and r["matmul_gflops"] > 0
    assert r["floor_tokens_per_s"] > 0 and "floor (matmul + attention only)" in table(r)
