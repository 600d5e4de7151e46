"""Everything a restart needs, as one Stateful object that DCP saves and loads."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
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

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, loader, model_keys: Optional[set] = None):
        self.model = model
        # Only these model keys are saved and loaded (LoRA: the adapters; the frozen base
        # comes from checkpoint.initial_load or the seeded init on every start). None: all.
        self.model_keys = model_keys
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.loader = loader
        self.step = 0
        # More Stateful parts, saved under their key (fault_tolerance.semi_sync: "semi_sync").
        self.extras: dict[str, Stateful] = {}

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "model": self._model_state(),
            "optim": get_optimizer_state_dict(self.model, self.optimizer),
            "lr_scheduler": self.scheduler.state_dict(),
            "data": self.loader.state_dict(),
            "rng": torch.get_rng_state(),
            **{key: part.state_dict() for key, part in self.extras.items()},
        }

    def _model_state(self) -> dict[str, Any]:
        state = get_model_state_dict(self.model)
        return state if self.model_keys is None else {k: v for k, v in state.items() if k in self.model_keys}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        options = None if self.model_keys is None else StateDictOptions(strict=False)
        set_model_state_dict(self.model, state["model"], options=options)
        set_optimizer_state_dict(self.model, self.optimizer, state["optim"])
        self.scheduler.load_state_dict(state["lr_scheduler"])
        self.loader.load_state_dict(state["data"])
        torch.set_rng_state(state["rng"])
        for key, part in self.extras.items():
            if key in state:
                part.load_state_dict(state[key])
