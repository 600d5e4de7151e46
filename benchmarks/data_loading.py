"""Data loading: per-rank cost vs world size, prepare_data throughput, data share of step time.

    python benchmarks/data_loading.py [--worlds 1 8 64 1024] [--steps 20] [--warmup 3]
    python benchmarks/data_loading.py --only-share [--steps 20] [overrides ...]

1. CPU time (time.process_time, mean per step) one rank spends producing one step's batch (its share: 8
   sequences of 256 tokens) when the job has W data-parallel ranks, on-the-fly (every rank
   tokenizes the whole global batch to know where its windows start) vs a token store (a rank
   reads its own windows). The simulated rank is the last one; the store shuffles.
2. prepare_data throughput on the embedded corpus: tokens/s per worker process.
3. The `data` share of step time on the default CPU run (llama3_debug, 8 x 256, fp32), with
   the batch produced in the step (data.prefetch=0) and ahead of it in the background worker
   (data.prefetch=2, the default), side by side: both real Trainers are built in one process and
   stepped alternately; a step is what `Trainer.fit` does (the `accum_steps` batches, then
   train_step and the LR schedule), the data time is the wait for those batches. Tokenizing is
   lumpy (a new document every few steps), so the share is the sum of the waits over the sum of
   the step times; the medians are given too.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from titan.config.schema import DataConfig  # noqa: E402
from titan.data.loader import TokenLoader  # noqa: E402
from titan.data.sources import load_documents  # noqa: E402
from titan.data.store import TokenStore  # noqa: E402
from titan.data.store_loader import StoreLoader  # noqa: E402
from titan.data.tokenizer import build_tokenizer  # noqa: E402
from titan.tools.plan import compose  # noqa: E402
from titan.tools.prepare_data import prepare  # noqa: E402

LOCAL, SEQ = 8, 256


def per_step_cpu(loader, steps: int) -> float:
    """Mean CPU seconds per step (a step on the fly may tokenize several documents or none,
    so the mean, not the median, is its cost)."""
    t0 = time.process_time()
    for _ in range(steps * loader.micro_batches_per_step):
        loader.next_batch()
    return (time.process_time() - t0) / steps


def world_size_table(store_dir: str, tokenizer, worlds: list[int], steps: int) -> list[tuple]:
    docs = load_documents(DataConfig(), "train")
    split = TokenStore.open(store_dir).split("train")
    rows = []
    for w in worlds:
        n = max(3, min(steps * 10, 4096 // w))  # a 1024-rank step is seconds on the fly
        fly = TokenLoader(docs, tokenizer, SEQ, LOCAL * w, LOCAL, dp_rank=w - 1, dp_world=w, seed=0)
        store = StoreLoader(split, SEQ, LOCAL * w, LOCAL, dp_rank=w - 1, dp_world=w, seed=0)
        rows.append((w, per_step_cpu(fly, n), per_step_cpu(store, steps * 10)))
        print(f"world {w}: on-the-fly {rows[-1][1] * 1e3:.1f} ms, store {rows[-1][2] * 1e3:.3f} ms", flush=True)
    return rows


def prepare_throughput(root: str, workers: int) -> tuple[float, float]:
    out = os.path.join(root, f"store-{workers}")
    t0 = time.perf_counter()
    manifest = prepare(compose([]), {"out": out, "workers": workers, "shard_docs": 64})
    dt = time.perf_counter() - t0
    return manifest["tokens"] / dt, dt


def build_trainer(prefetch: int, steps: int, run_dir: str, overrides: list[str]):
    from titan.config.validate import validate
    from titan.train.env import setup_rank
    from titan.train.trainer import Trainer

    cfg = compose([*overrides, f"data.prefetch={prefetch}"])
    cfg.training.steps, cfg.training.val_interval = steps, 0
    cfg.lr_schedule.warmup_steps = min(cfg.lr_schedule.warmup_steps, steps - 1)
    cfg.logging.interval, cfg.checkpoint.interval, cfg.run_dir = 1, 0, run_dir
    validate(cfg, world_size=1)
    trainer = Trainer(cfg, setup_rank(cfg))
    trainer.metrics.close()  # nothing to metrics.jsonl
    trainer.metrics.enabled = False
    return trainer


def timed_step(trainer) -> tuple[float, float]:
    """One optimizer step as `Trainer.fit` takes it: (seconds waiting for data, seconds in all)."""
    t0 = time.perf_counter()
    batches = [trainer.c.loader.next_batch() for _ in range(trainer.accum_steps)]
    t_data = time.perf_counter() - t0
    trainer.c.state.step += 1
    trainer.train_step(batches)
    trainer.c.scheduler.step()
    return t_data, time.perf_counter() - t0


def data_share(steps: int, warmup: int, overrides: list[str]) -> dict[int, list[tuple[float, float]]]:
    """Both variants built as real Trainers in this process, stepped alternately (the first
    variant of each step alternating too); the (data, step) seconds of the timed steps."""
    variants = (0, 2)
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {p: build_trainer(p, warmup + steps, os.path.join(tmp, str(p)), overrides) for p in variants}
        timings: dict[int, list[tuple[float, float]]] = {p: [] for p in variants}
        for i in range(warmup + steps):
            for p in (variants if i % 2 == 0 else variants[::-1]):
                t = timed_step(trainers[p])
                if i >= warmup:
                    timings[p].append(t)
            if i >= warmup and (i - warmup) % 5 == 4:
                print(f"step {i + 1}: " + ", ".join(
                    f"prefetch={p} data {t[0] * 1e3:.2f} ms of {t[1]:.2f} s" for p, t in
                    ((p, timings[p][-1]) for p in variants)), flush=True)
        for trainer in trainers.values():
            close = getattr(trainer.c.loader, "close", None)
            if close is not None:
                close()
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", type=int, nargs="*", default=[1, 8, 64, 1024])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3, help="steps dropped before timing the data share")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--only-share", action="store_true", help="only the data share of step time")
    parser.add_argument("overrides", nargs="*", default=[], help="for the data-share runs")
    opts = parser.parse_args()
    tokenizer = build_tokenizer(compose([]).tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        if opts.only_share:
            return share_table(opts)
        one, dt1 = prepare_throughput(tmp, 1)
        cores = os.cpu_count() or 1
        many, dtn = prepare_throughput(tmp, cores)
        print(f"\nprepare_data, embedded corpus: 1 worker {one:,.0f} tokens/s ({dt1:.1f} s); "
              f"{cores} workers {many:,.0f} tokens/s ({dtn:.1f} s, {many / cores:,.0f} per worker)\n")
        rows = world_size_table(os.path.join(tmp, "store-1"), tokenizer, opts.worlds, opts.steps)
    print(f"\nper-rank CPU time for one step's batch ({LOCAL} x {SEQ} tokens per rank), mean")
    print("| world size | on-the-fly | token store | on-the-fly / store |\n|---|---|---|---|")
    for w, fly, store in rows:
        print(f"| {w} | {fly * 1e3:,.1f} ms | {store * 1e3:.3f} ms | {fly / store:,.0f}x |")
    if not opts.skip_train:
        share_table(opts)


def share_table(opts) -> None:
    timings = data_share(opts.steps, opts.warmup, opts.overrides)
    what = " ".join(opts.overrides) or "the default run (llama3_debug, 8 x 256, fp32)"
    print(f"\ndata share of step time, {what}: {opts.steps} timed steps per variant after "
          f"{opts.warmup} warm-up, alternating step by step in one process; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print("| data.prefetch | median step | median data wait | mean data wait | max data wait | data share (sum data / sum step) |")
    print("|---|---|---|---|---|---|")
    shares = {}
    for prefetch, rows in timings.items():
        data, step = [d for d, _ in rows], [t for _, t in rows]
        shares[prefetch] = sum(data) / sum(step)
        label = "0 (in the step)" if prefetch == 0 else f"{prefetch} (background thread)"
        print(f"| {label} | {statistics.median(step):.3f} s | {statistics.median(data) * 1e3:.2f} ms | "
              f"{statistics.mean(data) * 1e3:.2f} ms | {max(data) * 1e3:.1f} ms | {shares[prefetch]:.2%} |")
    steps = {p: statistics.median(t for _, t in rows) for p, rows in timings.items()}
    print(f"median step time, background / in the step: {steps[2] / steps[0]:.3f}")


if __name__ == "__main__":
    main()
