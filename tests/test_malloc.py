"""titan.train.malloc: freed step memory is reused without page faults; the environment wins.

Each case runs in a fresh interpreter: malloc settings are process-wide."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Allocate, touch and free a 48 MiB buffer (an activation-sized block, above glibc's 32 MiB
# dynamic mmap cap) like a training step does, 24 rounds to settle (torch's 64-byte aligned
# allocations can take up to ~12 rounds to find a reusable chunk: measured 1-11 over 15 runs,
# 6 was too few on CI), then 8 counted rounds; print whether the tuning applied and the page
# faults of the counted rounds.
PROBE = """
import resource, sys, torch
from titan.train.malloc import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "tuned" else False
for _ in range(24):
    torch.ones(12 * 2**20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    torch.ones(12 * 2**20)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
BLOCK = 48 * 2**20 // 4096  # page faults of one fresh 48 MiB block
PAGES = 8 * BLOCK  # faults if every counted round maps fresh pages


def probe(mode: str, **env: str) -> tuple[bool, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env={**clean, **env}, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt and page-fault counts: Linux")
def test_freed_buffers_are_reused_without_page_faults_unless_the_environment_tunes_malloc():
    applied, tuned = probe("tuned")
    _, default = probe("default")
    # Tuned: settled, at most a fresh block in all; glibc's default maps and faults in every round.
    assert applied and tuned <= BLOCK < PAGES // 2 < default
    applied, faults = probe("tuned", MALLOC_TRIM_THRESHOLD_="131072")
    assert not applied and faults > PAGES // 2  # the user's setting is left alone
