"""Throughput, MFU, memory, and where metrics go (console, metrics.jsonl, W&B, TensorBoard).

Only rank 0 builds sinks; other ranks pass `enabled=False` and log nothing.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from titan.config.load import plain
from titan.config.schema import LogBackend, TrainConfig

log = logging.getLogger("titan")

# Dense bf16 peak FLOP/s per GPU (vendor datasheets), matched by substring of the device name
# (first match wins, so more specific names come first). ROCm builds of torch report AMD GPUs
# through the same `cuda` device API ("AMD Instinct MI300X").
GPU_PEAK_FLOPS = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
    "MI355X": 2516e12,
    "MI325X": 1307e12,
    "MI300X": 1307e12,
    "MI250X": 383e12,
}


def measure_cpu_peak_flops(size: int = 1024, reps: int = 8) -> float:
    """Best fp32 matmul rate with this process's thread count; the honest CPU 'peak'."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm up the BLAS
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


def gpu_peak_flops(device_name: str) -> Optional[float]:
    """Dense bf16 peak of a GPU from its name, or None when the table does not know it."""
    return next((flops for key, flops in GPU_PEAK_FLOPS.items() if key in device_name), None)


def peak_flops(device: torch.device, configured_tflops: Optional[float] = None) -> float:
    """Per-device peak for MFU: configured, else the GPU table, else a CPU matmul measurement."""
    if configured_tflops:
        return configured_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        flops = gpu_peak_flops(name)
        if flops is None:
            log.warning("unknown GPU %r: MFU uses the H100 peak; set logging.peak_tflops", name)
            return 989e12
        return flops
    # Measured in this run, with this rank's threads: a peak cached from another moment (or
    # another load on a shared machine) would make MFU meaningless.
    return measure_cpu_peak_flops()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif Path("/proc/self/clear_refs").exists():
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)
        except OSError:
            pass


def peak_memory_gib(device: torch.device) -> float:
    """CUDA allocator peak on GPU; peak resident set size (VmHWM) of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Throughput:
    """Tokens/s, achieved TFLOP/s and MFU over the training steps since the last `measure`.

    Only the time of training steps (data + `train_step` + schedule) counts: validation and
    checkpoint saves in between would otherwise show up as a slower training. Validation
    time is reported on its own as `val_s` (checkpoint saves as `checkpoint_block_s`).

    On CPU the peak is a measurement (`remeasure_peak`), and one taken while the machine was
    busy understates it: when a window's achieved rate beats it, the peak is measured again
    and becomes the largest rate seen (that window's included), so MFU never exceeds 100%."""

    def __init__(self, flops_per_token: float, world_size: int, peak_flops_per_device: float,
                 remeasure_peak: Optional[Callable[[], float]] = None):
        self.flops_per_token = flops_per_token
        self.world_size = world_size
        self.peak = peak_flops_per_device
        self.remeasure_peak = remeasure_peak
        self.tokens = 0
        self.data_time = 0.0
        self.step_time = 0.0
        self.val_time = 0.0

    def add(self, tokens: int, data_time: float, step_time: float) -> None:
        """One training step: its tokens, seconds waiting for data, and seconds in all."""
        self.tokens += tokens
        self.data_time += data_time
        self.step_time += step_time

    def add_validation(self, seconds: float) -> None:
        self.val_time += seconds

    def measure(self) -> dict[str, float]:
        elapsed = max(self.step_time, 1e-9)
        tps = self.tokens / elapsed
        per_device = tps / self.world_size
        flops = self.flops_per_token * per_device
        peak = self._peak_for(flops)
        out = {
            "tokens_per_sec": tps,
            "tokens_per_sec_per_device": per_device,
            "tflops": flops / 1e12,
            "mfu": flops / peak,
            "peak_tflops": peak / 1e12,  # what MFU divides by (on CPU: the best matmul rate measured)
            "data_time_frac": self.data_time / elapsed,
            "val_s": self.val_time,
        }
        self.tokens, self.data_time, self.step_time, self.val_time = 0, 0.0, 0.0, 0.0
        return out

    def _peak_for(self, achieved: float) -> float:
        if achieved > self.peak and self.remeasure_peak is not None:
            before = self.peak
            self.peak = max(before, self.remeasure_peak(), achieved)
            log.info("measured CPU peak raised from %.3f to %.3f TFLOP/s (the first measurement ran under "
                     "load); MFU is relative to the best fp32 matmul rate seen in this run",
                     before / 1e12, self.peak / 1e12)
        return self.peak

    @classmethod
    def for_device(cls, flops_per_token: float, world_size: int, device: torch.device,
                   configured_tflops: Optional[float] = None) -> "Throughput":
        """With the device's peak (`peak_flops`); a measured CPU peak is re-measured when beaten."""
        measured = device.type != "cuda" and not configured_tflops
        return cls(flops_per_token, world_size, peak_flops(device, configured_tflops),
                   remeasure_peak=measure_cpu_peak_flops if measured else None)


def _console_line(record: dict[str, Any]) -> str:
    if "loss" not in record and "val_loss" not in record:  # downstream scores (titan.eval.loop)
        scores = "  ".join(f"{k[len('eval/'):]} {v:.4f}" for k, v in record.items() if k.startswith("eval/"))
        return f"step {record['step']:>6}  {scores}"
    if "val_loss" in record:
        return f"step {record['step']:>6}  val_loss {record['val_loss']:.4f}  val_ppl {record['val_ppl']:.2f}"
    return (
        f"step {record['step']:>6}  loss {record['loss']:.4f}  grad_norm {record['grad_norm']:.3f}  "
        f"lr {record['lr']:.2e}  tok/s {record['tokens_per_sec']:,.0f}  "
        f"tflops {record['tflops']:.3f}  mfu {100 * record['mfu']:.1f}%  "
        f"mem {record['memory_gib']:.2f}GiB  data {100 * record['data_time_frac']:.0f}%"
    )


class MetricsLogger:
    """Console + metrics.jsonl always (rank 0); W&B or TensorBoard when configured."""

    def __init__(self, cfg: TrainConfig, enabled: bool):
        self.enabled = enabled
        self.backend = None
        if not enabled:
            return
        run_dir = Path(cfg.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if cfg.logging.backend is LogBackend.wandb:
            from titan.wandb_sink import WandbSink

            self.backend = WandbSink(cfg)
        elif cfg.logging.backend is LogBackend.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.backend = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        log.info(_console_line(record))
        self.jsonl.write(json.dumps(record) + "\n")
        if self.backend is None:
            return
        if hasattr(self.backend, "add_scalar"):
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.backend.add_scalar(key, value, record["step"])
        else:
            self.backend.log(record)

    def close(self, summary: Optional[dict[str, Any]] = None) -> None:
        if not self.enabled:
            return
        self.jsonl.close()
        if self.backend is not None:
            self.backend.close(summary) if hasattr(self.backend, "log") else self.backend.close()


def write_summary(run_dir: str, summary: dict[str, Any]) -> None:
    (Path(run_dir) / "summary.json").write_text(json.dumps(plain(summary), indent=2) + "\n")
