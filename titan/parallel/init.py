"""Materialise a meta-device, already parallelised model and fill it with exactly the weights
the single-process model gets from the same seed.

DTensor's own random init is not usable here: its RNG tracker is CUDA-only, so on CPU every
rank would fill its shard with the same values. Instead each init group (embedding, one
block, final norm, output; see `Llama3.init_groups`) is filled at full size, one group at a
time, from that group's own generator, and every rank keeps its shard. Peak extra memory is
one unsharded group, never the whole model.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from titan.models.llama3 import init_generator


def _unsharded_stand_ins(module: nn.Module, device: torch.device) -> list[tuple[nn.Module, str, DTensor]]:
    """Swap every DTensor parameter under `module` for an empty full-size plain parameter;
    returns (owner, name, original) to swap back. Tied parameters are swapped once."""
    swapped, seen = [], {}
    for owner in module.modules():
        for name, param in list(owner._parameters.items()):
            if not isinstance(param, DTensor):
                continue
            if id(param) not in seen:
                seen[id(param)] = nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device=device), param.requires_grad)
            owner._parameters[name] = seen[id(param)]
            swapped.append((owner, name, param))
    return swapped


@torch.no_grad()
def _restore_keeping_shards(swapped: list[tuple[nn.Module, str, DTensor]]) -> None:
    done = set()
    for owner, name, sharded in swapped:
        full = owner._parameters[name]
        owner._parameters[name] = sharded
        if id(sharded) in done:
            continue
        done.add(id(sharded))
        # src_data_rank=None: every rank holds the same full tensor, so each just slices its
        # shard locally (no communication), whatever the placements (FSDP, TP, both).
        local = distribute_tensor(full, sharded.device_mesh, sharded.placements, src_data_rank=None).to_local()
        sharded.to_local().copy_(local)


@torch.no_grad()
def materialize_and_init(model: nn.Module, device: torch.device, seed: int, buffer_device: Optional[torch.device] = None) -> None:
    """`model` was built on meta and parallelised (DTensor and/or plain parameters). Allocate it
    on `device`, recompute its buffers and fill every parameter; the full weights equal
    `torch.manual_seed(seed); model.to_empty(device); model.init_weights()` in one process."""
    model.to_empty(device=device)
    model.tie_weights()  # to_empty unties shared weights outside FSDP (e.g. TP only)
    model.init_buffers(buffer_device or device)
    for name, module, fill in model.init_groups():
        swapped = _unsharded_stand_ins(module, device)
        try:
            fill(init_generator(seed, name, device))
        finally:
            _restore_keeping_shards(swapped)
