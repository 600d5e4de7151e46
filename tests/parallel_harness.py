"""A tiny, fixed training run, executed in one process or in a spawned gloo world, so that
every parallel layout can be compared step by step with the single-process reference.

`run_reference()` runs in the calling process; `run_world(world, layouts)` spawns `world`
ranks that run each layout in turn (one world, reused) and returns rank 0's results.
Layouts are `conf/parallel/<preset>.yaml` names, optionally with field overrides; a layout
with pp > 1 trains through `Parallel.build_pipeline` (overrides `micro_batch_size`: rows
per `Pipeline.step`, default the rank's whole slice; `checkpoint_dir`: DCP-save the final
model there); the override `float8` ("tensorwise" or "tensorwise_fsdp_all_gather")
converts the block linears with torchao first, `model` (a dict) changes LlamaArgs fields;
compare with `run_reference(float8, model)`.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch.distributed.tensor import DTensor

from titan.config.schema import ParallelConfig, PrecisionConfig, ReshardAfterForward
from titan.models.llama3 import Llama3, LlamaArgs
from titan.parallel import Parallel
from titan.train.launch import free_port

REPO = Path(__file__).resolve().parents[1]
ARGS = LlamaArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=32, max_seq_len=16)
SEQ, GLOBAL_BATCH, STEPS, SEED, LR, MAX_NORM = 16, 4, 5, 1234, 3e-3, 1.0


def parallel_config(preset: str, **overrides) -> ParallelConfig:
    fields = yaml.safe_load((REPO / "conf" / "parallel" / f"{preset}.yaml").read_text())
    fields.update(overrides)
    if "reshard_after_forward" in fields:
        fields["reshard_after_forward"] = ReshardAfterForward(fields["reshard_after_forward"])
    return ParallelConfig(**fields)


def build_model(float8: Optional[str] = None, model_fields: Optional[dict] = None) -> Llama3:
    """The tiny model on the meta device, block linears optionally converted to float8."""
    with torch.device("meta"):
        model = Llama3(dataclasses.replace(ARGS, **(model_fields or {})))
    if float8:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        config = Float8LinearConfig(enable_fsdp_float8_all_gather=float8 == "tensorwise_fsdp_all_gather")
        convert_to_float8_training(model, config=config, module_filter_fn=lambda mod, fqn: fqn != "output")
    return model


def batches() -> torch.Tensor:
    """(STEPS, GLOBAL_BATCH, SEQ + 1) token ids: inputs are [:-1], labels [1:]."""
    g = torch.Generator().manual_seed(SEED + 1)
    return torch.randint(0, ARGS.vocab_size, (STEPS, GLOBAL_BATCH, SEQ + 1), generator=g)


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded copy of the state dict (a collective when parameters are DTensors)."""
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in model.state_dict().items()}


