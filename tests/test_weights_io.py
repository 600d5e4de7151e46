"""Weights in and out of runs through the CLI: seed checkpoints, HF export, HF initial load."""

from __future__ import annotations

import json

from tests.helpers import run_titan

STEPS = ["training.steps=3", "lr_schedule.warmup_steps=1"]


def test_seed_checkpoint_starts_any_layout_identically(tmp_path):
    seed = run_titan(tmp_path / "seed", "checkpoint.create_seed=true", "training.seed=123").check()
    assert (seed.run_dir / "seed" / ".complete").exists() and not seed.records
    # A different training.seed would give other weights; the seed checkpoint overrides them.
    single = run_titan(tmp_path / "a", *STEPS, f"checkpoint.initial_load={seed.run_dir}/seed").check()
    fsdp = run_titan(tmp_path / "b", *STEPS, "parallel=fsdp", f"checkpoint.initial_load={seed.run_dir}/seed").check()
    fresh = run_titan(tmp_path / "c", *STEPS).check()
    assert all(abs(x - y) <= 1e-5 * abs(y) for x, y in zip(fsdp.losses, single.losses))
    assert single.losses[0] != fresh.losses[0]


def test_export_hf_then_start_from_it(tmp_path):
    first = run_titan(tmp_path / "a", *STEPS, "checkpoint.export_hf=true", "checkpoint.interval=3").check()
    hf = first.run_dir / "hf"
    config = json.loads((hf / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["hidden_size"] == 64
    assert (hf / "model.safetensors").exists()
    # Starting from the exported weights reproduces the end of the first run: its next loss
    # (evaluated on the same first batch) is lower than a fresh start's.
    again = run_titan(tmp_path / "b", *STEPS, f"checkpoint.initial_load=hf:{hf}").check()
    fresh = run_titan(tmp_path / "c", *STEPS).check()
    assert again.losses[0] < fresh.losses[0]
