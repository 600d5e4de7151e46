"""Where titan's training step goes on CPU, and the floor no implementation on torch can beat.

    python benchmarks/step_floor.py                         # llama3_debug, 8 x 256, fp32 (vs_torchtitan's config)
    python benchmarks/step_floor.py --steps 6 compile=model  # any titan overrides
    python benchmarks/step_floor.py --json floor.json

Builds the real Trainer in this process, times `Trainer.train_step` without a profiler, then
profiles a few steps and splits each step's wall time into the matmul kernels (aten mm/addmm/bmm),
the attention kernels (SDPA forward and backward) and everything else. On CPU both are torch's own
kernels (MKL sgemm, the flash-attention CPU kernel): any program that trains the same model with
the same math on torch (torchtitan included) calls them with the same shapes, so
tokens / (matmul + attention time) is a ceiling on its tokens/s. The matmul rate is printed against
this process's measured fp32 peak (`titan.metrics.measure_cpu_peak_flops`), so one can see
whether the kernels themselves have headroom.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import titan_config  # noqa: E402

from titan.metrics import measure_cpu_peak_flops  # noqa: E402
from titan.train.env import setup_rank  # noqa: E402
from titan.train.trainer import Trainer  # noqa: E402

BASE = ["model=llama3_debug", "training.seq_len=256", "training.global_batch_size=8"]
MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
ATTENTION_PREFIX = "aten::_scaled_dot_product_"  # flash/math kernels and their backward ops


def kernel_ms(prof, steps: int) -> tuple[float, float, float]:
    """Per step: ms in matmul kernels, in attention kernels, and matmul FLOPs."""
    mm = attn = flops = 0.0
    for ev in prof.key_averages():
        if ev.key in MATMUL:
            mm += ev.self_cpu_time_total
            flops += ev.flops or 0
        elif ev.key.startswith(ATTENTION_PREFIX):
            attn += ev.self_cpu_time_total
    return mm / 1e3 / steps, attn / 1e3 / steps, flops / steps


def measure(overrides: list[str], steps: int, warmup: int, profiled: int) -> dict:
    cfg = titan_config(BASE + overrides, steps + warmup + profiled + 1, tempfile.mkdtemp(prefix="floor_"))
    trainer = Trainer(cfg, setup_rank(cfg))
    batches = [trainer.c.loader.next_batch() for _ in range(trainer.accum_steps)]
    tokens = cfg.training.global_batch_size * cfg.training.seq_len
    for _ in range(warmup):
        trainer.train_step(batches)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        trainer.train_step(batches)
        times.append(time.perf_counter() - t0)
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        t0 = time.perf_counter()
        for _ in range(profiled):
            trainer.train_step(batches)
        profiled_ms = (time.perf_counter() - t0) * 1e3 / profiled
    mm_ms, attn_ms, flops = kernel_ms(prof, profiled)
    step_ms = statistics.median(times) * 1e3
    peak = measure_cpu_peak_flops()
    return {
        "overrides": overrides, "threads": torch.get_num_threads(), "tokens_per_step": tokens,
        "step_ms": step_ms, "profiled_step_ms": profiled_ms, "matmul_ms": mm_ms, "attention_ms": attn_ms,
        "matmul_gflops": flops / (mm_ms / 1e3) / 1e9 if mm_ms else 0.0, "peak_gflops": peak / 1e9,
        "tokens_per_s": tokens / (step_ms / 1e3), "floor_tokens_per_s": tokens / ((mm_ms + attn_ms) / 1e3),
    }


def table(r: dict) -> str:
    rest = r["profiled_step_ms"] - r["matmul_ms"] - r["attention_ms"]
    share = lambda ms: f"{100 * ms / r['profiled_step_ms']:.0f}%"  # noqa: E731
    return "\n".join([
        f"titan {' '.join(BASE + r['overrides'])}, {r['threads']} threads: "
        f"{r['step_ms']:.0f} ms/step, {r['tokens_per_s']:,.0f} tokens/s",
        "| part of a step (profiled) | ms/step | share |",
        "|---|---|---|",
        f"| matmul kernels ({r['matmul_gflops']:.0f} GFLOP/s; measured fp32 peak {r['peak_gflops']:.0f}) "
        f"| {r['matmul_ms']:.0f} | {share(r['matmul_ms'])} |",
        f"| attention kernels (SDPA fwd + bwd) | {r['attention_ms']:.0f} | {share(r['attention_ms'])} |",
        f"| everything else | {rest:.0f} | {share(rest)} |",
        f"floor (matmul + attention only): {r['floor_tokens_per_s']:,.0f} tokens/s, "
        f"{r['floor_tokens_per_s'] / r['tokens_per_s']:.2f}x this step",
    ])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8, help="timed steps (no profiler)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--profiled", type=int, default=3, help="steps under the profiler")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("overrides", nargs="*", help="titan config overrides")
    opts = p.parse_args()
    r = measure(opts.overrides, opts.steps, opts.warmup, opts.profiled)
    print(table(r))
    if opts.json:
        opts.json.write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
