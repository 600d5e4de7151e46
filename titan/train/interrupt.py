"""Ctrl-C: stop cleanly after the current step, save a checkpoint, exit 130.

In a terminal, Ctrl-C sends SIGINT to the whole foreground process group: the launching
process and, under self-launch, every worker. Each process counts its Ctrl-Cs here:
- a rank: the first asks the training loop to stop before its next step (the ranks agree on
  when, see `stop_agreed`), which then saves a checkpoint when checkpointing is on; a second
  Ctrl-C raises KeyboardInterrupt at once, skipping that save;
- the launching process of self-launched workers waits for them to stop (a third Ctrl-C gives
  up on them: the elastic agent then terminates them).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Iterator

EXIT_CODE = 130  # the shell's code for a process ended by SIGINT
_count = 0


class Interrupted(Exception):
    """The run stopped because of Ctrl-C (the CLI exits 130)."""


def requested() -> bool:
    return _count > 0


def stop_agreed() -> bool:
    """True on every rank once any rank got Ctrl-C (a collective: call it at the same point on
    every rank)."""
    from titan.train.agree import any_rank

    return any_rank(requested())


def _say(text: str) -> None:
    os.write(2, text.encode())  # not logging: a signal handler may interrupt a logging call


def _rank_handler(signum, frame) -> None:
    global _count
    _count += 1
    if _count == 1:
        _say("\nCtrl-C: stopping before the next step (a checkpoint is saved when checkpointing is on); "
             "press Ctrl-C again to stop now without saving\n")
        return
    raise KeyboardInterrupt


def _launcher_handler(signum, frame) -> None:
    global _count
    _count += 1
    if _count >= 3:  # the workers did not stop after two Ctrl-Cs: let the agent end them
        raise KeyboardInterrupt


@contextlib.contextmanager
def _handling(handler) -> Iterator[None]:
    global _count
    _count = 0  # a new run (several run in one process under multirun)
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread: keep Python's default
        return
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def rank_handling() -> contextlib.AbstractContextManager:
    """Around one rank's life (build, train, save)."""
    return _handling(_rank_handler)


def launcher_handling() -> contextlib.AbstractContextManager:
    """Around the launching process's wait for its workers."""
    return _handling(_launcher_handler)
