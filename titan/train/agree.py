"""Decisions every rank must take alike, from flags that may differ per rank.

A rank's own view (its async save finished, it got Ctrl-C) can differ from another's at the
same step; acting on it alone lets one rank enter a collective the others never reach. These
helpers combine the flags over a small gloo group of their own, so they never interleave with
training's collectives (NCCL or gloo) nor with a background save's."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

_group: Optional[dist.ProcessGroup] = None


def init_agreement_group() -> None:
    """Create the group (a collective: every rank calls it, right after init_process_group)."""
    global _group
    if dist.is_initialized() and dist.get_world_size() > 1:
        _group = dist.new_group(backend="gloo")


def drop_agreement_group() -> None:
    """Before the process group is destroyed (a later run in this process makes its own)."""
    global _group
    _group = None


def _combine(flag: bool, op: dist.ReduceOp) -> bool:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    group = _group
    if group is None and dist.get_backend() != "gloo":
        raise RuntimeError("titan.train.agree: call init_agreement_group() after init_process_group")
    value = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(value, op=op, group=group)
    return bool(value.item())


def all_ranks(flag: bool) -> bool:
    """True on every rank when `flag` is true on every rank."""
    return _combine(flag, dist.ReduceOp.MIN)


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one rank."""
    return _combine(flag, dist.ReduceOp.MAX)
