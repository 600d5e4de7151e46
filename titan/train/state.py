"""Everything a restart needs, as one Stateful object that DCP saves and loads."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful


class TrainState(Stateful):
    """Step, model, optimizer, LR schedule, data position and RNG.

    Model and optimizer go through torch's distributed state-dict API, so the saved keys are
    the plain model FQNs whatever the layout (FSDP, TP, ...): a checkpoint written under one
    layout loads under another. The data loader's state is the same on every rank (each rank
    reads the same global stream and takes its slice), so it reshards for free."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, loader):
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.loader = loader
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "model": get_model_state_dict(self.model),
            "optim": get_optimizer_state_dict(self.model, self.optimizer),
            "lr_scheduler": self.scheduler.state_dict(),
            "data": self.loader.state_dict(),
            "rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        set_model_state_dict(self.model, state["model"])
        set_optimizer_state_dict(self.model, self.optimizer, state["optim"])
        self.scheduler.load_state_dict(state["lr_scheduler"])
        self.loader.load_state_dict(state["data"])
        torch.set_rng_state(state["rng"])
