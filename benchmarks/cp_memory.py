"""Peak memory and time of one forward+backward with context parallelism, on CPU (gloo).

Spawns a cp-rank world per setting (cp=1 is the plain model) on the llama3 debug model dims
with a long sequence, resets each rank's peak RSS just before the step, and prints a table:

    python benchmarks/cp_memory.py                 # seq 8192, cp 1 2 4, both modes
    python benchmarks/cp_memory.py --seq-len 4096 --cp 1 2 --modes ring

Memory is VmHWM from /proc/self/status after `echo 5 > /proc/self/clear_refs` (the kernel's
peak-RSS reset); "step" is that peak minus the RSS before the step (the step's activations,
gradients and temporaries), the part CP divides. Every rank runs one thread, so cp ranks use
cp cores: time ratios include that extra compute.

glibc keeps freed heap memory resident (fragmentation), which makes the peak RSS depend on
the order of allocations more than on what is live. `--mmap-threshold` (default 128 KiB; 0 =
glibc's dynamic default) is exported as MALLOC_MMAP_THRESHOLD_ to the ranks so that large
tensors are mmapped and their memory returned when freed: the peak then tracks live memory.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from titan.models.llama3 import Llama3, LlamaArgs
from titan.parallel.context_parallel import apply_cp, cp_inputs, validate_cp

GiB = 1024**3


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _worker(rank: int, world: int, port: int, seq_len: int, batch: int, mode: str, warmup: int, out_path: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=600))
    args = LlamaArgs(dim=256, n_layers=6, n_heads=16, vocab_size=2048, multiple_of=256, max_seq_len=seq_len)
    model = Llama3(args)
    model.init_weights(seed=0)
    group = dist.group.WORLD if world > 1 else None
    apply_cp(model, group, rank, world, mode)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, args.vocab_size, (batch, seq_len + 1), generator=g)
    tokens, labels, positions = cp_inputs(data[:, :-1], data[:, 1:], rank, world)

    def step() -> None:
        logits = model(tokens, positions=positions)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum") / labels.numel()
        loss.backward()
        model.zero_grad(set_to_none=False)

    for _ in range(warmup):
        step()
    if world > 1:
        dist.barrier()
    _reset_peak_rss()
    base = _status_kib("VmRSS")
    start = time.perf_counter()
    step()
    if world > 1:
        dist.barrier()
    seconds = time.perf_counter() - start
    row = {"peak": _status_kib("VmHWM") * 1024, "step": (_status_kib("VmHWM") - base) * 1024, "seconds": seconds}
    if world > 1:
        rows = [None] * world
        dist.all_gather_object(rows, row)
        dist.destroy_process_group()
    else:
        rows = [row]
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(rows, f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(cp: int, mode: str, seq_len: int, batch: int, warmup: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        mp.spawn(_worker, args=(cp, _free_port(), seq_len, batch, mode, warmup, out), nprocs=cp, join=True)
        with open(out) as f:
            rows = json.load(f)
    # The worst rank is what sizes a job.
    return {k: max(r[k] for r in rows) for k in ("peak", "step", "seconds")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--modes", nargs="+", default=["allgather", "ring"], choices=["allgather", "ring"])
    parser.add_argument("--warmup", type=int, default=0, help="untimed steps before the measured one")
    parser.add_argument("--mmap-threshold", type=int, default=128 * 1024, help="MALLOC_MMAP_THRESHOLD_ for the ranks; 0 = glibc default")
    opts = parser.parse_args()
    if opts.mmap_threshold:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(opts.mmap_threshold)  # read by each spawned rank's glibc
    for cp in opts.cp:
        validate_cp(opts.seq_len, cp)

    settings = [(cp, mode) for cp in opts.cp for mode in (["-"] if cp == 1 else opts.modes)]
    results = {}
    for cp, mode in settings:
        results[cp, mode] = measure(cp, "allgather" if mode == "-" else mode, opts.seq_len, opts.batch, opts.warmup)
        print(f"done cp={cp} mode={mode}: {results[cp, mode]}", flush=True)

    base = results.get((1, "-"))
    print(f"\nllama3 debug dims (dim 256, 6 layers, 16 heads, vocab 2048), batch {opts.batch} x seq {opts.seq_len}, "
          f"fp32, one forward+backward, 1 thread per rank; worst rank shown; "
          f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', 'glibc default')}")
    print("| cp | mode | peak RSS/rank (GiB) | step memory/rank (GiB) | step mem vs cp=1 | step time (s) | time vs cp=1 |")
    print("|---|---|---|---|---|---|---|")
    for (cp, mode), r in results.items():
        mem_ratio = f"{r['step'] / base['step']:.2f}" if base else "-"
        time_ratio = f"{r['seconds'] / base['seconds']:.2f}" if base else "-"
        print(f"| {cp} | {mode} | {r['peak'] / GiB:.2f} | {r['step'] / GiB:.2f} | {mem_ratio} | {r['seconds']:.1f} | {time_ratio} |")


if __name__ == "__main__":
    main()
