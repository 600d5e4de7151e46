"""Which accelerator runtime a torch build targets, and the per-GPU peaks MFU divides by."""

from __future__ import annotations

import pytest
import torch

from titan.metrics import gpu_peak_flops, peak_flops
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
