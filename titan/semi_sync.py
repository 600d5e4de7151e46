"""Semi-synchronous training across replica groups: torchft's LocalSGD and DiLoCo.

Inside a replica group every step stays synchronous (FSDP, DDP, TP ... over the group's own
process group). Across groups nothing is exchanged for `sync_every` inner steps; then, inside
the inner optimizer's step (torchft's optimizer hooks), the groups agree a quorum and

- local_sgd: average their weights;
- diloco: average their weight deltas since the last sync (the pseudo-gradient) and apply it
  to the last synced weights with an outer optimizer (SGD with Nesterov momentum).

Either way every group holds the same weights right after a sync. The algorithms are torchft's
own; this module builds them from the config and makes their state part of titan's checkpoint
(the step within the interval and, for DiLoCo, the last synced weights and the outer
optimizer's momentum), so a resume mid-interval continues exactly. A group that heals from a
live peer receives the DiLoCo state through torchft's own state-dict hook.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.tensor import DTensor

from titan.config.schema import FaultToleranceConfig, SemiSync


class SemiSynchronous:
    """One rank's torchft LocalSGD or DiLoCo, hooked into the inner optimizer; a Stateful part
    of the training state (TrainState.extras["semi_sync"])."""

    def __init__(self, ft: FaultToleranceConfig, manager: Any, model: nn.Module, optimizer: torch.optim.Optimizer):
        from torchft.local_sgd import DiLoCo, LocalSGD

        self.manager, self.model, self.sync_every = manager, model, ft.sync_every
        self.outer: torch.optim.Optimizer | None = None
        if ft.semi_sync is SemiSync.local_sgd:
            self.algorithm = LocalSGD(manager, model, optimizer, sync_every=ft.sync_every)
        else:
            self.outer = torch.optim.SGD(model.parameters(), lr=ft.outer_lr, momentum=ft.outer_momentum,
                                         nesterov=ft.outer_nesterov)
            # One fragment: the whole model syncs at once (streaming DiLoCo's fragments are not wired).
            # The synced weights are kept on the CPU (torchft's default backup device).
            self.algorithm = DiLoCo(manager, [model], optimizer, self.outer, sync_every=ft.sync_every)
        self.algorithm.__enter__()  # registers the pre/post step hooks on the inner optimizer

    # torchft keeps its position in the interval and the synced weights in attributes of its own.
    @property
    def _synced(self) -> dict[str, torch.Tensor]:
        return self.algorithm._fragments[0].original_parameters

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"local_step": self.algorithm._local_step, "syncs": self.manager.current_step()}
        if self.outer is not None:
            params = dict(self.model.named_parameters())
            # As DTensors laid out like the parameters: DCP saves each rank's shard, not rank 0's.
            state["synced_weights"] = {_fqn(name): _like_param(t, params[name]) for name, t in self._synced.items()}
            state["outer_optim"] = get_optimizer_state_dict(self.model, self.outer)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.algorithm._local_step = int(state["local_step"])
        self.manager.load_state_dict({"step": int(state["syncs"]), "batches_committed": 0})
        if self.outer is not None:
            saved = state["synced_weights"]
            for name, synced in self._synced.items():
                t = saved[_fqn(name)]
                synced.copy_(t.to_local() if isinstance(t, DTensor) else t)
            set_optimizer_state_dict(self.model, self.outer, state["outer_optim"])

    def start_interval(self, step: int) -> None:
        """Resumed from a checkpoint without semi-sync state: a new interval starts from its
        weights, and every group resuming it counts the same syncs."""
        self.manager.load_state_dict({"step": step // self.sync_every, "batches_committed": 0})

    def syncs(self) -> int:
        """Cross-group syncs committed so far (torchft's step counts syncs, not inner steps)."""
        return self.manager.current_step()

    def close(self) -> None:
        self.algorithm.__exit__(None, None, None)


def _fqn(name: str) -> str:
    """The parameter's name without compile / activation-checkpoint wrappers, as the model and
    optimizer state are saved, so a checkpoint resumes with those settings changed."""
    return name.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", "")


def _like_param(local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    if isinstance(param, DTensor):
        return DTensor.from_local(local.to(param.device), param.device_mesh, param.placements,
                                  shape=param.shape, stride=param.stride())
    return local
