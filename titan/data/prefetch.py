"""Producing batches ahead of the step, in a background thread.

Tokenizing and packing run in a daemon thread that fills a bounded queue; the training loop
takes micro-batches from it. Most of a training step is spent in torch operators, which release
the GIL, so the thread's work overlaps with the step. Determinism is untouched: the thread
calls the same loader in the same order. The resumable state is that of the last micro-batch
the trainer *took*, not of the prefetcher's position: each queued batch carries the loader's
state right after it was produced.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Iterator

_END = object()


class Prefetcher:
    """Wraps a loader (`next_batch`, `state_dict`, `load_state_dict`); `depth` micro-batches ahead."""

    def __init__(self, loader, depth: int):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.loader = loader
        self.depth = depth
        self._state = loader.state_dict()
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __getattr__(self, name: str) -> Any:  # micro_batches_per_step, seq_len, ... of the loader
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    def _produce(self, out: queue.Queue, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                item = (self.loader.next_batch(), self.loader.state_dict())
            except StopIteration:
                item = _END
            except BaseException as e:  # handed to the consumer, raised in the training loop
                item = e
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item is _END or isinstance(item, BaseException):
                return

    def _start(self) -> None:
        self._queue, self._stop = queue.Queue(maxsize=self.depth), threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(self._queue, self._stop),
                                        name="titan-data-prefetch", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the thread; the queued batches are dropped (the state is the consumed one)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread, self._queue = None, None

    def next_batch(self):
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if item is _END:
            self.close()
            raise StopIteration
        if isinstance(item, BaseException):
            self.close()
            raise item
        batch, self._state = item
        return batch

    def __iter__(self) -> Iterator:
        while True:
            try:
                yield self.next_batch()
            except StopIteration:
                return

    def state_dict(self) -> dict[str, Any]:
        return dict(self._state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.close()
        self.loader.load_state_dict(state)
        self._state = self.loader.state_dict()