def train(model: torch.nn.Module, par: Parallel) -> dict:
    """The trainer's step, as documented for titan.parallel: per-rank loss = token-summed CE
    over this rank's slice / its token count; gradients are averaged by data parallelism."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    per_rank = GLOBAL_BATCH // par.dp_world
    tokens_per_rank = GLOBAL_BATCH * SEQ // par.loss_divisor
    losses, norms = [], []
    for batch in batches():
        rows = batch[par.dp_rank * per_rank : (par.dp_rank + 1) * per_rank]
        inputs, labels = rows[:, :-1], rows[:, 1:]
        with par.loss_context():
            logits = model(inputs)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum") / tokens_per_rank
            loss.backward()
        norms.append(float(par.clip_grad_norm(model.parameters(), MAX_NORM)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(par.mean_over_dp(loss.detach()))
    return {"losses": losses, "grad_norms": norms}


def eval_batch() -> torch.Tensor:
    """(GLOBAL_BATCH, SEQ + 1) held-out token ids for a forward-only loss."""
    g = torch.Generator().manual_seed(SEED + 2)
    return torch.randint(0, ARGS.vocab_size, (GLOBAL_BATCH, SEQ + 1), generator=g)


def summed_ce(tokens_per_rank: int):
    """The trainer's loss: token-summed CE over this rank's tokens / its share of the batch."""

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum") / tokens_per_rank

    return loss_fn


def gathered_full_state(module: torch.nn.Module, par: Parallel) -> dict[str, torch.Tensor]:
    """The whole model's unsharded state, on every rank, from each rank's pipeline stages."""
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, full_state(module))
    return {k: v for part in parts for k, v in part.items()}


def train_pipeline(par: Parallel, model: torch.nn.Module, micro_batch_size: Optional[int] = None, checkpoint_dir: Optional[str] = None) -> dict:
    """`train` through a pipeline, as the trainer does under pp: one `Pipeline.step` per
    micro-batch of `micro_batch_size` rows (default: this rank's whole slice, no gradient
    accumulation), clipping over all stages, the loss reduced from the last stage.
    `checkpoint_dir`: save the final model there with DCP (full-model names)."""
    per_rank = GLOBAL_BATCH // par.dp_world
    micro = micro_batch_size or per_rank
    tokens_per_rank = GLOBAL_BATCH * SEQ // par.loss_divisor
    pipe = par.build_pipeline(model, summed_ce(tokens_per_rank), micro, SEQ)
    for part in pipe.model_parts:
        par.materialize_and_init(part, torch.device("cpu"), SEED)
    init = gathered_full_state(pipe.rank_model, par)
    opt = torch.optim.AdamW(pipe.rank_model.parameters(), lr=LR, weight_decay=0.1)
    losses, norms = [], []
    for batch in batches():
        rows = batch[par.dp_rank * per_rank : (par.dp_rank + 1) * per_rank]
        total = None
        for start in range(0, per_rank, micro):
            inputs, labels, _ = par_local(par, rows[start : start + micro])
            loss = pipe.step(inputs, labels)
            total = loss if total is None else total + loss
        norms.append(float(par.clip_grad_norm(pipe.model_parts, MAX_NORM)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(par.mean_over_dp(total))
    rows = eval_batch()[par.dp_rank * per_rank : (par.dp_rank + 1) * per_rank]
    inputs, labels, _ = par_local(par, rows)
    eval_loss = par.mean_over_dp(pipe.eval_loss(inputs, labels))
    if checkpoint_dir:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        # As TrainState saves: the rank's merged view stands for its model.
        state = {"model": get_model_state_dict(pipe.rank_model), "optim": get_optimizer_state_dict(pipe.rank_model, opt)}
        dcp.save(state, checkpoint_id=checkpoint_dir)
    return {
        "init": init,
        "losses": losses,
        "grad_norms": norms,
        "eval_loss": eval_loss,
        "final": gathered_full_state(pipe.rank_model, par),
        "stage_keys": sorted(pipe.rank_model.state_dict().keys()),
        "n_microbatches": pipe.n_microbatches,
        "has_first_last": (pipe.has_first, pipe.has_last),
    }


def par_local(par: Parallel, rows: torch.Tensor):
    """(inputs, labels, positions) of this rank: the context-parallel slice under cp."""
    from titan.parallel.context_parallel import cp_inputs

    return cp_inputs(rows[:, :-1], rows[:, 1:], par.cp_rank, par.cp_size)


def run_reference(float8: Optional[str] = None, model_fields: Optional[dict] = None) -> dict:
    """One process, plain init: `torch.manual_seed(seed); to_empty; init_weights()`."""
    par = Parallel(parallel_config("single"), PrecisionConfig(), world_size=1, device_type="cpu")
    torch.manual_seed(SEED)
    model = build_model(float8, model_fields)
    model.to_empty(device="cpu")
    model.init_weights()
    init = full_state(model)
    out = train(model, par)
    with torch.no_grad():
        rows = eval_batch()
        logits = model(rows[:, :-1])
        eval_loss = float(F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten()))
    return {"init": init, **out, "final": full_state(model), "eval_loss": eval_loss}


def _run_layout(preset: str, overrides: dict, world: int) -> dict:
    overrides = dict(overrides)
    float8, model_fields = overrides.pop("float8", None), overrides.pop("model", None)
    micro_batch_size, checkpoint_dir = overrides.pop("micro_batch_size", None), overrides.pop("checkpoint_dir", None)
    par = Parallel(parallel_config(preset, **overrides), PrecisionConfig(), world_size=world, device_type="cpu")
    if par.pp_enabled:
        out = train_pipeline(par, build_model(float8, model_fields), micro_batch_size, checkpoint_dir)
        return {**out, "degrees": par.degrees}
    model = par.apply(build_model(float8, model_fields))
    par.materialize_and_init(model, torch.device("cpu"), SEED)
    init = full_state(model)
    out = train(model, par)
    return {"init": init, **out, "final": full_state(model), "degrees": par.degrees}


def _worker(rank: int, world: int, port: int, layouts: list, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    results = {}
    try:
        for key, preset, overrides in layouts:
            try:
                results[key] = _run_layout(preset, overrides, world)
            except Exception:  # reported per layout; the peers fail at their next collective
                results[key] = {"error": f"rank {rank}: {traceback.format_exc()}"}
                if rank != 0:  # only rank 0's results come back: show the others' errors
                    print(f"[{key}] {results[key]['error']}", file=sys.stderr)
                break
        if rank == 0:
            torch.save(results, out_path)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_world(world: int, layouts: list[tuple[str, str, dict]], timeout: Optional[float] = None) -> dict:
    """Spawn `world` gloo ranks that run each (key, preset, overrides) layout in turn."""
    import torch.multiprocessing as mp

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.pt")
        try:
            mp.spawn(_worker, args=(world, free_port(), layouts, out), nprocs=world, join=True)
        except Exception as err:  # a rank died: keep what rank 0 wrote, if anything
            if not os.path.exists(out):
                return {key: {"error": f"world of {world} failed: {err}"} for key, _, _ in layouts}
        return torch.load(out, weights_only=False)
