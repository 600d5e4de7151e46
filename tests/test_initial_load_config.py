"""`checkpoint.initial_load=` a titan checkpoint or run dir: the model config the weights were
trained with (its run's `.hydra/config.yaml`, or `titan_model.json` beside a seed/converted
checkpoint) must agree with this run's on every numerics-relevant field, not only on shapes."""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.test_config import compose_typed
from titan.config.errors import ConfigError
from titan.config.schema import RouterScore
from titan.config.validate import validate
from titan.interop import initial_weights, save_dcp_model
from titan.models import model_args
from titan.models.registry import family_of

VOCAB, SEQ = 2048, 32  # the default tokenizer's vocabulary; TINY's sequence length


def _weights(args) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    with torch.device("cpu"):
        return family_of(args).module_class(args).state_dict()


def _saved_run(root: Path, *overrides: str) -> Path:
    """A run dir as training leaves it: the resolved config and one complete checkpoint."""
    cfg = compose_typed("training.seq_len=32", *overrides)
    save_dcp_model(root / "checkpoints" / "step-00000001", _weights(model_args(cfg.model, VOCAB, SEQ)))
    (root / ".hydra").mkdir(parents=True)
    OmegaConf.save({"model": OmegaConf.structured(cfg.model), "training": {"seq_len": SEQ}}, root / ".hydra" / "config.yaml")
    return root


def _refused(run_dir: Path, preset: str, **changes) -> str:
    """validate() before launch of `preset` with `changes` (`moe_x` for model.moe.x): the
    one-line ConfigError's text, '' when the config passes."""
    cfg = _composed(preset, run_dir)
    for key, value in changes.items():
        target, name = (cfg.model.moe, key[4:]) if key.startswith("moe_") else (cfg.model, key)
        setattr(target, name, value)
    try:
        validate(cfg, world_size=1)
    except ConfigError as e:
        assert e.key.startswith("model.") and "\n" not in str(e)
        return str(e)
    return ""


def _composed(preset: str, run_dir: Path, cache: dict = {}):
    key = (preset, run_dir)
    if key not in cache:  # Hydra composes in ~1 s: once per preset, copied per variant
        cache[key] = compose_typed(f"model={preset}", "training.seq_len=32", f"checkpoint.initial_load={run_dir}")
    return copy.deepcopy(cache[key])


def test_a_llama_run_dir_trained_with_other_rope_or_norm_settings_is_refused(tmp_path):
    run_dir = _saved_run(tmp_path / "saved", "model=llama3_tiny")
    assert _refused(run_dir, "llama3_tiny") == ""  # the same config loads
    assert re.search(r"model.rope_theta=500000.0 but checkpoint.initial_load=\S+ has rope_theta=10000.0",
                     _refused(run_dir, "llama3_tiny", rope_theta=500000.0))
    assert "model.rope_scaling_factor=8.0 but" in _refused(run_dir, "llama3_tiny", rope_scaling_factor=8.0)
    assert "model.norm_eps=1e-06 but" in _refused(run_dir, "llama3_tiny", norm_eps=1e-6)


def test_a_moe_run_dir_with_other_routing_or_qk_norm_is_refused(tmp_path):
    run_dir = _saved_run(tmp_path / "saved", "model=qwen3_moe_debug")
    moe = "qwen3_moe_debug"
    assert re.search(r"model.moe.top_k=1 but \S+ has moe.top_k=2", _refused(run_dir, moe, moe_top_k=1))
    assert "model.moe.score='sigmoid' but" in _refused(run_dir, moe, moe_score=RouterScore.sigmoid)
    assert "model.qk_norm=False but" in _refused(run_dir, moe, qk_norm=False)
    assert "model.family=" in _refused(run_dir, moe, family="deepseek_v3")
    assert _refused(run_dir, moe, moe_aux_loss_coef=0.5) == ""  # a training setting: free to change


def test_a_seed_checkpoint_with_other_numerics_is_refused_before_launch_and_in_the_worker(tmp_path):
    cfg = compose_typed("model=llama3_tiny", "training.seq_len=32", f"checkpoint.initial_load={tmp_path / 'seed'}")
    run = model_args(cfg.model, VOCAB, SEQ)
    tied = dataclasses.replace(run, tie_embeddings=True)  # same tensor shapes: only the config tells
    save_dcp_model(tmp_path / "seed", _weights(tied), tied)
    message = r"model.tie_embeddings=False but checkpoint.initial_load=\S+ has tie_embeddings=True"
    with pytest.raises(ConfigError, match=message):
        validate(cfg, world_size=1)
    with pytest.raises(ConfigError, match=message):  # the worker's own check, with the real vocabulary
        initial_weights(str(tmp_path / "seed"), run)
    save_dcp_model(tmp_path / "same", _weights(run), run)
    assert initial_weights(str(tmp_path / "same"), run).keys() == _weights(run).keys()
