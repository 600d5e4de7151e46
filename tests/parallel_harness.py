"""titan's real Trainer on a tiny fixed run, in one process or on every rank of a spawned gloo
world, so that each parallel layout can be compared step by step with the single process.

A run is a list of Hydra overrides on top of `BASE`. It goes the CLI's way: composed from
conf/ by Hydra, typed and validated (`titan.config.validate.validate`) once, in the calling
process, for the world size it will run in; then each rank sets itself up
(`setup_rank`), builds `Trainer(cfg, env)` and takes `STEPS` optimizer steps exactly as
`Trainer.fit` does: the rank's micro-batches from its own loader, `Trainer.train_step`, the LR
scheduler, and a checkpoint when `checkpoint.interval` asks for one. So a regression in the
real step (loss, gradient accumulation, clipping, pipeline, context or tensor parallel inputs)
shows up as a difference from the single-process run.

`run_reference(overrides)` runs in the calling process; `run_world(world, runs)` spawns
`world` ranks that run each `(key, overrides)` in turn (one process group, reused) and returns
rank 0's results. Results: `init` / `final` (full weights before / after), `losses` and
`grad_norms` (the global values `train_step` returns), `val_loss` (`Trainer.validate`),
`degrees`, `cpu_offload` (FSDP2 offloads), `compiled_graphs` (new torch.compile graphs); under pp also `stage_keys`, `n_microbatches`, `has_first_last` of rank 0.
"""

from __future__ import annotations

import copy
import functools
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import yaml
from omegaconf import DictConfig, OmegaConf
from torch.distributed.tensor import DTensor

from titan.config.load import CONF_DIR, register_schemas, to_typed
from titan.config.schema import ParallelConfig, ReshardAfterForward, TrainConfig
from titan.config.validate import validate
from titan.models import LlamaArgs
from titan.train.env import RankEnv, setup_rank, teardown_rank
from titan.train.launch import free_port
from titan.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
SEQ, GLOBAL_BATCH, STEPS, SEED = 16, 4, 5, 1234
MAX_NORM = 0.5  # below the first steps' gradient norms (~1.0-1.5): clipping is exercised
# Tolerances against the single process. Gradient norms accumulate in fp64 on CPU
# (titan.parallel.grad: torch's fp32 CPU kernel was ~1e-5 low on the output gradient, by an
# amount that depended on the sharding); they now agree with an fp64 reference to ~2e-8 and
# across layouts to 0 (most) or ~1e-6 (tied embeddings under TP, whose two gradient halves add
# in another order), measured 2026-12-01.
LOSS_RTOL, GRAD_NORM_RTOL, FINAL_ATOL = 1e-5, 5e-6, 5e-5
# llama3_tiny (dim 64, 2 layers, 4 heads / 2 kv heads) on the default tokenizer's 2048 tokens.
BASE = [
    "model=llama3_tiny",
    f"training.seq_len={SEQ}",
    f"training.global_batch_size={GLOBAL_BATCH}",
    f"training.steps={STEPS}",
    f"training.seed={SEED}",
    "training.device=cpu",
    "training.threads=1",
    "training.val_interval=0",
    "training.val_batches=1",
    "data.max_documents=200",
    "optim.lr=3e-3",
    f"optim.max_norm={MAX_NORM}",
    "lr_schedule.warmup_steps=2",  # a changing LR: the scheduler must step as in fit
    "logging.peak_tflops=1",  # no CPU matmul measurement per Trainer
    "checkpoint.resume=none",
]
# The model BASE trains (conf/model/llama3_tiny.yaml, the default tokenizer's vocabulary), for
# the in-process tests that build it, its stages or its init directly.
ARGS = LlamaArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=2048, multiple_of=32, rope_theta=10000.0, max_seq_len=SEQ)


def parallel_config(preset: str, **overrides) -> ParallelConfig:
    """A `conf/parallel/` preset with field overrides, for layout checks that build nothing."""
    fields = yaml.safe_load((REPO / "conf" / "parallel" / f"{preset}.yaml").read_text())
    fields.update(overrides)
    if "reshard_after_forward" in fields:
        fields["reshard_after_forward"] = ReshardAfterForward(fields["reshard_after_forward"])
    return ParallelConfig(**fields)


