"""Which accelerator runtime a torch build targets, and the per-GPU peaks MFU divides by."""

from __future__ import annotations

import pytest
import torch

from titan.metrics import Throughput, gpu_peak_flops, measure_cpu_peak_flops, peak_flops
from titan.train.env import accelerator_runtime


@pytest.mark.parametrize("name,tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H200", 989),
    ("NVIDIA A100-SXM4-80GB", 312), ("AMD Instinct MI300X", 1307), ("AMD Instinct MI325X", 1307),
    ("AMD Instinct MI250X/MI250", 383), ("AMD Instinct MI355X", 2516),
])
def test_gpu_peak_table(name, tflops):
    assert gpu_peak_flops(name) == tflops * 1e12


def test_unknown_gpu_has_no_peak_and_cpu_peak_is_measured():
    assert gpu_peak_flops("Some Future GPU") is None
    assert peak_flops(torch.device("cpu"), 2.5) == 2.5e12  # logging.peak_tflops wins
    assert 1e8 < peak_flops(torch.device("cpu")) < 1e14  # a real fp32 matmul measurement


def test_accelerator_runtime_names_this_build():
    runtime = accelerator_runtime()
    if torch.version.hip:
        assert runtime.startswith("ROCm")
    elif torch.version.cuda and torch.cuda.is_available():
        assert runtime.startswith("CUDA")
    else:
        assert runtime == "CPU"


def test_cpu_mfu_never_exceeds_100_percent_when_the_first_peak_was_measured_under_load():
    """A peak measured while the machine was busy (here: 1 GFLOP/s, far below any real fp32
    matmul) is measured again when a step beats it, and MFU is then a true fraction."""
    remeasured = []

    def remeasure() -> float:
        remeasured.append(measure_cpu_peak_flops())
        return remeasured[-1]

    meter = Throughput(flops_per_token=1e6, world_size=1, peak_flops_per_device=1e3, remeasure_peak=remeasure)
    meter.add(tokens=10_000, data_time=0.0, step_time=0.01)  # 1e12 FLOP/s achieved: beats both peaks
    first = meter.measure()
    assert len(remeasured) == 1 and first["mfu"] <= 1.0 and first["peak_tflops"] >= 1.0
    meter.add(tokens=10, data_time=0.0, step_time=1.0)  # 1e7 FLOP/s: below the raised peak, no re-measure
    second = meter.measure()
    assert len(remeasured) == 1 and 0 < second["mfu"] < 1e-4
    fixed = Throughput(1e6, 1, 1e3)  # a configured or table peak is the vendor's: never replaced
    fixed.add(10, 0.0, 1.0)
    assert fixed.measure()["mfu"] == 1e7 / 1e3
    assert Throughput.for_device(1.0, 1, torch.device("cpu")).remeasure_peak is measure_cpu_peak_flops
    assert Throughput.for_device(1.0, 1, torch.device("cpu"), 2.5).remeasure_peak is None
