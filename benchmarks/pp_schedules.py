"""Step time of every pipeline schedule at pp=2 on CPU (gloo), against one process.

One spawned 2-rank world runs each schedule in turn on the same model, batch and microbatches
(the llama3 debug model dims with 8 layers, so 2 or 4 stages split evenly); one process with
gradient accumulation over the same microbatches is the no-PP baseline. Each step is forward
+ backward over the batch, gradient clipping and AdamW; the median over the timed steps is
reported, with tokens/s and the ratio to GPipe and to the one-process step:

    python benchmarks/pp_schedules.py                       # 8 microbatches of 1 x 256 tokens
    python benchmarks/pp_schedules.py --microbatches 16 --steps 8 --json out.json

Every rank runs one thread, so pp=2 uses two cores where the baseline uses one (a second
baseline row gives that process two threads). The ideal pp=2 step is half the one-process
step; the schedules differ in how much of it they lose to the pipeline bubble.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from titan.config.schema import ParallelConfig, PipelineSchedule, PrecisionConfig
from titan.models.llama3 import Llama3, LlamaArgs
from titan.parallel import Parallel

# (schedule, stages per rank)
SCHEDULES = [
    ("GPipe", 1),
    ("1F1B", 1),
    ("Interleaved1F1B", 2),
    ("LoopedBFS", 2),
    ("InterleavedZeroBubble", 2),
    ("ZBVZeroBubble", 2),
    ("DualPipeV", 2),
]


def model_args(opts) -> LlamaArgs:
    return LlamaArgs(dim=256, n_layers=opts.layers, n_heads=16, vocab_size=2048, multiple_of=256, max_seq_len=opts.seq_len)


def batch(opts) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 2048, (opts.microbatches * opts.mb_size, opts.seq_len + 1), generator=g)


def loss_fn(tokens: int):
    def fn(logits, labels):
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum") / tokens

    return fn


def _timed(step, opts, sync=lambda: None) -> list[float]:
    times = []
    for i in range(opts.warmup + opts.steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        if i >= opts.warmup:
            times.append(time.perf_counter() - t0)
    return times


def run_single(opts, threads: int) -> list[float]:
    """No pipeline: gradient accumulation over the same microbatches, one process."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = Llama3(model_args(opts))
    model.init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data, fn = batch(opts), loss_fn(opts.microbatches * opts.mb_size * opts.seq_len)

    def step():
        for rows in data.split(opts.mb_size):
            fn(model(rows[:, :-1]), rows[:, 1:]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _timed(step, opts)


def _pp_step(pipe, par, opt, data) -> None:
    pipe.step(data[:, :-1], data[:, 1:])
    par.clip_grad_norm(pipe.model_parts, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def _worker(rank: int, world: int, port: int, opts, out_path: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    data = batch(opts)
    results = {}
    for name, virtual in SCHEDULES:
        if opts.schedules and name not in opts.schedules:
            continue
        cfg = ParallelConfig(
            nproc_per_node=world,
            dp_shard=1,
            pp=world,
            pp_schedule=PipelineSchedule(name),
            pp_virtual_stages=virtual,
            pp_microbatches=opts.microbatches,
        )
        par = Parallel(cfg, PrecisionConfig(), world_size=world, device_type="cpu")
        with torch.device("meta"):
            model = Llama3(model_args(opts))
        pipe = par.build_pipeline(model, loss_fn(data.numel() - data.shape[0]), data.shape[0], opts.seq_len)
        for part in pipe.model_parts:
            par.materialize_and_init(part, torch.device("cpu"), 0)
        opt = torch.optim.AdamW(pipe.rank_model.parameters(), lr=1e-4)
        results[name] = _timed(lambda: _pp_step(pipe, par, opt, data), opts, sync=dist.barrier)  # noqa: B023
    if rank == 0:
        torch.save(results, out_path)
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--mb-size", type=int, default=1, help="sequences per microbatch")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--schedules", nargs="*", default=None)
    ap.add_argument("--json", default=None, help="also write the results here")
    opts = ap.parse_args()

    rows = {}
    for threads in (1, 2):
        rows[f"no PP, 1 process, {threads} thread{'s' * (threads > 1)}"] = run_single(opts, threads)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "pp.pt")
        mp.spawn(_worker, args=(opts.pp, _free_port(), opts, out), nprocs=opts.pp, join=True)
        rows.update({f"pp={opts.pp} {k}": v for k, v in torch.load(out).items()})

    tokens = opts.microbatches * opts.mb_size * opts.seq_len
    medians = {k: statistics.median(v) for k, v in rows.items()}
    gpipe = medians.get(f"pp={opts.pp} GPipe")
    single = medians["no PP, 1 process, 1 thread"]
    print(f"\nllama3 debug dims, {opts.layers} layers; {opts.microbatches} microbatches x {opts.mb_size} x {opts.seq_len} tokens "
          f"per step; median of {opts.steps} steps after {opts.warmup} warm-up")
    print("| schedule | median s/step | tokens/s | vs GPipe | vs no PP (1 thread) |")
    print("|---|---|---|---|---|")
    for k, m in medians.items():
        vs_gpipe = f"{m / gpipe:.2f}x" if gpipe else "-"
        print(f"| {k} | {m:.3f} | {tokens / m:,.0f} | {vs_gpipe} | {m / single:.2f}x |")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"options": vars(opts), "step_times": rows, "median_s": medians}, f, indent=2)


if __name__ == "__main__":
    main()
