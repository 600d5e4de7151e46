"""training.spike_guard: a step whose loss or grad norm jumps far above its recent window is
not applied; the run goes on, logs it and counts it."""

from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_dir

from titan.config.errors import ConfigError
from titan.config.load import CONF_DIR, register_schemas, to_typed
from titan.config.schema import SpikeGuardConfig
from titan.config.validate import validate
from titan.train.spike_guard import SpikeGuard
from tests.helpers import TINY


def test_window_statistics_decide_spikes():
    guard = SpikeGuard(SpikeGuardConfig(enabled=True, window=10, sigmas=3.0, min_history=5, max_consecutive=2))
    noisy = [3.0, 3.1, 2.9, 3.05, 2.95, 3.0, 3.1]
    assert not any(guard.should_skip(i, v, 1.0 + 0.01 * i) for i, v in enumerate(noisy))
    assert guard.should_skip(10, 9.0, 1.0)  # loss spike
    assert guard.should_skip(11, 3.0, 50.0)  # grad-norm spike
    # A third spike in a row is taken as the new level: accepted, and the window restarts.
    assert not guard.should_skip(12, 9.0, 1.0)
    assert guard.skipped == 2 and len(guard.windows["loss"]) == 1
    # Non-finite values are left to profiling.nan_check and never enter the window.
    assert not guard.should_skip(13, float("nan"), 1.0) and len(guard.windows["loss"]) == 1


def test_disabled_or_unwatched_metric_never_skips():
    off = SpikeGuard(SpikeGuardConfig(enabled=False, min_history=2))
    loss_only = SpikeGuard(SpikeGuardConfig(enabled=True, min_history=2, watch=["loss"]))
    for i, v in enumerate([1.0, 1.1, 0.9, 1.0]):
        off.should_skip(i, v, 1.0), loss_only.should_skip(i, v, 1.0 + 0.01 * i)
    assert not off.should_skip(9, 100.0, 1.0)
    assert not loss_only.should_skip(9, 1.0, 1000.0) and loss_only.should_skip(10, 100.0, 1.0)


def _typed(*overrides: str):
    register_schemas()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = to_typed(compose(config_name="train", overrides=list(overrides)))
    validate(cfg, 1)
    return cfg


def test_bad_settings_name_the_key():
    with pytest.raises(ConfigError, match="training.spike_guard.watch"):
        _typed("training.spike_guard.watch=[loss,lr]")
    with pytest.raises(ConfigError, match="training.spike_guard.window"):
        _typed("training.spike_guard.window=1")


def test_injected_spike_is_skipped_by_the_real_trainer(tmp_path):
    """Train the tiny model; at step 12 scale the loss (and so its gradients) by 1000, as a bad
    batch would: that update is dropped (weights unchanged), the others are applied."""
    from titan.train.env import setup_rank
    from titan.train.trainer import Trainer

    cfg = _typed(*TINY, "training.steps=14", "training.spike_guard.enabled=true", "training.spike_guard.min_history=8",
                 "optim.max_norm=0", "optim.lr=1e-3")
    cfg.run_dir = str(tmp_path)
    trainer = Trainer(cfg, setup_rank(cfg))
    loss_fn, weights = trainer.loss_fn, {}

    def spiky_loss(logits, labels):
        step = trainer.c.state.step
        weights[step] = trainer.c.model.output.weight.detach().clone()  # before this step's update
        return loss_fn(logits, labels) * (1000.0 if step == 12 else 1.0)

    trainer.loss_fn = spiky_loss
    summary = trainer.fit()
    final = trainer.c.model.output.weight.detach()
    assert summary["skipped_steps"] == 1
    assert torch.equal(weights[12], weights[13])  # the spiked update was not applied
    assert not torch.equal(weights[11], weights[12]) and not torch.equal(weights[13], final)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in records if "loss" in r}
    assert by_step[11]["skipped_steps"] == 0 and by_step[12]["skipped_steps"] == 1
    assert by_step[12]["loss"] > 100 * by_step[11]["loss"]
