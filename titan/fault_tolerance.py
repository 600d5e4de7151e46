"""Fault tolerance across replica groups with torchft.

A job is `replica_groups` copies of the parallel layout. Inside a group everything is as
without fault tolerance (FSDP, TP, ... over the group's own process group); across groups,
torchft's Manager averages the gradients over the groups that are alive this step (the
quorum, agreed with the lighthouse) and decides whether the step commits. A group that dies
drops out of the quorum while the others keep training; when it comes back (restarted by its
elastic agent) it heals: it copies the whole training state from a live group over HTTP and
rejoins at the same step.

The global batch is split over all groups as over data-parallel ranks (group g's ranks take
the slices after groups 0..g-1), and each group's loss is the mean over its slice, so with
every group alive a step is the same as a plain run with replica_groups times the data-
parallel degree. With a group missing, the step averages over the groups that are there.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch.distributed.tensor import DTensor

from titan.config.errors import ConfigError
from titan.config.schema import NanCheck, SemiSync, TrainConfig

log = logging.getLogger("titan")

GROUP_ENV = "TITAN_REPLICA_GROUP"  # set in each group's processes by the self-launcher


def _quiet_torchft() -> None:
    """torchft's Rust side logs every quorum and commit at INFO; keep warnings (set RUST_LOG
    yourself to see them all). Must run before torchft is imported."""
    os.environ.setdefault("RUST_LOG", "warn")


def replica_groups(cfg: TrainConfig) -> int:
    """How many groups share the global batch (1 without fault tolerance)."""
    return cfg.fault_tolerance.replica_groups if cfg.fault_tolerance.enabled else 1


def validate_fault_tolerance(cfg: TrainConfig) -> None:
    ft = cfg.fault_tolerance
    if not ft.enabled:
        if ft.semi_sync is not SemiSync.none:
            raise ConfigError("fault_tolerance.semi_sync", "syncs replica groups: use it with fault_tolerance=torchft")
        return
    if ft.replica_groups < 1:
        raise ConfigError("fault_tolerance.replica_groups", "must be >= 1")
    if not 0 <= ft.group_id < ft.replica_groups:
        raise ConfigError("fault_tolerance.group_id", f"{ft.group_id} is not in [0, replica_groups={ft.replica_groups})")
    if not 1 <= ft.min_replicas <= ft.replica_groups:
        raise ConfigError("fault_tolerance.min_replicas", f"must be in [1, replica_groups={ft.replica_groups}]")
    validate_semi_sync(cfg)
    if cfg.task.name.value != "pretrain":
        raise ConfigError("fault_tolerance", "torchft replica groups train task=pretrain only so far (the SFT loss "
                          "divisor is not agreed across groups); use fault_tolerance=none")
    _quiet_torchft()
    try:
        import torchft  # noqa: F401
    except ImportError:
        raise ConfigError("fault_tolerance", "needs torchft: pip install torchft-nightly (or torchft)") from None


def validate_semi_sync(cfg: TrainConfig) -> None:
    ft = cfg.fault_tolerance
    if ft.semi_sync is SemiSync.none:
        return
    if ft.sync_every < 1:
        raise ConfigError("fault_tolerance.sync_every", f"{ft.sync_every}: must be >= 1 (inner steps between syncs)")
    if cfg.training.steps % ft.sync_every:
        raise ConfigError("fault_tolerance.sync_every", f"{ft.sync_every} does not divide training.steps="
                          f"{cfg.training.steps}: the groups' final models would differ; make the steps a multiple")
    if ft.semi_sync is SemiSync.diloco:
        if ft.outer_lr <= 0:
            raise ConfigError("fault_tolerance.outer_lr", f"{ft.outer_lr}: must be > 0 (the DiLoCo paper uses 0.7)")
        if not 0 <= ft.outer_momentum < 1:
            raise ConfigError("fault_tolerance.outer_momentum", f"{ft.outer_momentum}: must be in [0, 1) (the paper uses 0.9)")
        if ft.outer_nesterov and ft.outer_momentum == 0:
            raise ConfigError("fault_tolerance.outer_nesterov", "Nesterov needs outer_momentum > 0; set outer_nesterov=false")
    # A group that drops an update does not count that step, so it would sync a step later
    # than the others: every group must step the same inner optimizer steps.
    if cfg.training.spike_guard.enabled:
        raise ConfigError("training.spike_guard.enabled", f"skipped updates would shift this group's syncs under "
                          f"fault_tolerance.semi_sync={ft.semi_sync.value}; set it to false or semi_sync=none")
    if cfg.profiling.nan_check is NanCheck.skip:
        raise ConfigError("profiling.nan_check", f"skip would shift this group's syncs under fault_tolerance.semi_sync="
                          f"{ft.semi_sync.value}; use stop (the default) or semi_sync=none")


# ---------------------------------------------------------------------------------------------
# the state a healing group receives: DTensors travel as their local shards
# ---------------------------------------------------------------------------------------------
def _to_local(tree: Any) -> Any:
    if isinstance(tree, DTensor):
        return tree.to_local().detach().clone()
    if isinstance(tree, dict):
        return {k: _to_local(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_to_local(v) for v in tree)
    return tree


def _like(received: Any, reference: Any) -> Any:
    """`received` (local shards) laid out as `reference` (this rank's own state, same layout)."""
    if isinstance(reference, DTensor):
        return DTensor.from_local(received.to(reference.device), reference.device_mesh, reference.placements,
                                  shape=reference.shape, stride=reference.stride())
    if isinstance(reference, dict):
        return {k: _like(received[k], v) if k in received else v for k, v in reference.items()}
    if isinstance(reference, (list, tuple)) and isinstance(received, (list, tuple)):
        return type(reference)(_like(r, v) for r, v in zip(received, reference))
    return received


class FaultTolerance:
    """One rank's torchft Manager and the three calls the training loop makes per step."""

    def __init__(self, cfg: TrainConfig, rank: int, world_size: int, device: torch.device, train_state: Any):
        _quiet_torchft()
        from torchft import Manager, ProcessGroupGloo, ProcessGroupNCCL

        ft = cfg.fault_tolerance
        self.group_id = ft.group_id
        self.train_state = train_state
        timeout = timedelta(seconds=ft.timeout_s)
        lighthouse = ft.lighthouse or os.environ.get("TORCHFT_LIGHTHOUSE")
        if not lighthouse:
            raise ConfigError("fault_tolerance.lighthouse", "no lighthouse address: set it (http://HOST:PORT), "
                              "export TORCHFT_LIGHTHOUSE, or self-launch (python -m titan.train without torchrun)")
        pg = ProcessGroupNCCL(timeout=timeout) if device.type == "cuda" else ProcessGroupGloo(timeout=timeout)
        store_addr, store_port = _group_store(world_size)
        self.manager = Manager(
            pg=pg,
            load_state_dict=self._load,
            state_dict=self._state,
            min_replica_size=ft.min_replicas,
            use_async_quorum=False,  # heal before the step's batches are drawn
            timeout=timeout,
            quorum_timeout=timeout,
            connect_timeout=timeout,
            rank=rank,
            world_size=world_size,
            store_addr=store_addr,
            store_port=store_port,
            lighthouse_addr=lighthouse,
            replica_id=f"titan_{ft.group_id}",
            init_sync=False,  # every group initialises the same weights from training.seed
        )
        self.participants = 0
        self.skipped_commits = 0
        self.semi_sync = None  # fault_tolerance.semi_sync: torchft's LocalSGD / DiLoCo syncs every sync_every steps
        if ft.semi_sync is not SemiSync.none:
            from titan.semi_sync import SemiSynchronous

            self.semi_sync = SemiSynchronous(ft, self.manager, train_state.model, train_state.optimizer)
            train_state.extras["semi_sync"] = self.semi_sync

    # The training state, for healing another group / being healed. DiLoCo's own state travels
    # through the hook torchft's DiLoCo registers with the Manager.
    def _healing_state(self) -> dict[str, Any]:
        state = self.train_state.state_dict()
        state.pop("semi_sync", None)
        return state

    def _state(self) -> dict[str, Any]:
        return _to_local(self._healing_state())

    def _load(self, received: dict[str, Any]) -> None:
        self.train_state.load_state_dict(_like(received, self._healing_state()))
        log.warning("replica group %d healed from a live group: continuing after step %d", self.group_id, self.train_state.step)

    def resumed(self, step: int, path: Path) -> None:
        """After resuming from a checkpoint: tell the Manager, so a group behind the others heals.
        Semi-synchronous: the Manager counts syncs, restored with the rest of the sync state."""
        if self.semi_sync is None:
            self.manager.load_state_dict({"step": step, "batches_committed": 0})
            return
        from titan.checkpoint import load_state
        from titan.interop.dcp_io import read_dcp_metadata

        if any(k.startswith("semi_sync.") for k in read_dcp_metadata(path).state_dict_metadata):
            state = {"semi_sync": self.semi_sync.state_dict()}
            load_state(state, path)
            self.semi_sync.load_state_dict(state["semi_sync"])
        else:  # saved without semi_sync: its weights become the synced ones, a new interval starts
            log.warning("%s holds no semi_sync state: the sync interval restarts at step %d", path, step)
            self.semi_sync.start_interval(step)

    def start_step(self) -> None:
        """Agree the quorum for the next step (heals this group first if it is behind).
        Semi-synchronous: torchft agrees it at each sync instead."""
        if self.semi_sync is not None:
            return
        self.manager.start_quorum()
        n = self.manager.num_participants()
        if n != self.participants and self.participants:
            log.warning("replica groups in the quorum: %d -> %d (step %d)", self.participants, n, self.train_state.step + 1)
        self.participants = n

    def average(self, tensors: list[torch.Tensor]) -> None:
        """Mean over the live groups, in place (a healing group contributes zeros). Semi-
        synchronous: no per-step exchange (gradients, loss and val loss stay the group's)."""
        if self.semi_sync is not None:
            return
        works = [self.manager.allreduce(t.to_local() if isinstance(t, DTensor) else t) for t in tensors]
        for work in works:
            work.wait()

    def average_gradients(self, model: torch.nn.Module) -> None:
        self.average([p.grad for p in model.parameters() if p.grad is not None])

    def mean(self, value: float, device: torch.device) -> float:
        t = torch.tensor(value, dtype=torch.float64, device=device)
        self.average([t])
        return float(t)

    def should_commit(self) -> bool:
        if self.semi_sync is not None:  # torchft's LocalSGD / DiLoCo decide each sync's commit
            return True
        ok = self.manager.should_commit()
        self.skipped_commits += not ok
        return ok

    def metrics(self) -> dict[str, int]:
        if self.semi_sync is not None:  # the last sync's quorum (0 before the first sync)
            n = self.manager.num_participants()
            if n != self.participants and self.participants:
                log.warning("replica groups in the last sync: %d -> %d (step %d)", self.participants, n, self.train_state.step)
            self.participants = n
            return {"ft_participants": n, "ft_syncs": self.semi_sync.syncs()}
        return {"ft_participants": self.participants, "ft_uncommitted_steps": self.skipped_commits}

    def close(self) -> None:
        if self.semi_sync is not None:
            self.semi_sync.close()
        self.manager.shutdown(wait=False)


def _group_store(world_size: int) -> tuple[str, int]:
    """The group's TCPStore: the elastic agent's / torchrun's (MASTER_ADDR/PORT), or, for a
    lone process started without one, a store of its own.

    The agent's store outlives a restart of the group, and with it the Manager address the
    previous attempt published there: rank 0 clears it, and the group waits for that, so no
    rank of the new attempt connects to the dead one's server."""
    if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        import torch.distributed as dist
        from torch.distributed import TCPStore

        if int(os.environ.get("RANK", 0)) == 0:
            store = TCPStore(addr, port, is_master=False, wait_for_workers=False)
            for key in ("manager_addr", "replica_id"):  # torchft.manager's keys
                store.delete_key(key)
        if dist.is_initialized():
            dist.barrier()
        return addr, port
    assert world_size == 1, "a multi-process group always has MASTER_ADDR/MASTER_PORT"
    from torch.distributed import TCPStore

    from titan.train.launch import free_port

    port = free_port()
    _group_store.keep = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)  # type: ignore[attr-defined]
    return "127.0.0.1", port


