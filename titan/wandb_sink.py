"""Weights & Biases sink: one per job (rank 0), offline unless a key is present, never fatal.

A run resumed in the same run dir continues the same W&B run (id kept in `wandb.json`) on an
explicit `trainer/step` axis; steps already logged before the restart are not sent twice.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

from titan.config.load import plain
from titan.config.schema import TrainConfig

log = logging.getLogger("titan")

# Overrides that say where or how a run was launched, not what it trains.
NOISE_PREFIXES = ("hydra.", "checkpoint.resume", "logging.", "logging=", "parallel.launcher", "training.dry_run", "+sweeps", "sweeps")
STEP_AXIS = "trainer/step"


def run_name(cfg: TrainConfig) -> str:
    if cfg.logging.name:
        return cfg.logging.name
    parts = [o.lstrip("+~") for o in cfg.overrides if not o.lstrip("+~").startswith(NOISE_PREFIXES)]
    return ",".join(parts) or Path(cfg.run_dir).name


def flat_config(cfg: TrainConfig) -> dict[str, Any]:
    """The resolved config and Hydra's group choices as flat dotted keys ('optim.lr',
    'choices.parallel'), which W&B can filter and group runs by."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat[prefix] = value

    walk("", plain(cfg))
    flat["overrides"] = " ".join(cfg.overrides)
    return flat


def run_tags(cfg: TrainConfig) -> list[str]:
    tags = [f"{group}:{cfg.choices[group]}" for group in ("model", "parallel", "precision") if group in cfg.choices]
    return tags + list(cfg.logging.tags)


class WandbSink:
    def __init__(self, cfg: TrainConfig):
        self.state_path = Path(cfg.run_dir) / "wandb.json"
        state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
        # Last step sent, per record kind ("train" / "val"): replays after a resume are skipped.
        self.last_step = {"train": -1, "val": -1, "eval": -1, **state.get("last_step", {})}
        self.run = None
        try:
            import wandb

            mode = cfg.logging.mode or os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
            self.run = wandb.init(
                project=cfg.logging.project,
                entity=cfg.logging.entity,
                group=cfg.logging.group or cfg.sweep_name,
                name=run_name(cfg),
                tags=run_tags(cfg),
                job_type="train",
                config=flat_config(cfg),
                dir=cfg.run_dir,
                id=state.get("id"),
                resume="allow",
                mode=mode,
                settings=wandb.Settings(silent=True, console="off"),
            )
            self.run.define_metric(STEP_AXIS)
            self.run.define_metric("*", step_metric=STEP_AXIS)
            # Run summaries that compare runs: the best validation loss, the final downstream scores.
            self.run.define_metric("val_loss", step_metric=STEP_AXIS, summary="min,last")
            self.run.define_metric("loss", step_metric=STEP_AXIS, summary="min,last")
            self.run.define_metric("eval/*", step_metric=STEP_AXIS, summary="last,max")
            self._save_state()
        except Exception as e:  # W&B must never take training down
            log.warning("W&B disabled: %s", e)
            self.run = None

    def _save_state(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        state = {"id": self.run.id, "name": self.run.name, "group": self.run.group, "tags": list(self.run.tags), "last_step": self.last_step}
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.state_path)

    def log(self, record: dict[str, Any]) -> None:
        if self.run is None:
            return
        step, kind = record["step"], "val" if "val_loss" in record else "train" if "loss" in record else "eval"
        # Steps replayed after a resume were logged by the first attempt (identically: resume is exact).
        if step <= self.last_step[kind]:
            return
        try:
            self.run.log({STEP_AXIS: step, **{k: v for k, v in record.items() if k != "step"}})
            self.last_step[kind] = step
            self._save_state()
        except Exception as e:
            log.warning("W&B logging failed, disabling it: %s", e)
            self.run = None

    def close(self, summary: Optional[dict[str, Any]] = None) -> None:
        if self.run is None:
            return
        try:
            if summary:
                self.run.summary.update(plain(summary))
            self.run.finish()
        except Exception as e:
            log.warning("W&B finish failed: %s", e)
        self.run = None
