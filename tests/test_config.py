"""Config composition, the typed schema, and one clear error per impossible setting."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from tests.helpers import run_titan
from titan.config.errors import ConfigError
from titan.config.load import CONF_DIR, register_schemas, to_typed
from titan.config.schema import OptimName, TrainConfig
from titan.config.validate import validate


def compose_typed(*overrides: str) -> TrainConfig:
    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_typed(compose(config_name="train", overrides=list(overrides)))


def test_default_composes_to_typed_config():
    cfg = compose_typed()
    assert isinstance(cfg, TrainConfig)
    assert cfg.model.name == "llama3_debug" and cfg.model.dim == 256 and cfg.model.n_layers == 6
    assert cfg.optim.name is OptimName.adamw
    assert cfg.training.seq_len == 256 and cfg.training.global_batch_size == 8
    validate(cfg, world_size=1)


@pytest.mark.parametrize("name", ["llama3_1b", "llama3_3b", "llama3_8b", "llama3_70b", "llama3_405b"])
def test_model_presets_compose(name):
    cfg = compose_typed(f"model={name}")
    assert cfg.model.name == name and cfg.model.vocab_size == 128256
    assert cfg.model.rope_scaling_factor == (32.0 if name in ("llama3_1b", "llama3_3b") else 8.0)  # 3.2 vs 3.1
    validate(cfg, world_size=1)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["model.n_heads=7"], "model.n_heads"),
        (["model.n_kv_heads=3"], "model.n_kv_heads"),
        (["lr_schedule.warmup_steps=-1"], "lr_schedule.warmup_steps"),
        (["training.global_batch_size=6", "training.micro_batch_size=4"], "training.global_batch_size"),
        (["optim.lr=-1"], "optim.lr"),
        (["data=files"], "data.path"),
        (["tokenizer.kind=sentencepiece", "tokenizer.path=/nonexistent.model"], "tokenizer.path"),
        (["checkpoint.resume=/nonexistent/ckpt"], "checkpoint.resume"),
        (["checkpoint.interval=-5"], "checkpoint.interval"),
    ],
)
def test_validation_names_the_key(overrides, key):
    cfg = compose_typed(*overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=1)
    assert err.value.key == key, str(err.value)


def test_appended_unknown_key_is_refused():
    # `+key=value` slips past Hydra's schema merge; titan refuses it instead of dropping it.
    with pytest.raises(ConfigError) as err:
        compose_typed("+training.stepz=5")
    assert err.value.key == "training.stepz"


def test_cli_config_error_exits_2_with_one_message(tmp_path):
    run = run_titan(tmp_path / "r", "model.n_heads=7", tiny=False)
    assert run.returncode == 2
    assert "model.n_heads" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize("override, needle", [("training.stepz=3", "stepz"), ("training.steps=abc", "training.steps"), ("model=nope", "nope")])
def test_cli_hydra_errors_exit_2(tmp_path, override, needle):
    run = run_titan(tmp_path / "r", override, tiny=False)
    assert run.returncode == 2, run.stderr
    assert needle in run.stderr and "Traceback" not in run.stderr


def test_cli_cfg_job_and_dry_run_8b(tmp_path):
    shown = run_titan(tmp_path / "a", "model=llama3_8b", "--cfg", "job", tiny=False).check()
    assert "dim: 4096" in shown.stdout and "n_layers: 32" in shown.stdout
    dry = run_titan(tmp_path / "b", "model=llama3_8b", "training.dry_run=true", tiny=False).check()
    assert "8,030,261,248 parameters" in dry.stdout and "8.03B" in dry.stdout
    assert "GFLOP/token" in dry.stdout
