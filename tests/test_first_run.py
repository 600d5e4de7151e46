"""The first minutes of a new user (issue 16): a start-up summary before step 1, a final
checkpoint saved by default, and closing hints whose commands work as printed."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from tests.helpers import REPO, run_titan


@pytest.mark.slow
def test_summary_final_checkpoint_and_hints_that_run(tmp_path):
    run = run_titan(tmp_path / "run", "training.steps=3").check()  # checkpoint settings: the defaults
    out = run.stdout
    summary, _, rest = out.partition("step      1")
    for expected in ("titan run", "llama3_tiny:", "parameters", "single (no parallelism) on 1 process",
                     "cpu, precision fp32", "128 tokens per step = 4 sequences x 32 tokens",
                     "embedded:", "tokenizer  default, vocab", f"run dir    {run.run_dir}",
                     "starts from scratch"):
        assert expected in summary, (expected, summary)
    assert len(summary.strip().splitlines()) <= 25  # one screen
    assert (run.run_dir / "checkpoints" / "step-00000003" / ".complete").exists()

    hints = rest.split("next:", 1)[1].strip().splitlines()
    assert [h.split()[2] for h in hints] == ["titan.tools.generate", "titan.tools.convert", "titan.tools.compare"]
    generate = hints[0].split("#")[0].strip() + " max_new_tokens=4"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(generate, shell=True, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("def "), proc.stdout

    # Run again with more steps: it says it resumes, and from where.
    again = run_titan(tmp_path / "run", "training.steps=4").check()
    assert re.search(r"start\s+resumes from \S+step-00000003 at step 3", again.stdout), again.stdout[:2000]


@pytest.mark.slow
def test_no_final_checkpoint_when_turned_off(tmp_path):
    run = run_titan(tmp_path / "run", "training.steps=3", "checkpoint.save_final=false").check()
    assert not (run.run_dir / "checkpoints").exists()
    assert "no checkpoint was saved" in run.stdout
