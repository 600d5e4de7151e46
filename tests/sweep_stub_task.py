"""A stand-in for `python -m titan.train` that runs sweeps in about a second per job.

It composes and types the config exactly like the trainer (so a sweep file with a key the
schema lacks fails here too), then writes the run-dir files the trainer writes, with a loss
that is a smooth function of the swept settings, and returns the final validation loss as the
trainer does (the value an Optuna sweep minimises).

    python tests/sweep_stub_task.py -cp CONF_DIR -cn train -m +sweeps=tiny hydra.sweep.dir=...
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from titan.config.load import register_schemas, to_typed


DIVERGES_ABOVE_LR = 5e-3


def fake_loss(lr: float, weight_decay: float, warmup: int, step: int, steps: int) -> float:
    """Decays with the step toward a floor that is lowest at lr = 3e-3."""
    floor = 3.0 + (math.log10(lr) - math.log10(3e-3)) ** 2 + weight_decay + warmup / 100
    return floor + 5.0 * math.exp(-5.0 * step / steps)


@hydra.main(version_base="1.3", config_path=None, config_name="train")
def task(cfg: DictConfig) -> float:
    typed = to_typed(cfg)
    if typed.optim.lr > DIVERGES_ABOVE_LR:  # as the trainer does on a NaN (nan_check=stop)
        raise FloatingPointError(f"loss is NaN at lr={typed.optim.lr}")
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    t, o = typed.training, typed.optim
    tokens = t.global_batch_size * t.seq_len
    records, val, last = [], None, None
    for step in range(1, t.steps + 1):
        loss = last = fake_loss(o.lr, o.weight_decay, typed.lr_schedule.warmup_steps, step, t.steps)
        if step % typed.logging.interval == 0:
            records.append({"step": step, "loss": loss, "tokens_per_sec": 1000.0, "mfu": 0.1,
                            "tokens_seen": step * tokens})
        if step % t.val_interval == 0 or step == t.steps:
            val = loss + 0.05
            records.append({"step": step, "val_loss": val, "val_ppl": math.exp(val),
                            "tokens_seen": step * tokens})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {"final_loss": last, "final_val_loss": val, "steps": t.steps,
               "nproc_per_node": typed.parallel.nproc_per_node,
               "slurm_procid": os.environ.get("SLURM_PROCID")}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return val


if __name__ == "__main__":
    register_schemas()
    task()
