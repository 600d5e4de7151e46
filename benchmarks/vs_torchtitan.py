"""titan vs torchtitan 0.3.0 on the same CPU, run side by side: tokens/s and peak RSS.

    python benchmarks/vs_torchtitan.py                       # 5 pairs, 1 and 2 processes (~10 min quiet)
    python benchmarks/vs_torchtitan.py --pairs 9 --procs 1   # more pairs, one process only
    python benchmarks/vs_torchtitan.py --json vs_tt.json --best compile=model optim.fused=true

torchtitan runs through ../shared/torchtitan_cpu/run_torchtitan_cpu.sh (`--tt-dir`): PyPI
torchtitan 0.3.0, unmodified, in its own venv, on its llama3 "debugmodel" (dim 256, 6 layers,
16 heads, FFN 768, vocab 2048), 8 x 256 tokens per rank per step, fp32, AdamW, no compile/AC;
with 2 processes FSDP2 over gloo. The first call sets its venv and assets up (~2 min).
titan runs its CLI (`python -m titan.train`) on the same dims and per-rank batch:
`model=llama3_debug training.seq_len=256 training.global_batch_size=8` (x nproc, FSDP with
`parallel=fsdp` for 2 processes), once with its defaults and once with `--best` overrides.

Method (the machine may be shared, so nothing is compared across sittings):
- A round ("pair") runs every program once, for each process count; the order alternates each
  round (A, B, C, then C, B, A) so drifting load hits all alike. Medians over rounds.
- Throughput of a run: the median over its steps after `--warmup` of global tokens per second
  of wall time between consecutive step records (titan: metrics.jsonl `elapsed_s`;
  torchtitan: its per-step log line's timestamp). Both log every step, so both pay for it.
- Peak RSS: the largest lifetime peak resident set of any process of the run (`wait4`'s
  `ru_maxrss`, what GNU time reports): for several processes, the worst rank.
- Foreign CPU: `foreign_cpu.py` (from the torchtitan folder) samples, each second, the CPU
  used by processes outside this benchmark (100% = one core); the mean during each run is
  reported so a disturbed round can be told apart.
- Kernel floor (`--floor`, 1 process): each round also runs `step_floor.py`, which records the
  matmul and attention kernel calls of titan's default step, replays them between real steps and
  reports tokens / (their time): torch's own MKL sgemm and SDPA kernels, which torchtitan calls
  with the same shapes (attention with a dense mask: no less work). Its ratio to torchtitan is
  the ceiling of any fp32 speed-up on this config.
- Attention masks differ: torchtitan masks per packed document (block-causal, dense mask into
  SDPA); titan by default attends causally over the whole window (`data.document_mask=false`).
  `--titan-doc-mask` adds `data.document_mask=true` to every titan run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TT_DIR = (REPO / ".." / "shared" / "torchtitan_cpu").resolve()
if not DEFAULT_TT_DIR.exists():
    DEFAULT_TT_DIR = Path("/work/shared/torchtitan_cpu")
TITAN_BASE = ["model=llama3_debug", "training.seq_len=256"]
TOKENS_PER_RANK = 8 * 256
BEST = ["compile=model"]  # titan's fastest CPU settings measured on this config (see README)


@dataclass
class Run:
    program: str
    nproc: int
    tokens_per_s: float
    peak_rss_gib: float
    foreign_cpu: float
    wall_s: float
    steps: int
    step_times: list = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# running one program
# --------------------------------------------------------------------------------------------
def _wait(cmd: list[str], env: dict, cwd: str, log: Path, timeout: float) -> tuple[int, float, float]:
    """Run `cmd`, output to `log`; (exit code, wall seconds, peak RSS GiB of its largest process)."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    # Linux: ru_maxrss of a waited child is the max over it and its own waited descendants (KiB).
    return proc.returncode, time.perf_counter() - t0, usage.ru_maxrss / 2**20


def _median_after(times: list[float], warmup: int) -> float:
    kept = times[warmup:] or times
    return statistics.median(kept)