def build_fault_tolerance(cfg: TrainConfig, env: Any, train_state: Any) -> Optional[FaultTolerance]:
    if not cfg.fault_tolerance.enabled:
        return None
    return FaultTolerance(cfg, env.rank, env.world_size, env.device, train_state)


# ---------------------------------------------------------------------------------------------
# self-launch: a lighthouse and every group on this machine
# ---------------------------------------------------------------------------------------------
def group_config(cfg: TrainConfig, group: int, lighthouse: str) -> TrainConfig:
    """Group 0 writes to the run dir; group g > 0 to RUN_DIR/replica_g (its own logs, metrics
    and checkpoints)."""
    ft = replace(cfg.fault_tolerance, group_id=group, lighthouse=lighthouse)
    run_dir = cfg.run_dir if group == 0 else str(Path(cfg.run_dir) / f"replica_{group}")
    return replace(cfg, fault_tolerance=ft, run_dir=run_dir)


def _run_group(cfg: TrainConfig, spawn: Callable[..., Any]) -> None:
    os.environ[GROUP_ENV] = str(cfg.fault_tolerance.group_id)
    spawn(cfg, max_restarts=cfg.fault_tolerance.max_restarts)


def launch_replica_groups(cfg: TrainConfig, spawn: Callable[..., Any]) -> None:
    """Start the lighthouse here, then each group as its own elastic agent (a process of its
    own, restarting its workers up to max_restarts times); wait for all of them."""
    _quiet_torchft()
    from torchft.coordination import LighthouseServer

    ft = cfg.fault_tolerance
    lighthouse = LighthouseServer(bind="[::]:0", min_replicas=ft.min_replicas, join_timeout_ms=1000)
    log.info("torchft lighthouse at %s; %d replica groups of %d processes", lighthouse.address(),
             ft.replica_groups, cfg.parallel.nproc_per_node)
    ctx = mp.get_context("spawn")
    groups = [ctx.Process(target=_run_group, args=(group_config(cfg, g, lighthouse.address()), spawn), name=f"titan-group-{g}")
              for g in range(ft.replica_groups)]
    try:
        for p in groups:
            p.start()
        for p in groups:
            p.join()
    finally:
        for p in groups:
            if p.is_alive():
                p.terminate()
        lighthouse.shutdown()
    failed = [g for g, p in enumerate(groups) if p.exitcode != 0]
    if failed:
        from titan.train.launch import WorkerFailed

        raise WorkerFailed(f"replica group(s) {failed} failed after {ft.max_restarts} restarts; their logs: "
                           f"{cfg.run_dir}/logs and {cfg.run_dir}/replica_N/logs")
