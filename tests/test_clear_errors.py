"""Mistakes a new user makes, through the real CLI: one clear line and an exit code, never a traceback."""

from __future__ import annotations

import pytest

from tests.helpers import run_titan


def _one_line(run, prefix: str, *needles: str) -> str:
    output = run.stdout + run.stderr
    assert "Traceback" not in output, output[-3000:]
    lines = [x for x in run.stderr.splitlines() if x.startswith(prefix)]
    assert len(lines) == 1, output[-3000:]
    assert all(n in lines[0] for n in needles), lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "overrides, needles",
    [
        (["parallel.nproc_per_node=0"], ["parallel.nproc_per_node", ">= 1"]),
        (["checkpoint.initial_load=hf:/missing/dir"], ["checkpoint.initial_load", "/missing/dir", "config.json"]),
        (["model.vocab_size=1000"], ["model.vocab_size", "2048", "model.vocab_size=-1"]),
        (["training.seq_len=1000000"], ["training.seq_len", "GiB per rank", "activation_checkpoint=full"]),
    ],
)
def test_config_mistakes_exit_2_with_one_line(tmp_path, overrides, needles):
    run = run_titan(tmp_path / "r", *overrides, "training.steps=2")
    assert run.returncode == 2, run.stderr[-3000:]
    _one_line(run, "config error:", *needles)
    if "training.seq_len=1000000" in overrides:  # refused before building anything, after saying what starts
        assert "starting llama3_tiny" in run.stdout + run.stderr and not run.records


def test_unwritable_run_dir(tmp_path):
    (tmp_path / "a_file").write_text("")
    run = run_titan(tmp_path / "a_file" / "run", "training.steps=2")
    assert run.returncode == 2
    _one_line(run, "config error:", "hydra.run.dir", "not a directory")


def test_tensorboard_missing(tmp_path):
    shadow = tmp_path / "shadow" / "tensorboard"  # stands for an environment without the package
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'tensorboard'\")\n")
    run = run_titan(tmp_path / "r", "logging=tensorboard", "training.steps=2", env={"PYTHONPATH": str(shadow.parent)})
    assert run.returncode == 2
    _one_line(run, "config error:", "logging", "pip install tensorboard")


def test_resume_with_another_seed(tmp_path):
    common = ["training.steps=2", "checkpoint.interval=2"]
    run_titan(tmp_path / "r", *common).check()
    run = run_titan(tmp_path / "r", *common, "training.steps=4", "training.seed=7")
    assert run.returncode == 1
    _one_line(run, "error:", "cannot resume", "seed", "checkpoint.resume=none")
