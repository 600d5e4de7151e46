"""conf/experiment/: every recipe composes, validates for its own world size and dry-runs;
the CPU-sized ones train a few steps."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from titan.config.load import CONF_DIR, register_schemas, to_typed
from titan.config.validate import validate
from titan.parallel.mesh import DIMS
from titan.train.dry_run import dry_run
from tests.helpers import run_titan

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
CPU_EXPERIMENTS = [e for e in EXPERIMENTS if e.endswith("_cpu")]
GPU_EXPERIMENTS = {"llama3_8b_fsdp_tp_float8": (8, 8.03e9), "llama3_70b_hsdp_tp": (256, 70.6e9), "llama3_405b_3d": (512, 405.9e9)}
SFT_EXPERIMENTS = {"llama3_8b_sft": (8, 8.03e9)}  # fine-tuning recipes: chat data, no float8


def _compose(name: str, *extra: str):
    register_schemas()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_typed(compose(config_name="train", overrides=[f"experiment={name}", *extra]))


def _world(cfg) -> int:
    degrees = [getattr(cfg.parallel, d) for d in DIMS]
    return cfg.parallel.nproc_per_node if -1 in degrees else math.prod(degrees)


def test_published_setups_are_present():
    assert set(GPU_EXPERIMENTS) <= set(EXPERIMENTS) and len(CPU_EXPERIMENTS) >= 2


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_validates_and_dry_runs(name, tmp_path):
    tokenizer = tmp_path / "tokenizer.model"  # only its existence is checked before building
    tokenizer.write_text("")
    cfg = _compose(name, "tokenizer.path=null" if name in CPU_EXPERIMENTS else f"tokenizer.path={tokenizer}")
    world = _world(cfg)
    validate(cfg, world)
    report = dry_run(cfg)
    # A complete recipe: every concern is set by the experiment, not left to the defaults.
    assert cfg.training.spike_guard.enabled and cfg.checkpoint.interval > 0
    if name in GPU_EXPERIMENTS:
        expected_world, params = GPU_EXPERIMENTS[name]
        assert world == expected_world and report["params"] == pytest.approx(params, rel=0.01)
        assert cfg.precision.float8.value != "none" and cfg.training.seq_len == 8192
        assert cfg.data.path == "allenai/c4" and cfg.logging.backend.value == "wandb"
    elif name in SFT_EXPERIMENTS:
        expected_world, params = SFT_EXPERIMENTS[name]
        assert world == expected_world and report["params"] == pytest.approx(params, rel=0.01)
        assert cfg.task.name.value == "sft" and cfg.checkpoint.export_hf
    else:
        assert cfg.eval.interval > 0 and cfg.eval.tasks


@pytest.mark.slow
def test_cli_dry_run_of_the_405b_recipe_under_a_launcher(tmp_path):
    """As srun would start rank 0 of 512: the CLI validates the 3-D layout and dry-runs."""
    tokenizer = tmp_path / "tokenizer.model"
    tokenizer.write_text("")
    env = {"RANK": "0", "WORLD_SIZE": "512", "LOCAL_RANK": "0"}
    run = run_titan(tmp_path / "r", "experiment=llama3_405b_3d", f"tokenizer.path={tokenizer}", "training.dry_run=true", tiny=False, env=env).check()
    assert "405" in run.stdout and "meta device" in run.stdout


@pytest.mark.slow
@pytest.mark.parametrize("name", CPU_EXPERIMENTS)
def test_cpu_experiment_trains_a_few_steps(name, tmp_path):
    run = run_titan(tmp_path / "r", f"experiment={name}", "training.steps=3", "lr_schedule.warmup_steps=1", "training.val_interval=3",
                    "checkpoint.interval=3", "eval.interval=0", "data.max_documents=200", "training.seq_len=64", "training.val_batches=1", tiny=False).check()
    assert [r["step"] for r in run.train][-1] == 3 and run.val
    assert (run.run_dir / "checkpoints" / "step-00000003" / ".complete").exists()
