"""Process-level setup for one rank: device, process group, threads, seeds."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from titan.config.schema import AsyncMode, Device, TrainConfig
from titan.profiling import enable_flight_recorder
from titan.train import slurm
from titan.train.malloc import keep_freed_memory
from titan.train.agree import drop_agreement_group, init_agreement_group


@dataclass(frozen=True)
class RankEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device_type(requested: Device) -> str:
    if requested is Device.auto:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested is Device.cuda and not torch.cuda.is_available():
        from titan.config.errors import ConfigError

        raise ConfigError("training.device", "CUDA was requested but no GPU is visible; use training.device=auto or cpu")
    return requested.value


def accelerator_runtime() -> str:
    """The accelerator stack this torch build drives. ROCm builds expose AMD GPUs through the
    `cuda` device API and RCCL through the `nccl` backend name, so the same code path serves both."""
    if torch.version.hip:
        return f"ROCm {torch.version.hip} (RCCL through the nccl backend)"
    if torch.version.cuda and torch.cuda.is_available():
        return f"CUDA {torch.version.cuda}"
    return "CPU"


def launched_by_env() -> bool:
    """True under torchrun / the elastic agent, or as one of several tasks srun started: rank
    and world size come from the environment. False in a one-task Slurm step (an sbatch batch
    script, a submitit job), which self-launches its workers."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ or slurm.is_slurm_rank()


def env_world_size() -> int:
    """The job's world size when launched_by_env()."""
    return int(os.environ.get("WORLD_SIZE") or slurm.step_tasks())


def env_local_world_size() -> int:
    """Ranks on this machine when launched_by_env()."""
    return int(os.environ.get("LOCAL_WORLD_SIZE") or (slurm.tasks_on_this_node() if slurm.is_slurm_rank() else 1))


def _from_slurm() -> None:
    """srun starts one task per rank but sets SLURM_* rather than torch's variables."""
    if "RANK" in os.environ or not slurm.is_slurm_rank():
        return
    os.environ.update(slurm.torch_env_from_slurm())


def _restart_store(rank: int, world: int, timeout_s: int) -> dict:
    """After an elastic restart, a store of this attempt's own: the agent's store outlives the
    restart, and with it the previous attempt's gloo addresses, which the new ranks would
    otherwise read and fail to connect to. Empty (env:// rendezvous) on a first attempt."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if attempt == "0":
        return {}
    is_master = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=is_master, timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
    return {"store": dist.PrefixStore(f"titan/attempt_{attempt}", store), "rank": rank, "world_size": world}


def setup_rank(cfg: TrainConfig) -> RankEnv:
    """Initialise this process as one rank. A single process gets no process group at all."""
    _from_slurm()
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device_type = pick_device_type(cfg.training.device)
    if device_type == "cuda":
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        threads = cfg.training.threads or (max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
        torch.set_num_threads(threads)
        keep_freed_memory()  # no page faults on every step's re-allocated activations
    if world > 1 and not dist.is_initialized():
        backend = cfg.parallel.backend or ("nccl" if device_type == "cuda" else "gloo")
        enable_flight_recorder(cfg.profiling, cfg.run_dir, backend)
        dist.init_process_group(
            backend=backend,
            timeout=timedelta(seconds=cfg.parallel.timeout_s),
            device_id=device if device_type == "cuda" else None,
            **_restart_store(rank, world, cfg.parallel.timeout_s),
        )
        init_agreement_group()
    elif world == 1 and cfg.checkpoint.async_mode is AsyncMode.process and not dist.is_initialized():
        # DCP's process-mode async save talks to its saver process through a process group.
        from titan.train.launch import free_port

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    if cfg.training.deterministic:
        torch.use_deterministic_algorithms(True)
    return RankEnv(rank, world, local_rank, device)


def teardown_rank() -> None:
    drop_agreement_group()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
