"""A real sweep through the trainer (Hydra multirun), then the compare tool on its result."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import REPO


def test_tiny_sweep_then_compare(tmp_path):
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "titan.train", "-m", "+sweeps=tiny", "logging=wandb", f"hydra.sweep.dir={sweep_dir}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in sweep_dir.iterdir() if (p / "metrics.jsonl").exists())
    assert len(jobs) == 2 and all((j / "summary.json").exists() for j in jobs)
    # One W&B run per job (offline here), grouped by the sweep, named by what differs.
    runs = [json.loads((j / "wandb.json").read_text()) for j in jobs]
    assert [r["group"] for r in runs] == ["sweep", "sweep"]
    assert sorted(r["name"] for r in runs) == ["optim.lr=0.001", "optim.lr=0.003"]
    assert all("model:llama3_tiny" in r["tags"] and r["last_step"]["train"] == 10 for r in runs)
    assert all(list((j / "wandb").glob("offline-run-*/run-*.wandb")) for j in jobs)

    plot = tmp_path / "cmp.png"
    table = subprocess.run(
        [sys.executable, "-m", "titan.tools.compare", str(sweep_dir), "--out", str(plot)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert table.returncode == 0, table.stderr
    assert "optim.lr" in table.stdout and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Different learning rates give different curves: the divergence check must say so.
    check = subprocess.run(
        [sys.executable, "-m", "titan.tools.compare", str(sweep_dir), "--no-plot", "--reference", str(jobs[0]), "--rtol", "1e-6"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert check.returncode == 1, check.stdout
