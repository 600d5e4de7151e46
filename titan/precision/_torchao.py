"""Quiet, lazy access to torchao.

torchao is imported only when a low-precision recipe is chosen: importing it costs ~3 s and
logs warnings about CUDA-only extensions it cannot load on a CPU machine, noise that says
nothing about the run.
"""

from __future__ import annotations

import contextlib
import logging


@contextlib.contextmanager
def quiet_torchao_import():
    """Silence torchao's 'Failed to load <cuda extension>' warnings while it is imported."""
    ao_log = logging.getLogger("torchao")
    previous = ao_log.level
    ao_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        ao_log.setLevel(previous)
