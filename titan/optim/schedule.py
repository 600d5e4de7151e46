"""Learning-rate schedules as a LambdaLR factor of the base LR.

`lr_factor(s)` is the factor for optimizer step s (0-based): LambdaLR evaluates it at 0 when
built and at s after the s-th `scheduler.step()`, which the trainer calls after each
optimizer step. Warmup is linear from 1/warmup to 1 (never a zero-LR step); the decay phase of
every schedule ends exactly at `min_lr_factor` on the last step (steps - 1).
"""

from __future__ import annotations

import functools
import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from titan.config.schema import LRScheduleConfig, LRScheduleName


def lr_factor(step: int, cfg: LRScheduleConfig, total_steps: int) -> float:
    warmup, floor = cfg.warmup_steps, cfg.min_lr_factor
    if step < warmup:
        return (step + 1) / warmup
    if cfg.name is LRScheduleName.constant:
        return 1.0
    last = total_steps - 1
    if cfg.name is LRScheduleName.wsd:
        decay_steps = min(round(cfg.decay_fraction * total_steps), total_steps - warmup)
        if decay_steps <= 0 or step < total_steps - decay_steps:
            return 1.0
        # The decay_steps steps below 1.0 end at the floor: 1/decay_steps of the way, ..., all the way.
        progress = (step - (total_steps - decay_steps) + 1) / decay_steps
    else:
        progress = (step - warmup) / max(1, last - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if cfg.name is LRScheduleName.cosine:
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1 - (1 - floor) * progress  # linear and wsd's decay


def build_lr_scheduler(optimizer: Optimizer, cfg: LRScheduleConfig, total_steps: int) -> LambdaLR:
    return LambdaLR(optimizer, functools.partial(lr_factor, cfg=cfg, total_steps=total_steps))