@functools.lru_cache(maxsize=None)
def _composed(groups: tuple[str, ...]) -> DictConfig:
    """Hydra's composition of the root config with these group choices (cached: a Hydra
    compose costs ~10x a tiny training run)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_schemas()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return hydra_compose("train", overrides=list(groups))


def train_config(overrides: list[str], world: int) -> TrainConfig:
    """BASE + overrides as the CLI reads them: group choices (`parallel=fsdp`) composed by
    Hydra from conf/, then the `key=value` overrides on top, typed (`to_typed`) and validated
    (`validate`) for `world` ranks."""
    every = [*BASE, *overrides]
    groups = tuple(o for o in every if (CONF_DIR / o.split("=", 1)[0]).is_dir())
    node = copy.deepcopy(_composed(groups))
    for override in every:
        key, value = override.split("=", 1)
        if override not in groups:
            OmegaConf.update(node, key, yaml.safe_load(value), merge=False)
    cfg = to_typed(node)
    validate(cfg, world)
    return cfg


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded copy of the state dict (a collective when parameters are DTensors)."""
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in model.state_dict().items()}


def _whole_model_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every parameter of the whole model, on every rank (under pp: from every rank's stages)."""
    state = full_state(trainer.c.model)
    if trainer.c.pipeline is None:
        return state
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, state)
    return {k: v for part in parts for k, v in part.items()}


def _offloads(model: torch.nn.Module) -> bool:
    """Whether FSDP2 holds any of the model's parameter groups with a CPUOffloadPolicy."""
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule

    groups = [m._get_fsdp_state()._fsdp_param_group for m in model.modules() if isinstance(m, FSDPModule)]
    return any(isinstance(getattr(g, "offload_policy", None), CPUOffloadPolicy) for g in groups)


def _train(cfg: TrainConfig, env: RankEnv) -> dict:
    """`Trainer.fit`'s loop body, STEPS times, on a real Trainer; then its validation."""
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    trainer = Trainer(cfg, env)
    c, state = trainer.c, trainer.c.state
    init = _whole_model_state(trainer)
    losses, norms = [], []
    while state.step < cfg.training.steps:
        state.step += 1
        batches = [c.loader.next_batch() for _ in range(trainer.accum_steps)]
        loss, grad_norm = trainer.train_step(batches)
        c.scheduler.step()
        losses.append(loss)
        norms.append(grad_norm)
        if trainer.checkpointer.should_save(state.step, cfg.training.steps):
            trainer.checkpointer.save(state.state_dict(), state.step)
    trainer.checkpointer.close()
    out = {
        "init": init,
        "losses": losses,
        "grad_norms": norms,
        "final": _whole_model_state(trainer),
        "val_loss": trainer.validate()["val_loss"],
        "degrees": dict(c.parallel.degrees),
        "cpu_offload": _offloads(c.model),
        "compiled_graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs,
    }
    if c.pipeline is not None:
        out.update(
            stage_keys=sorted(c.model.state_dict()),
            n_microbatches=c.pipeline.n_microbatches,
            has_first_last=(c.pipeline.has_first, c.pipeline.has_last),
        )
    return out


def _with_run_dir(cfg: TrainConfig, run_dir: str) -> TrainConfig:
    if cfg.run_dir == TrainConfig.run_dir:  # not chosen by the caller: a scratch directory
        cfg.run_dir = run_dir
    return cfg


def run_reference(overrides: tuple[str, ...] | list[str] = ()) -> dict:
    """The run in this process, no process group (parallel=single)."""
    cfg = train_config(["parallel=single", *overrides], 1)
    with tempfile.TemporaryDirectory() as tmp:
        return _train(_with_run_dir(cfg, tmp), RankEnv(0, 1, 0, torch.device("cpu")))


def _worker(rank: int, world: int, port: int, runs: list, out_path: str, scratch: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    results = {}
    env = setup_rank(runs[0][1])  # the process group, once for every run
    try:
        for key, cfg in runs:
            try:
                results[key] = _train(_with_run_dir(cfg, os.path.join(scratch, key)), env)
            except Exception:  # reported per run; the peers fail at their next collective
                results[key] = {"error": f"rank {rank}: {traceback.format_exc()}"}
                if rank != 0:  # only rank 0's results come back: show the others' errors
                    print(f"[{key}] {results[key]['error']}", file=sys.stderr)
                break
        if rank == 0:
            torch.save(results, out_path)
    finally:
        teardown_rank()


def run_world(world: int, runs: list[tuple[str, list[str]]]) -> dict:
    """Spawn `world` gloo ranks that run each (key, overrides) in turn; rank 0's results."""
    import torch.multiprocessing as mp

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    configs = []
    for key, overrides in runs:  # composed and validated here, once, as the launcher does
        try:
            configs.append((key, train_config(list(overrides), world)))
        except Exception:
            return {key: {"error": traceback.format_exc()}}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.pt")
        try:
            mp.spawn(_worker, args=(world, free_port(), configs, out, tmp), nprocs=world, join=True)
        except Exception as err:  # a rank died: keep what rank 0 wrote, if anything
            if not os.path.exists(out):
                return {key: {"error": f"world of {world} failed: {err}"} for key, _ in runs}
        return torch.load(out, weights_only=False)
