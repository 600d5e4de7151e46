"""Loss-spike guard (`training.spike_guard`): skip the update of a step whose loss or gradient
norm is far above its recent window.

A spike is a value above mean + `sigmas` x std of the last `window` accepted steps. Skipped
values do not enter the window, so one spike cannot widen the band for the next. A real change
of level is not a spike: after `max_consecutive` skips in a row the step is taken (and the
window restarts from it). The guard waits for `min_history` accepted steps before judging.

Every rank sees the same global loss and grad norm, so every rank decides alike without a
collective. The window lives in memory: after a resume it refills before the guard acts again.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from typing import Optional

from titan.config.schema import SpikeGuardConfig

log = logging.getLogger("titan")


class RollingStats:
    """Mean and (population) standard deviation of the last `size` values."""

    def __init__(self, size: int):
        self.values: deque[float] = deque(maxlen=size)

    def __len__(self) -> int:
        return len(self.values)

    def add(self, value: float) -> None:
        self.values.append(value)

    def clear(self) -> None:
        self.values.clear()

    def threshold(self, sigmas: float) -> float:
        n = len(self.values)
        mean = sum(self.values) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in self.values) / n)
        return mean + sigmas * std


class SpikeGuard:
    def __init__(self, cfg: SpikeGuardConfig):
        self.cfg = cfg
        self.windows = {"loss": RollingStats(cfg.window), "grad_norm": RollingStats(cfg.window)}
        self.skipped = 0  # steps whose update was skipped, over this process's life
        self.consecutive = 0

    def spike(self, values: dict[str, float]) -> Optional[str]:
        """Why these values are a spike ('loss 9.1 > 4.3 (mean + 6 std of 50 steps)'), or None."""
        for key in self.cfg.watch:
            window, value = self.windows[key], values[key]
            if len(window) < max(self.cfg.min_history, 2):
                continue
            limit = window.threshold(self.cfg.sigmas)
            if value > limit:
                return f"{key} {value:.4g} > {limit:.4g} (mean + {self.cfg.sigmas:g} std of the last {len(window)} steps)"
        return None

    def should_skip(self, step: int, loss: float, grad_norm: float) -> bool:
        """Judge one step (call once per step, with finite values) and remember it if accepted."""
        if not self.cfg.enabled or not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return False  # non-finite values are profiling.nan_check's business
        values = {"loss": loss, "grad_norm": grad_norm}
        reason = self.spike(values)
        if reason is not None and self.consecutive < self.cfg.max_consecutive:
            self.skipped += 1
            self.consecutive += 1
            log.warning("step %d: %s: update skipped (training.spike_guard; %d skipped so far)", step, reason, self.skipped)
            return True
        if reason is not None:  # the level moved for good: accept it and judge from here on
            log.warning("step %d: %s, %d spikes in a row: accepted as the new level (training.spike_guard)", step, reason, self.consecutive)
            for window in self.windows.values():
                window.clear()
        self.consecutive = 0
        for key, window in self.windows.items():
            window.add(values[key])
        return False
