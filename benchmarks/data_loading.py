"""Data loading: per-rank cost vs world size, prepare_data throughput, data share of step time.

    python benchmarks/data_loading.py [--worlds 1 8 64 1024] [--steps 20] [--rounds 3]

1. CPU time (time.process_time, mean per step) one rank spends producing one step's batch (its share: 8
   sequences of 256 tokens) when the job has W data-parallel ranks, on-the-fly (every rank
   tokenizes the whole global batch to know where its windows start) vs a token store (a rank
   reads its own windows). The simulated rank is the last one; the store shuffles.
2. prepare_data throughput on the embedded corpus: tokens/s per worker process.
3. The `data` share of step time on the default CPU run (llama3_debug, 8 x 256, fp32), with
   the batch produced in the step (data.prefetch=0) and ahead of it in the background worker
   (data.prefetch=2, the default); medians of the per-log-step `data_time_frac`.
"""

from __future__ import annotations

import argparse
import json
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


def data_share(prefetch: int, steps: int, run_dir: str, overrides: list[str]) -> float:
    from titan.config.validate import validate
    from titan.train.env import setup_rank
    from titan.train.trainer import Trainer

    cfg = compose([*overrides, f"data.prefetch={prefetch}"])
    cfg.training.steps, cfg.training.val_interval = steps, 0
    cfg.lr_schedule.warmup_steps = min(cfg.lr_schedule.warmup_steps, steps - 1)
    cfg.logging.interval, cfg.checkpoint.interval, cfg.run_dir = 1, 0, run_dir
    validate(cfg, world_size=1)
    Trainer(cfg, setup_rank(cfg)).fit()
    records = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["data_time_frac"] for r in records if "loss" in r and r["step"] > 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", type=int, nargs="*", default=[1, 8, 64, 1024])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds for the data share")
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
    shares = {0: [], 2: []}
    for r in range(opts.rounds):
        for prefetch in shares:
            with tempfile.TemporaryDirectory() as run_dir:
                shares[prefetch].append(data_share(prefetch, opts.steps, run_dir, opts.overrides))
        print(f"round {r + 1}: data share in-step {shares[0][-1]:.2%}, background {shares[2][-1]:.2%}", flush=True)
    before, after = statistics.median(shares[0]), statistics.median(shares[2])
    print(f"\ndata share of step time ({' '.join(opts.overrides) or 'llama3_debug, 8 x 256'}, "
          f"{opts.steps} steps x {opts.rounds} rounds)")
    print(f"| data.prefetch | data share |\n|---|---|\n| 0 (in the step) | {before:.2%} |\n| 2 (background) | {after:.2%} |")


if __name__ == "__main__":
    main()
