"""Optimizers, parameter groups and learning-rate schedules.

    optimizer = build_optimizer(model, cfg.optim, cfg.precision)   # after FSDP / TP
    scheduler = build_lr_scheduler(optimizer, cfg.lr_schedule, cfg.training.steps)
"""

from titan.optim.bf16_state import BF16StateAdam, BF16StateSGD
from titan.optim.factory import build_optimizer
from titan.optim.groups import param_groups
from titan.optim.schedule import build_lr_scheduler, lr_factor

__all__ = [
    "BF16StateAdam",
    "BF16StateSGD",
    "build_lr_scheduler",
    "build_optimizer",
    "lr_factor",
    "param_groups",
]