def run_titan(nproc: int, overrides: list[str], opts, work: Path, tag: str) -> Run:
    run_dir = work / tag
    cmd = [sys.executable, "-m", "titan.train", *TITAN_BASE,
           f"training.global_batch_size={8 * nproc}", f"training.steps={opts.steps}",
           "training.val_interval=0", "logging.interval=1", "checkpoint.save_final=false",
           f"hydra.run.dir={run_dir}"]
    if nproc > 1:
        cmd += ["parallel=fsdp", f"parallel.nproc_per_node={nproc}"]
    if opts.titan_doc_mask:
        cmd.append("data.document_mask=true")
    cmd += overrides
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(opts.inductor_cache))  # warm compiles after the first
    t_start = time.time()
    rc, wall, rss = _wait(cmd, env, str(REPO), work / f"{tag}.log", opts.timeout)
    metrics = run_dir / "metrics.jsonl"
    records = [json.loads(l) for l in metrics.read_text().splitlines()] if metrics.exists() else []
    elapsed = [r["elapsed_s"] for r in records if "loss" in r and "elapsed_s" in r]
    if rc != 0 or len(elapsed) < opts.warmup + 2:
        raise RuntimeError(f"titan run failed (rc {rc}); see {work / f'{tag}.log'}")
    dts = [b - a for a, b in zip(elapsed, elapsed[1:])]  # dts[i]: step i+2
    # Several processes: the workers fork from a server that reaps them, so wait4 sees only the
    # launcher; rank 0's own lifetime ru_maxrss (memory_gib on CPU) stands for the ranks.
    rss = max([rss] + [r["memory_gib"] for r in records if "memory_gib" in r])
    tokens = TOKENS_PER_RANK * nproc
    med = _median_after(dts, max(opts.warmup - 1, 0))
    return Run("titan", nproc, tokens / med, rss, opts.foreign.mean(t_start, time.time()), wall, len(elapsed), dts)


_TT_STEP = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) - root - INFO - step:\s+(\d+)\s+loss")


def run_torchtitan(nproc: int, opts, work: Path, tag: str) -> Run:
    out = work / tag
    env = dict(os.environ, NPROCS=str(nproc), STEPS=str(opts.steps), REPEATS="1", OUT=str(out))
    t_start = time.time()
    rc, wall, rss = _wait(["bash", str(opts.tt_dir / "run_torchtitan_cpu.sh")], env, str(REPO),
                          work / f"{tag}.log", opts.timeout)
    logs = list(out.glob(f"*_np{nproc}_r1.log"))
    text = re.sub(r"\x1b\[[0-9;]*m", "", logs[0].read_text()) if logs else ""
    stamps = [datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
              for m in _TT_STEP.finditer(text)]
    if rc != 0 or len(stamps) < opts.warmup + 2:
        raise RuntimeError(f"torchtitan run failed (rc {rc}); see {work / f'{tag}.log'} and {out}")
    # The per-rank files hold each rank's own lifetime ru_maxrss; wait4 saw the same maximum.
    ranks = [int(p.read_text()) / 2**20 for p in out.glob("*.rss/*.rss_kb")]
    rss = max(ranks) if ranks else rss
    dts = [b - a for a, b in zip(stamps, stamps[1:])]
    med = _median_after(dts, max(opts.warmup - 1, 0))
    return Run("torchtitan", nproc, TOKENS_PER_RANK * nproc / med, rss,
               opts.foreign.mean(t_start, time.time()), wall, len(stamps), dts)


def run_floor(opts, work: Path, tag: str) -> Run:
    """titan's default step: tokens / (its matmul + attention kernel time, replayed); no RSS."""
    out = work / f"{tag}.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "step_floor.py"), "--json", str(out),
           "--rounds", str(max(opts.steps - opts.warmup, 3)), "--warmup", str(opts.warmup)]
    t_start = time.time()
    rc, wall, _ = _wait(cmd, dict(os.environ, PYTHONWARNINGS="ignore"), str(REPO), work / f"{tag}.log", opts.timeout)
    if rc != 0 or not out.exists():
        raise RuntimeError(f"step_floor.py failed (rc {rc}); see {work / f'{tag}.log'}")
    r = json.loads(out.read_text())
    return Run("kernel floor", 1, r["floor_tokens_per_s"], float("nan"), opts.foreign.mean(t_start, time.time()), wall, 0)


# --------------------------------------------------------------------------------------------
# foreign load
# --------------------------------------------------------------------------------------------
class ForeignLoad:
    """CPU used by processes outside this benchmark, sampled each second by foreign_cpu.py."""

    def __init__(self, tt_dir: Path, work: Path):
        self.path = work / "foreign_cpu.txt"
        script = tt_dir / "foreign_cpu.py"
        self.proc = subprocess.Popen([sys.executable, str(script), str(os.getpid()), str(self.path)]) if script.exists() else None

    def mean(self, t0: float, t1: float) -> float:
        if not self.path.exists():
            return float("nan")
        vals = [float(c) for t, c in (l.split() for l in self.path.read_text().splitlines() if l.strip()) if t0 <= float(t) <= t1]
        return statistics.mean(vals) if vals else float("nan")

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------
def _gib(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.2f}"


