"""Planner estimate vs measured peak memory of real training steps on this CPU.

    python benchmarks/plan_vs_measured.py            # all cases, a markdown table
    python benchmarks/plan_vs_measured.py --quick    # the two smallest cases
    python benchmarks/plan_vs_measured.py --only TP  # cases whose label contains "TP"

Each case runs in fresh processes (1, or 2 with gloo for FSDP) that build the model with
titan's own code (meta model -> titan.parallel -> materialise -> titan.optim), take two warm-up
steps (so AdamW's states exist), reset the peak counter (`echo 5 > /proc/self/clear_refs`) and
take one more step, fp32. Measured = VmHWM during that step minus VmRSS just before the model
was built (after imports, tokens, process group): the *increment* of the step over the torch
runtime, which alone is several hundred MB and is not what the planner models.

glibc keeps freed small and medium blocks in its heap, so RSS can stay above the live bytes.
`MALLOC_MMAP_THRESHOLD_` pins large allocations to mmap (returned to the OS on free) so RSS
follows live tensors; the table shows that column and the default-malloc one.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DIM512 = ["model.dim=512", "model.n_heads=16", "model.multiple_of=256"]
BASE = ["training.device=cpu", "training.seq_len=256", "training.micro_batch_size=8", "training.global_batch_size=8"]
CASES = [
    ("debug, AC none", 1, BASE),
    ("debug, AC full", 1, BASE + ["activation_checkpoint=full"]),
    ("debug, AC selective_op", 1, BASE + ["activation_checkpoint=selective_op"]),
    ("dim 512, AC none", 1, BASE + DIM512),
    ("dim 512, AC full", 1, BASE + DIM512 + ["activation_checkpoint=full"]),
    ("debug, FSDP x2, AC none", 2, BASE + ["parallel=fsdp", "training.global_batch_size=16"]),
    ("dim 512, FSDP x2, AC none", 2, BASE + DIM512 + ["parallel=fsdp", "training.global_batch_size=16"]),
    ("debug, DDP x2, AC none", 2, BASE + ["parallel=ddp", "training.global_batch_size=16"]),
    ("debug, TP x2 (+SP, loss parallel), AC none", 2, BASE + ["parallel=tp"]),
    ("dim 512, TP x2 (+SP, loss parallel), AC none", 2, BASE + DIM512 + ["parallel=tp"]),
]
QUICK = CASES[:2]
MMAP_THRESHOLD = "131072"  # 128 KiB: glibc's default, but fixed (no dynamic raise to 32 MiB)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def worker(overrides: list[str], steps: int = 2) -> dict:
    """One rank: build, warm up, measure one step. Returns bytes."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from titan.activation_checkpoint import apply_activation_checkpointing
    from titan.config.validate import resolve_micro_batch
    from titan.models import build_model, model_args
    from titan.optim import build_optimizer
    from titan.parallel import Parallel
    from titan.tools.plan import compose

    cfg = compose(overrides)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    resolve_micro_batch(cfg, world)
    torch.manual_seed(0)
    t = cfg.training
    vocab = cfg.model.vocab_size if cfg.model.vocab_size > 0 else cfg.tokenizer.vocab_size
    tokens = torch.randint(0, vocab, (t.micro_batch_size, t.seq_len + 1))
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    parallel = Parallel(cfg.parallel, cfg.precision, world, "cpu")

    def build(model_cfg):
        model = build_model(model_args(model_cfg, vocab, t.seq_len))
        model = parallel.apply(model, [lambda m: apply_activation_checkpointing(m, cfg.activation_checkpoint)])
        parallel.materialize_and_init(model, torch.device("cpu"), t.seed)
        model.train()
        return model, build_optimizer(model, cfg.optim, cfg.precision)

    def step(model, optimizer) -> None:
        with parallel.loss_context():
            logits = model(inputs)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum") / labels.numel()
            del logits
            loss.backward()
        parallel.clip_grad_norm(model.parameters(), cfg.optim.max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # Warm the runtime first with a one-block toy of the same layout: the first meta build
    # imports torch's Python meta kernels, the first step pages in kernels and starts threads
    # (~70 MB, none of it the step's tensors). `cold_baseline` is RSS before even that.
    cold_baseline = _status_kib("VmRSS")
    toy = dataclasses.replace(cfg.model, dim=64, n_layers=1, n_heads=4, n_kv_heads=None, multiple_of=32)
    step(*build(toy))
    gc.collect()
    if world > 1:
        dist.barrier()
    baseline = _status_kib("VmRSS")
    model, optimizer = build(cfg.model)

    for _ in range(steps):
        step(model, optimizer)
    if world > 1:
        dist.barrier()
    before = _status_kib("VmRSS")
    _reset_peak()
    step(model, optimizer)
    peak = _status_kib("VmHWM")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return {"cold_baseline": cold_baseline * 1024, "baseline": baseline * 1024, "rss_before_step": before * 1024, "peak": peak * 1024, "increment": (peak - baseline) * 1024, "cold_increment": (peak - cold_baseline) * 1024}


def measure(overrides: list[str], nproc: int, pin_mmap: bool = True) -> dict:
    """Run `nproc` worker processes; per-rank results, largest increment first."""
    env = {**os.environ, "OMP_NUM_THREADS": "1" if nproc > 1 else os.environ.get("OMP_NUM_THREADS", "2")}
    if pin_mmap:
        env["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD
    else:
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(nproc):
        rank_env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        cmd = [sys.executable, __file__, "--worker", json.dumps(overrides)]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=rank_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        if p.returncode:
            raise RuntimeError(f"worker failed ({p.returncode}):\n{err[-3000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return max(results, key=lambda r: r["increment"])


def planned(overrides: list[str], nproc: int):
    from titan.plan import plan
    from titan.tools.plan import compose

    return plan(compose(overrides), world_size=nproc)


def compare(cases, default_malloc: bool = True) -> list[dict]:
    rows = []
    for label, nproc, overrides in cases:
        p = planned(overrides, nproc)
        pinned = measure(overrides, nproc, pin_mmap=True)
        row = {"case": label, "ranks": nproc, "planned": p.worst.peak, "measured": pinned["increment"], "baseline": pinned["baseline"]}
        if default_malloc:
            row["measured_default_malloc"] = measure(overrides, nproc, pin_mmap=False)["increment"]
        row["error"] = p.worst.peak / pinned["increment"] - 1
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    mib = 2**20
    has_default = any("measured_default_malloc" in r for r in rows)
    head = "| case | ranks | planned MiB | measured MiB | error |" + (" default malloc MiB |" if has_default else "") + " runtime baseline MiB |"
    sep = "|---" * (6 + has_default) + "|"
    lines = [head, sep]
    for r in rows:
        extra = f" {r['measured_default_malloc'] / mib:.0f} |" if has_default else ""
        lines.append(
            f"| {r['case']} | {r['ranks']} | {r['planned'] / mib:.0f} | {r['measured'] / mib:.0f} | {r['error']:+.1%} |{extra} {r['baseline'] / mib:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="only the two smallest cases")
    ap.add_argument("--only", help="only the cases whose label contains this text")
    ap.add_argument("--no-default-malloc", action="store_true", help="skip the default-malloc column")
    a = ap.parse_args()
    if a.worker is not None:
        print(json.dumps(worker(json.loads(a.worker))))
        return
    cases = QUICK if a.quick else [c for c in CASES if a.only is None or a.only in c[0]]
    rows = compare(cases, default_malloc=not a.no_default_malloc)
    print(markdown(rows))


if __name__ == "__main__":
    main()
