"""Step time, throughput, MFU and peak memory over a grid of config groups, titan's real Trainer.

    python benchmarks/grid.py                        # fp32,float8_tensorwise x compile off,model x AC none,full
    python benchmarks/grid.py --steps 10 --warmup 3 --grid precision=fp32,float8_rowwise \
        compile=off,model activation_checkpoint=none,full  model=llama3_debug training.seq_len=256
    python benchmarks/grid.py --json grid.json --skip-memory optim.fused=true

Every cell of the grid (the cartesian product of the `--grid` group lists, each `group=a,b,...`
a Hydra group or a dotted key) is composed with Hydra's compose API on top of the positional
overrides (default: llama3_debug, seq 256, global batch 8, one process) and built as a real
`titan.train.trainer.Trainer`.

Time: all trainers are built first, in one process; then each round steps every cell once, in
turn (round-robin, the starting cell rotating by one each round), so machine noise hits all
cells alike. A step is what `Trainer.fit` does per step: `accum_steps` batches from the loader,
`Trainer.train_step` (forward, backward, clipping, optimizer) and the LR scheduler step. The
first `--warmup` steps of each cell (compile, allocator warm-up, optimizer-state creation) are
dropped; the median of the remaining `--steps` is reported, with tokens/s, achieved TFLOP/s
(model FLOPs per token x tokens/s: activation-checkpoint recompute is not counted as useful
work) and MFU against a peak measured in the same run (best fp32 1024^3 matmul with this
process's threads, `titan.metrics.measure_cpu_peak_flops`, before and after the timed rounds) or
the vendor table on CUDA.

Memory: peak memory cannot be told apart per cell when all cells share one process, so a
second pass runs each cell alone in a fresh subprocess (`--memory-cell INDEX`, same script):
build, read VmRSS, take one step (compile, optimizer states), reset the peak (`echo 5 >
/proc/self/clear_refs`), take `--memory-steps` more steps and read VmHWM. Reported: the peak RSS
of those steps minus the RSS after build (optimizer states + gradients + activations +
temporaries, what the config changes), and the whole-process peak RSS. The first step (with
compilation) is reported apart in the JSON. On CUDA the same with `torch.cuda.max_memory_allocated`
minus the allocated bytes after build. Large allocations are pinned to mmap
(MALLOC_MMAP_THRESHOLD_, `--mmap-threshold`) so freed tensors leave the RSS, as in
benchmarks/cp_memory.py and benchmarks/plan_vs_measured.py.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch
from hydra import compose, initialize_config_dir

from titan.config.load import CONF_DIR, register_schemas, to_typed
from titan.config.validate import validate
from titan.metrics import GPU_PEAK_FLOPS, measure_cpu_peak_flops, peak_flops
from titan.train.env import setup_rank
from titan.train.trainer import Trainer

DEFAULT_GRID = ["precision=fp32,float8_tensorwise", "compile=off,model", "activation_checkpoint=none,full"]
BASE = ["model=llama3_debug", "training.seq_len=256", "training.global_batch_size=8"]
GiB = 2**30


# --------------------------------------------------------------------------------------------
# grid and config
# --------------------------------------------------------------------------------------------
def parse_grid(specs: list[str]) -> list[tuple[str, list[str]]]:
    grid = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        options = [v for v in values.split(",") if v]
        if not sep or not key or not options:
            raise SystemExit(f"--grid expects group=a,b,... ; got {spec!r}")
        grid.append((key, options))
    return grid


def grid_cells(grid: list[tuple[str, list[str]]]) -> list[list[str]]:
    """Cartesian product, first group varying slowest; each cell a list of `key=value` overrides."""
    keys = [k for k, _ in grid]
    return [[f"{k}={v}" for k, v in zip(keys, combo)] for combo in itertools.product(*(opts for _, opts in grid))]


def cell_label(cell: list[str]) -> str:
    return " ".join(o.split("=", 1)[1] if "." not in o.split("=", 1)[0] else o for o in cell)


def merge_overrides(base: list[str], user: list[str]) -> list[str]:
    """`base` then `user`, a user override replacing a base one with the same key (Hydra rejects
    two values for one config group)."""
    keys = {o.partition("=")[0].lstrip("+~") for o in user}
    return [o for o in base if o.partition("=")[0] not in keys] + list(user)


def build_config(overrides: list[str], total_steps: int, run_dir: str):
    register_schemas()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        dc = compose(config_name="train", overrides=overrides)
    cfg = to_typed(dc)
    cfg.training.steps, cfg.training.val_interval = total_steps, 0
    cfg.lr_schedule.warmup_steps = min(cfg.lr_schedule.warmup_steps, max(total_steps - 1, 0))
    cfg.logging.interval, cfg.checkpoint.interval, cfg.run_dir = 1, 0, run_dir
    validate(cfg, world_size=1)
    return cfg


def build_trainer(overrides: list[str], total_steps: int, run_dir: str) -> Trainer:
    cfg = build_config(overrides, total_steps, run_dir)
    trainer = Trainer(cfg, setup_rank(cfg))
    trainer.metrics.close()  # the benchmark logs nothing to metrics.jsonl
    trainer.metrics.enabled = False
    return trainer


def step(trainer: Trainer) -> float:
    """One optimizer step as `Trainer.fit` takes it (data, train_step, LR schedule); seconds."""
    device = trainer.env.device
    t0 = time.perf_counter()
    batches = [trainer.c.loader.next_batch() for _ in range(trainer.accum_steps)]
    trainer.c.state.step += 1
    trainer.train_step(batches)  # returns floats: the step has finished on the device too
    trainer.c.scheduler.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------------------
# memory pass: one cell per fresh process
# --------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")


def memory_cell(overrides: list[str], steps: int) -> dict:
    """Build one cell, one step (compile, optimizer states), reset the peak, `steps` more."""
    with tempfile.TemporaryDirectory() as tmp:
        gc.collect()
        trainer = build_trainer(overrides, steps + 1, tmp)
        device = trainer.env.device
        cuda = device.type == "cuda"
        gc.collect()
        if cuda:
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
        rss_built = _status_kib("VmRSS") * 1024
        _reset_peak(device)
        step(trainer)
        first_rss = _status_kib("VmHWM") * 1024
        first_cuda = torch.cuda.max_memory_allocated(device) if cuda else None
        _reset_peak(device)
        for _ in range(steps):
            step(trainer)
        out = {
            "device": device.type,
            "rss_after_build_bytes": rss_built,
            "peak_rss_bytes": _status_kib("VmHWM") * 1024,
            "first_step_peak_rss_bytes": first_rss,
        }
        out["step_rss_bytes"] = out["peak_rss_bytes"] - rss_built
        out["first_step_rss_bytes"] = first_rss - rss_built
        if cuda:
            out["cuda_after_build_bytes"] = base
            out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device)
            out["cuda_step_bytes"] = out["cuda_peak_bytes"] - base
            out["cuda_first_step_bytes"] = first_cuda - base
        return out


def run_memory_pass(cells: list[list[str]], opts) -> list[dict]:
    env = dict(os.environ)
    if opts.mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(opts.mmap_threshold)
    results = []
    for i, cell in enumerate(cells):
        cmd = [sys.executable, str(Path(__file__).resolve()), *opts.overrides]
        cmd += ["--memory-cell", str(i), "--memory-steps", str(opts.memory_steps), "--grid", *opts.grid]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("MEMORY ")]
        if proc.returncode != 0 or not lines:
            print(f"  memory cell {i} ({cell_label(cell)}) failed (rc {proc.returncode}):\n{proc.stderr[-2000:]}", file=sys.stderr)
            results.append({"error": proc.stderr[-2000:]})
            continue
        mem = json.loads(lines[-1][len("MEMORY "):])
        results.append(mem)
        key = "cuda_step_bytes" if mem["device"] == "cuda" else "step_rss_bytes"
        print(f"  memory {i + 1}/{len(cells)} {cell_label(cell)}: step {mem[key] / GiB:.3f} GiB, "
              f"peak RSS {mem['peak_rss_bytes'] / GiB:.3f} GiB ({time.perf_counter() - t0:.0f} s)", flush=True)
    return results


# --------------------------------------------------------------------------------------------
# time pass: all cells in this process, interleaved
# --------------------------------------------------------------------------------------------
def run_time_pass(cells: list[list[str]], passthrough: list[str], steps: int, warmup: int, tmp: str):
    trainers = []
    for i, cell in enumerate(cells):
        t0 = time.perf_counter()
        trainers.append(build_trainer(passthrough + cell, steps + warmup, os.path.join(tmp, f"cell{i}")))
        print(f"  built {i + 1}/{len(cells)} {cell_label(cell)} ({time.perf_counter() - t0:.1f} s)", flush=True)
    device = trainers[0].env.device
    peak_before = measure_cpu_peak_flops() if device.type == "cpu" else None
    times: list[list[float]] = [[] for _ in cells]
    n = len(cells)
    for r in range(steps + warmup):
        t_round = time.perf_counter()
        for k in range(n):
            i = (r + k) % n  # rotate the starting cell: no cell always follows the same one
            times[i].append(step(trainers[i]))
        tag = "warm-up" if r < warmup else "timed"
        print(f"  round {r + 1}/{steps + warmup} ({tag}) {time.perf_counter() - t_round:.1f} s", flush=True)
    if device.type == "cpu":
        peak = max(peak_before, measure_cpu_peak_flops())
        peak_src = f"measured fp32 matmul, {torch.get_num_threads()} threads"
    else:
        peak = peak_flops(device, trainers[0].cfg.logging.peak_tflops)
        name = torch.cuda.get_device_name(device)
        peak_src = f"{name} dense bf16 datasheet" if any(k in name for k in GPU_PEAK_FLOPS) else "configured/H100 default"
    info = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "peak_flops": peak,
        "peak_source": peak_src,
        "model": trainers[0].cfg.model.name,
        "params": trainers[0].c.n_params,
        "seq_len": trainers[0].cfg.training.seq_len,
        "global_batch_size": trainers[0].cfg.training.global_batch_size,
    }
    rows = []
    for cell, trainer, t in zip(cells, trainers, times):
        timed = t[warmup:]
        med = statistics.median(timed)
        tps = trainer.tokens_per_step / med
        flops = trainer.c.flops_per_token * tps
        rows.append({
            "cell": cell,
            "label": cell_label(cell),
            "median_step_s": med,
            "min_step_s": min(timed),
            "max_step_s": max(timed),
            "warmup_step_s": t[:warmup],
            "step_s": timed,
            "tokens_per_sec": tps,
            "tflops": flops / 1e12,
            "mfu": flops / peak,
            "flops_per_token": trainer.c.flops_per_token,
        })
    del trainers
    gc.collect()
    return rows, info


# --------------------------------------------------------------------------------------------
def table(rows: list[dict], grid_keys: list[str]) -> str:
    cuda = any(r.get("memory", {}).get("device") == "cuda" for r in rows)
    mem_key = "cuda_step_bytes" if cuda else "step_rss_bytes"
    mem_name = "step memory (max_allocated - after build) GiB" if cuda else "step memory (VmHWM - RSS after build) GiB"
    head = [*grid_keys, "median s/step", "tokens/s", "TFLOP/s", "MFU", mem_name, "peak RSS GiB", "tok/s ratio", "memory ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ref = rows[0]
    ref_mem = ref.get("memory", {}).get(mem_key)
    for r in rows:
        mem = r.get("memory", {})
        m, peak = mem.get(mem_key), mem.get("peak_rss_bytes")
        vals = [o.split("=", 1)[1] for o in r["cell"]]
        vals += [
            f"{r['median_step_s']:.3f}",
            f"{r['tokens_per_sec']:,.0f}",
            f"{r['tflops']:.3f}",
            f"{100 * r['mfu']:.1f}%",
            "-" if m is None else f"{m / GiB:.3f}",
            "-" if peak is None else f"{peak / GiB:.3f}",
            f"{r['tokens_per_sec'] / ref['tokens_per_sec']:.2f}",
            "-" if m is None or not ref_mem else f"{m / ref_mem:.2f}",
        ]
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per cell (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="steps per cell dropped (compile warm-up)")
    parser.add_argument("--grid", nargs="+", default=DEFAULT_GRID, metavar="GROUP=A,B",
                        help=f"groups and their options; default: {' '.join(DEFAULT_GRID)}")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--memory-steps", type=int, default=3, help="steps measured per memory subprocess (after one)")
    parser.add_argument("--mmap-threshold", type=int, default=128 * 1024,
                        help="MALLOC_MMAP_THRESHOLD_ for the memory subprocesses; 0 = glibc default")
    parser.add_argument("--skip-memory", action="store_true", help="time pass only")
    parser.add_argument("--skip-time", action="store_true", help="memory pass only")
    parser.add_argument("--memory-cell", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", default=[], help="Hydra overrides for every cell")
    opts = parser.parse_intermixed_args()
    grid = parse_grid(opts.grid)
    cells = grid_cells(grid)
    grid_keys = {k for k, _ in grid}
    for o in opts.overrides:
        if o.partition("=")[0].lstrip("+~") in grid_keys:
            raise SystemExit(f"{o!r} sets a grid key; put its values in --grid instead")
    base = [o for o in BASE if o.partition("=")[0] not in grid_keys]  # a grid key replaces a default
    passthrough = merge_overrides(base, opts.overrides)

    if opts.memory_cell is not None:
        print("MEMORY " + json.dumps(memory_cell(passthrough + cells[opts.memory_cell], opts.memory_steps)), flush=True)
        return

    print(f"{len(cells)} cells: " + "; ".join(cell_label(c) for c in cells))
    print(f"overrides: {' '.join(passthrough)}")
    rows: list[dict] = [{"cell": c, "label": cell_label(c)} for c in cells]
    info: dict = {}
    t_all = time.perf_counter()
    if not opts.skip_time:
        print(f"time pass: {opts.warmup} warm-up + {opts.steps} timed steps per cell, interleaved", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            rows, info = run_time_pass(cells, passthrough, opts.steps, opts.warmup, tmp)
    if not opts.skip_memory:
        print(f"memory pass: one subprocess per cell, 1 + {opts.memory_steps} steps", flush=True)
        for row, mem in zip(rows, run_memory_pass(cells, opts)):
            row["memory"] = mem
    wall = time.perf_counter() - t_all
    if info:
        print(f"\n{info['model']} ({info['params'] / 1e6:.1f}M params), batch {info['global_batch_size']} x seq "
              f"{info['seq_len']}, {info['threads']} threads on {info['device']}; peak {info['peak_flops'] / 1e12:.3f} "
              f"TFLOP/s ({info['peak_source']}); median of {opts.steps} interleaved steps after {opts.warmup} warm-up")
        print(table(rows, [k for k, _ in grid]))
        print("ratios vs the first row; memory: peak of steps 2.. minus RSS after build, each cell in its own process")
    else:
        for r in rows:
            print(r["label"], json.dumps(r.get("memory")))
    print(f"total {wall:.0f} s")
    if opts.json:
        payload = {"grid": opts.grid, "overrides": passthrough, "steps": opts.steps, "warmup": opts.warmup,
                   "memory_steps": opts.memory_steps, "mmap_threshold": opts.mmap_threshold, "info": info, "cells": rows}
        Path(opts.json).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {opts.json}")


if __name__ == "__main__":
    main()
