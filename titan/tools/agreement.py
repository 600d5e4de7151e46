"""Step-by-step numerical agreement of one metric between runs and a reference run.

Used to prove that two set-ups train alike (parallel layouts, precisions, a resumed run), in CI
or by hand. Tolerance follows numpy's isclose: |x - ref| <= atol + rtol * |ref|.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

from titan.tools.runs import Run


@dataclass
class Agreement:
    run: str  # short name of the run checked
    key: str  # metric compared, e.g. "loss"
    common_steps: int  # steps present in both the run and the reference
    max_rel_dev: float  # max |x - ref| / |ref| over the common steps; nan when there are none
    first_bad_step: Optional[int]  # first step outside the tolerance
    ok: bool
    note: str = ""


def _rel_dev(x: float, ref: float) -> float:
    if math.isnan(x) or math.isnan(ref):
        return math.inf
    diff = abs(x - ref)
    return diff / abs(ref) if ref != 0 else (0.0 if diff == 0 else math.inf)


def compare_series(
    name: str, key: str, series: dict[int, float], ref: dict[int, float], rtol: float, atol: float
) -> Agreement:
    common = sorted(set(series) & set(ref))
    if not common:
        return Agreement(name, key, 0, math.nan, None, False, "no common steps")
    max_dev, first_bad = 0.0, None
    for step in common:
        x, r = series[step], ref[step]
        max_dev = max(max_dev, _rel_dev(x, r))
        # Written so that a NaN on either side fails the comparison.
        if first_bad is None and not abs(x - r) <= atol + rtol * abs(r):
            first_bad = step
    return Agreement(name, key, len(common), max_dev, first_bad, first_bad is None)


def check_agreement(
    runs: Iterable[Run], reference: Run, key: str = "loss", rtol: float = 1e-3, atol: float = 0.0
) -> list[Agreement]:
    """One Agreement per run other than the reference, on the steps both logged `key` at."""
    ref = reference.series(key)
    others = [r for r in runs if r.path.resolve() != reference.path.resolve()]
    return [compare_series(r.name, key, r.series(key), ref, rtol, atol) for r in others]


def format_agreement(results: list[Agreement], reference: Run, rtol: float, atol: float) -> str:
    lines = [f"agreement with {reference.name} (rtol={rtol:g}, atol={atol:g}):"]
    width = max((len(a.run) for a in results), default=3)
    for a in results:
        if a.common_steps == 0:
            verdict = f"FAIL: {a.note}"
        elif a.ok:
            verdict = "ok"
        else:
            verdict = f"DIVERGES from step {a.first_bad_step}"
        dev = "-" if math.isnan(a.max_rel_dev) else f"{a.max_rel_dev:.3e}"
        lines.append(
            f"  {a.run:<{width}}  {a.key:<9} {a.common_steps:>6} common steps  "
            f"max rel dev {dev:>9}  {verdict}"
        )
    return "\n".join(lines)