def report(runs: list[Run], variants: list[str], opts) -> str:
    lines = []
    for nproc in opts.procs:
        tt = [r for r in runs if r.program == "torchtitan" and r.nproc == nproc]
        if not tt:
            continue
        tt_tps = statistics.median(r.tokens_per_s for r in tt)
        tt_rss = statistics.median(r.peak_rss_gib for r in tt)
        lines.append(f"\n{nproc} process{'es (FSDP)' if nproc > 1 else ''}, {len(tt)} rounds, "
                     f"{opts.steps} steps per run, median of steps {opts.warmup + 1}..{opts.steps} per run, median over rounds")
        lines.append("| program | tokens/s (global) | vs torchtitan | per-round ratios | peak RSS GiB (worst rank) | foreign CPU % |")
        lines.append("|---|---|---|---|---|---|")
        lines.append(f"| torchtitan 0.3.0 | {tt_tps:,.0f} | 1.00 | | {tt_rss:.2f} | {statistics.median(r.foreign_cpu for r in tt):.0f} |")
        for name in variants:
            mine = [r for r in runs if r.program == name and r.nproc == nproc]
            if not mine:
                continue
            # per round: this variant's run against the torchtitan run of the same round
            ratios = [m.tokens_per_s / t.tokens_per_s for m, t in zip(mine, tt)]
            tps = statistics.median(r.tokens_per_s for r in mine)
            lines.append(
                f"| {name} | {tps:,.0f} | **{statistics.median(ratios):.2f}** | "
                f"{' '.join(f'{x:.2f}' for x in ratios)} | {_gib(statistics.median(r.peak_rss_gib for r in mine))} | "
                f"{statistics.median(r.foreign_cpu for r in mine):.0f} |"
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=5, help="rounds; each runs every program once per process count")
    p.add_argument("--steps", type=int, default=12, help="training steps per run")
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of each run's median")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process counts to compare")
    p.add_argument("--best", nargs="*", default=BEST, help="titan overrides for the 'titan best' variant (empty: skip it)")
    p.add_argument("--best-procs", type=int, nargs="+", default=[1], help="process counts that run 'titan best'")
    p.add_argument("--floor", action="store_true", help="1 process: also the kernel floor of titan's default step (step_floor.py)")
    p.add_argument("--titan-doc-mask", action="store_true", help="titan with block-causal document masking, like torchtitan")
    p.add_argument("--tt-dir", type=Path, default=DEFAULT_TT_DIR, help="the torchtitan_cpu folder")
    p.add_argument("--timeout", type=float, default=600, help="seconds before one run is killed")
    p.add_argument("--work", type=Path, default=None, help="logs and run dirs (default: a temp dir, kept)")
    p.add_argument("--inductor-cache", type=Path, default=Path(tempfile.gettempdir()) / "titan-vs-tt-inductor")
    p.add_argument("--json", type=Path, default=None)
    opts = p.parse_args()
    if not (opts.tt_dir / "run_torchtitan_cpu.sh").exists():
        raise SystemExit(f"--tt-dir {opts.tt_dir}: run_torchtitan_cpu.sh not found")
    work = opts.work or Path(tempfile.mkdtemp(prefix="vs_tt_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"logs and run dirs: {work}", flush=True)

    setup = subprocess.run(["bash", str(opts.tt_dir / "run_torchtitan_cpu.sh")], env=dict(os.environ, NPROCS=""),
                           capture_output=True, text=True)
    if setup.returncode != 0:
        raise SystemExit(f"torchtitan setup failed:\n{setup.stdout[-2000:]}{setup.stderr[-2000:]}")

    opts.foreign = ForeignLoad(opts.tt_dir, work)
    programs = {"torchtitan": None, "titan default": []}
    if opts.best:
        programs["titan best"] = list(opts.best)
    if opts.floor:
        programs["kernel floor"] = None
    variants = [n for n in programs if n != "torchtitan"]
    runs: list[Run] = []
    try:
        for i in range(opts.pairs):
            order = list(programs) if i % 2 == 0 else list(reversed(programs))
            for nproc in opts.procs:
                for name in order:
                    if (name == "titan best" and nproc not in opts.best_procs) or (name == "kernel floor" and nproc != 1):
                        continue
                    tag = f"r{i}_np{nproc}_{name.replace(' ', '_')}"
                    load = os.getloadavg()[0]
                    if name == "torchtitan":
                        run = run_torchtitan(nproc, opts, work, tag)
                    elif name == "kernel floor":
                        run = run_floor(opts, work, tag)
                    else:
                        run = run_titan(nproc, programs[name], opts, work, tag)
                    run.program = name
                    runs.append(run)
                    print(f"round {i + 1}/{opts.pairs} np{nproc} {name:14s} {run.tokens_per_s:8,.0f} tok/s  "
                          f"peak RSS {_gib(run.peak_rss_gib)} GiB  wall {run.wall_s:5.1f} s  "
                          f"foreign CPU {run.foreign_cpu:.0f}%  loadavg {load:.1f}", flush=True)
    finally:
        opts.foreign.close()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"\n{when}, {os.cpu_count()} CPUs; titan best = {' '.join(opts.best) or '-'}"
          f"{'; titan with data.document_mask=true' if opts.titan_doc_mask else ''}")
    print(report(runs, variants, opts))
    if opts.json:
        opts.json.write_text(json.dumps({"when": when, "args": sys.argv[1:], "runs": [r.__dict__ for r in runs]}, indent=1))


if __name__ == "__main__":
    main()
