"""What the real Trainer does and reports, in one process: the bf16-state optimizer's rounding
follows training.seed, the logged LR is the one the step used, tokens/s counts training steps
only (validation and checkpoint time apart), and compile.loss really compiles the loss."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from parallel_harness import train_config
from titan.config.errors import ConfigError
from titan.optim import lr_factor
from titan.train.env import RankEnv
from titan.train.trainer import Trainer


def tiny_trainer(run_dir: Path, *overrides: str) -> Trainer:
    """tests/parallel_harness.py's tiny run (composed and validated as the CLI does)."""
    cfg = train_config(["parallel=single", *overrides], 1)
    cfg.run_dir = str(run_dir)
    return Trainer(cfg, RankEnv(0, 1, 0, torch.device("cpu")))


def records(trainer: Trainer) -> list[dict]:
    lines = (Path(trainer.cfg.run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def test_bf16_state_rounding_follows_training_seed(tmp_path: Path) -> None:
    """Same weights, same batch: the stochastic rounding of the bf16 states differs between
    two seeds and repeats for the same seed."""
    runs = {name: tiny_trainer(tmp_path / name, "precision=bf16_optim_states", f"training.seed={seed}")
            for name, seed in (("a", 1), ("b", 2), ("a_again", 1))}
    weights = {k: v.clone() for k, v in runs["a"].c.model.state_dict().items()}
    batches = [runs["a"].c.loader.next_batch() for _ in range(runs["a"].accum_steps)]
    states = {}
    for name, trainer in runs.items():
        trainer.c.model.load_state_dict(weights)
        trainer.train_step(batches)
        opt = trainer.c.optimizer
        states[name] = [opt.state[p][k] for g in opt.param_groups for p in g["params"] for k in ("exp_avg", "exp_avg_sq")]
    assert all(s.dtype is torch.bfloat16 for s in states["a"])
    assert all(torch.equal(x, y) for x, y in zip(states["a"], states["a_again"]))
    assert not all(torch.equal(x, y) for x, y in zip(states["a"], states["b"]))


def test_logged_lr_is_the_lr_the_step_used(tmp_path: Path) -> None:
    trainer = tiny_trainer(tmp_path, "training.steps=6", "lr_schedule=linear", "lr_schedule.warmup_steps=3",
                           "logging.interval=1", "optim.lr=1e-3")
    used = []  # the LR in the optimizer when each step's update runs
    trainer.c.optimizer.register_step_pre_hook(lambda opt, args, kwargs: used.append(opt.param_groups[0]["lr"]))
    trainer.fit()
    logged = [r["lr"] for r in records(trainer)]
    cfg = trainer.cfg.lr_schedule
    assert logged == pytest.approx(used, rel=1e-12)
    assert logged == pytest.approx([1e-3 * lr_factor(s, cfg, 6) for s in range(6)], rel=1e-12)
    assert logged[0] == pytest.approx(1e-3 / 3)  # warmup starts at 1/warmup, never at 0


def test_tokens_per_sec_counts_training_steps_only(tmp_path: Path) -> None:
    """A validation of 40 batches and a checkpoint save after every step: each record's
    training time (tokens / tokens_per_sec), val_s and checkpoint_block_s fit in the wall time
    between records, so neither is counted as training time."""
    trainer = tiny_trainer(tmp_path, "training.steps=4", "logging.interval=1", "training.val_interval=1",
                           "training.val_batches=40", "checkpoint.interval=1")
    trainer.fit()
    rec = records(trainer)
    tokens = trainer.tokens_per_step
    assert rec[0]["val_s"] == 0 and rec[0]["checkpoint_block_s"] == 0
    for before, r in zip(rec, rec[1:]):
        wall = r["elapsed_s"] - before["elapsed_s"]
        train_s = tokens / r["tokens_per_sec"]
        assert r["val_s"] > 0 and r["checkpoint_block_s"] > 0
        assert train_s + r["val_s"] + r["checkpoint_block_s"] <= wall + 1e-3, r
        assert math.isclose(r["tflops"], r["tokens_per_sec"] * trainer.c.flops_per_token / 1e12, rel_tol=1e-9)


def test_compiled_loss_is_compiled_and_matches_eager(tmp_path: Path) -> None:
    counters = torch._dynamo.utils.counters
    torch._dynamo.reset()
    compiled = tiny_trainer(tmp_path / "c", "compile.loss=true", "compile.backend=aot_eager")
    eager = tiny_trainer(tmp_path / "e")
    before = counters["stats"]["unique_graphs"]
    batches = [compiled.c.loader.next_batch() for _ in range(compiled.accum_steps)]
    got = [compiled.train_step(batches) for _ in range(2)]
    assert counters["stats"]["unique_graphs"] > before  # the loss went through dynamo
    graphs = counters["stats"]["unique_graphs"]
    expected = [eager.train_step(batches) for _ in range(2)]
    assert counters["stats"]["unique_graphs"] == graphs  # and only with compile.loss
    for (loss, norm), (loss_e, norm_e) in zip(got, expected):
        assert loss == pytest.approx(loss_e, rel=1e-6) and norm == pytest.approx(norm_e, rel=1e-5)


def test_cpu_offload_needs_an_fsdp_layout() -> None:
    with pytest.raises(ConfigError, match="shards nothing") as err:
        train_config(["parallel=ddp", "parallel.cpu_offload=true"], 2)
    assert err.value.key == "parallel.cpu_offload"
    train_config(["parallel=fsdp", "parallel.cpu_offload=true"], 2)  # accepted


def test_dcp_reader_docstring_names_the_checkpoint_keys(tmp_path: Path) -> None:
    import titan.interop.dcp_io as dcp_io

    keys = set(tiny_trainer(tmp_path).c.state.state_dict())
    assert keys == {"step", "model", "optim", "lr_scheduler", "data", "rng"}
    assert all(f'"{key}"' in dcp_io.__doc__ for key in keys), dcp_io.__doc__.splitlines()[2]
