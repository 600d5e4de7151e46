"""Where titan's training step goes on CPU, and the floor no implementation on torch can beat.

    python benchmarks/step_floor.py                         # llama3_debug, 8 x 256, fp32 (vs_torchtitan's config)
    python benchmarks/step_floor.py --rounds 12 compile=model  # any titan overrides
    python benchmarks/step_floor.py --json floor.json

Builds the real Trainer in this process and records, during one `Trainer.train_step`, every
call of a matmul kernel (aten mm/addmm/bmm/baddbmm) and of an attention kernel (SDPA forward
and backward) with its shapes, strides and arguments. Then it alternates, round by round, a real
step, a replay of the step's matmul calls and a replay of its attention calls, and reports the
medians. On CPU these are torch's own kernels (MKL sgemm, the flash-attention CPU kernel): a
program that trains the same model on torch (torchtitan included) makes the same matmul calls and
at least this attention work, so tokens / (matmul + attention time) is a ceiling on its tokens/s.
The replay reuses its input tensors (warmer caches than the real step), so if anything the
floor is optimistic. No profiler runs while timing: on two cores its threads slow the kernels.
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
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import titan_config  # noqa: E402

from titan.metrics import measure_cpu_peak_flops  # noqa: E402
from titan.train.env import setup_rank  # noqa: E402
from titan.train.trainer import Trainer  # noqa: E402

BASE = ["model=llama3_debug", "training.seq_len=256", "training.global_batch_size=8"]
MATMUL = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm, torch.ops.aten.baddbmm}


class _Spec:
    """A matmul operand by shape and strides: its values do not change a GEMM's speed."""

    def __init__(self, t: torch.Tensor):
        self.key = (tuple(t.shape), tuple(t.stride()), t.dtype)


class KernelRecorder(TorchDispatchMode):
    """Records the matmul and attention kernel calls made under it (below autograd, so the
    backward's calls too). Attention arguments are cloned: the flash kernel's speed depends on
    the values (a random log-sum-exp could underflow into slow denormals)."""

    def __init__(self):
        super().__init__()
        self.calls: dict[str, list] = {"matmul": [], "attention": []}
        self.matmul_flops = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in MATMUL:
            spec = lambda x: _Spec(x) if isinstance(x, torch.Tensor) else x  # noqa: E731
            self.calls["matmul"].append((func, tree_map(spec, args), tree_map(spec, kwargs)))
            out = func(*args, **kwargs)
            self.matmul_flops += 2 * out.numel() * args[-1].shape[-2]  # 2 m n k (x batch)
            return out
        if packet.__name__.startswith("_scaled_dot_product"):
            clone = lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x  # noqa: E731
            self.calls["attention"].append((func, tree_map(clone, args), tree_map(clone, kwargs)))
        return func(*args, **kwargs)


def _materialize(calls: list) -> list:
    """Matmul specs -> random tensors with the same shapes and strides (one per distinct spec)."""
    cache: dict = {}

    def tensor(x):
        if not isinstance(x, _Spec):
            return x
        if x.key not in cache:
            shape, stride, dtype = x.key
            size = 1 + sum((n - 1) * s for n, s in zip(shape, stride))
            cache[x.key] = torch.randn(size, dtype=dtype).as_strided(shape, stride)
        return cache[x.key]

    return [(f, tree_map(tensor, a), tree_map(tensor, k)) for f, a, k in calls]


def _replay(calls: list) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        for func, args, kwargs in calls:
            func(*args, **kwargs)
    return time.perf_counter() - t0


def measure(overrides: list[str], rounds: int, warmup: int) -> dict:
    cfg = titan_config(BASE + overrides, rounds + warmup + 2, tempfile.mkdtemp(prefix="floor_"))
    trainer = Trainer(cfg, setup_rank(cfg))
    batches = [trainer.c.loader.next_batch() for _ in range(trainer.accum_steps)]
    tokens = cfg.training.global_batch_size * cfg.training.seq_len
    for _ in range(warmup):
        trainer.train_step(batches)
    recorder = KernelRecorder()
    with recorder:
        trainer.train_step(batches)
    matmuls, attention = _materialize(recorder.calls["matmul"]), recorder.calls["attention"]
    _replay(matmuls), _replay(attention)  # warm
    step, mm, attn = [], [], []
    for _ in range(rounds):  # interleaved, so drifting load hits the three alike
        t0 = time.perf_counter()
        trainer.train_step(batches)
        step.append(time.perf_counter() - t0)
        mm.append(_replay(matmuls))
        attn.append(_replay(attention))
    step_ms, mm_ms, attn_ms = (statistics.median(x) * 1e3 for x in (step, mm, attn))
    return {
        "overrides": overrides, "threads": torch.get_num_threads(), "tokens_per_step": tokens,
        "matmul_calls": len(matmuls), "attention_calls": len(attention),
        "step_ms": step_ms, "matmul_ms": mm_ms, "attention_ms": attn_ms,
        "matmul_gflops": recorder.matmul_flops / (mm_ms / 1e3) / 1e9, "peak_gflops": measure_cpu_peak_flops() / 1e9,
        "tokens_per_s": tokens / (step_ms / 1e3), "floor_tokens_per_s": tokens / ((mm_ms + attn_ms) / 1e3),
    }


def table(r: dict) -> str:
    rest = r["step_ms"] - r["matmul_ms"] - r["attention_ms"]
    share = lambda ms: f"{100 * ms / r['step_ms']:.0f}%"  # noqa: E731
    return "\n".join([
        f"titan {' '.join(BASE + r['overrides'])}, {r['threads']} threads: "
        f"{r['step_ms']:.0f} ms/step, {r['tokens_per_s']:,.0f} tokens/s (medians, kernels replayed between steps)",
        "| part of a step | ms/step | share |",
        "|---|---|---|",
        f"| matmul kernels: {r['matmul_calls']} calls, {r['matmul_gflops']:.0f} GFLOP/s (measured fp32 peak "
        f"{r['peak_gflops']:.0f}) | {r['matmul_ms']:.0f} | {share(r['matmul_ms'])} |",
        f"| attention kernels: {r['attention_calls']} calls (SDPA fwd + bwd) | {r['attention_ms']:.0f} | {share(r['attention_ms'])} |",
        f"| everything else | {rest:.0f} | {share(rest)} |",
        f"floor (matmul + attention only): {r['floor_tokens_per_s']:,.0f} tokens/s, "
        f"{r['floor_tokens_per_s'] / r['tokens_per_s']:.2f}x this step",
    ])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=10, help="rounds of step + matmul replay + attention replay")
    p.add_argument("--warmup", type=int, default=3, help="steps before the kernels are recorded")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("overrides", nargs="*", help="titan config overrides")
    opts = p.parse_args()
    r = measure(opts.overrides, opts.rounds, opts.warmup)
    print(table(r))
    if opts.json:
        opts.json.write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
