"""Tensor-parallel generation: the process group and mesh for `titan.tools.generate`, and
its self-launch (`parallel.nproc_per_node=N`).

Every rank runs the same tool with the same arguments: it loads the checkpoint, keeps its
shard of each weight (training's TP plan, `titan.generate.tensor_parallel`), reads the same
prompts and draws the same tokens (the logits are replicated, the generators seeded alike).
Ranks come from the environment (torchrun, or the processes started here, which set the same
variables), so both launches run one code path.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
from datetime import timedelta

import torch

TIMEOUT_S = 300  # a rank that dies leaves the others waiting at most this long


def rank_world() -> tuple[int, int]:
    from titan.train.env import _from_slurm, launched_by_env

    if not launched_by_env():
        return 0, 1
    _from_slurm()  # srun sets SLURM_* only
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def needs_self_launch(args) -> bool:
    from titan.train.env import launched_by_env

    return args.nproc_per_node > 1 and not launched_by_env()


def _device_type(args) -> str:
    if args.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return args.device


@contextlib.contextmanager
def tp_world(args, rank: int, world: int):
    """Yields the tensor-parallel mesh over all `world` ranks (None for one process)."""
    from titan.tools.generate import UsageError

    if world == 1:
        if args.tp > 1:
            raise UsageError(f"parallel.tp={args.tp} needs {args.tp} processes: add parallel.nproc_per_node={args.tp} "
                             f"(or run under torchrun --nproc-per-node={args.tp})")
        yield None
        return
    if args.tp not in (-1, world):
        raise UsageError(f"parallel.tp={args.tp} must equal the number of processes ({world}): generation shards the model over every rank")
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    device_type = _device_type(args)
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("device=cuda but no GPU is visible; use device=cpu or auto")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", rank=rank, world_size=world,
                            timeout=timedelta(seconds=TIMEOUT_S))
    try:
        yield init_device_mesh(device_type, (world,))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawned(rank: int, world: int, port: int, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    from titan.tools.generate import run_rank

    sys.exit(run_rank(args))


def self_launch(args) -> int:
    """Start `parallel.nproc_per_node` ranks here; the worst exit status (rank 0 reports)."""
    from titan.train.launch import free_port

    nproc = args.nproc_per_node
    if args.tp not in (-1, nproc):
        print(f"error: parallel.tp={args.tp} must equal parallel.nproc_per_node={nproc}: generation shards the model over every process",
              file=sys.stderr)
        return 2
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_spawned, args=(rank, nproc, port, args)) for rank in range(nproc)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    codes = [p.exitcode for p in procs]
    if any(c not in (0, 2) for c in codes):
        failed = next(r for r, c in enumerate(codes) if c not in (0, 2))
        print(f"error: rank {failed} failed (exit code {codes[failed]})", file=sys.stderr)
        return 1
    return max(codes)
