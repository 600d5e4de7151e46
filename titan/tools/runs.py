"""Reading run directories: metrics.jsonl, summary.json and Hydra's `.hydra/` files.

A run dir is any directory holding a `metrics.jsonl`; a sweep dir is any directory with run dirs
somewhere below it. Nothing here needs torch, so the tools stay quick to start.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

METRICS_FILE = "metrics.jsonl"


class NoRunsError(ValueError):
    """A path given on the command line holds no run (no metrics.jsonl at or below it)."""


@dataclass
class Run:
    path: Path
    name: str  # shortest path suffix that tells this run apart from the others loaded with it
    train: list[dict[str, Any]]  # training records, one per step, sorted by step
    val: list[dict[str, Any]]  # validation records, one per step, sorted by step
    config: dict[str, Any] = field(default_factory=dict)  # .hydra/config.yaml, unresolved
    choices: dict[str, Any] = field(default_factory=dict)  # hydra.runtime.choices
    overrides: list[str] = field(default_factory=list)  # .hydra/overrides.yaml
    summary: dict[str, Any] = field(default_factory=dict)  # summary.json ({} while running)
    skipped_lines: int = 0  # unparsable lines (a crash can leave a truncated last line)

    def series(self, key: str) -> dict[int, float]:
        """step -> value of `key`, from whichever record kind carries it."""
        records = self.val if key.startswith("val_") else self.train
        return {r["step"]: float(r[key]) for r in records if r.get(key) is not None}

    # Headline numbers: summary.json when the run finished (it sees every step, while
    # metrics.jsonl only holds every `logging.interval`-th), else the records.
    @property
    def final_loss(self) -> Optional[float]:
        return self.summary.get("final_loss", self.train[-1]["loss"] if self.train else None)

    @property
    def min_loss(self) -> Optional[float]:
        if "min_loss" in self.summary:
            return self.summary["min_loss"]
        losses = [r["loss"] for r in self.train if _finite(r.get("loss"))]
        return min(losses) if losses else None

    @property
    def final_val_loss(self) -> Optional[float]:
        return self.summary.get("final_val_loss", self.val[-1]["val_loss"] if self.val else None)

    @property
    def steps(self) -> int:
        last = max([r["step"] for r in self.train + self.val], default=0)
        return int(self.summary.get("steps") or last)

    def mean(self, key: str) -> Optional[float]:
        """Mean of a throughput metric over training records, skipping the first record when
        there are others: it carries warm-up and compilation time."""
        records = self.train[1:] if len(self.train) > 1 else self.train
        values = [r[key] for r in records if _finite(r.get(key))]
        return sum(values) / len(values) if values else None


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def read_metrics(path: Path) -> tuple[list[dict], list[dict], int]:
    """(train, val, skipped) from a metrics.jsonl. A resumed run appends records for steps it
    already logged; the later record wins, as it belongs to the run that continued."""
    train: dict[int, dict] = {}
    val: dict[int, dict] = {}
    skipped = 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            skipped += 1
            continue
        if "loss" in record:
            train[step] = record
        if "val_loss" in record:
            val[step] = record
    return [train[s] for s in sorted(train)], [val[s] for s in sorted(val)], skipped


def _read_yaml(path: Path) -> Any:
    # Hydra writes its configs unresolved (`${...}` stays a string): plain YAML reads them as is.
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def load_run(path: str | Path, name: Optional[str] = None) -> Run:
    path = Path(path)
    metrics = path / METRICS_FILE
    if not metrics.is_file():
        raise NoRunsError(f"{path}: not a run directory (no {METRICS_FILE})")
    train, val, skipped = read_metrics(metrics)
    hydra_dir = path / ".hydra"
    hydra_cfg = _read_yaml(hydra_dir / "hydra.yaml") or {}
    choices = (hydra_cfg.get("hydra") or {}).get("runtime", {}).get("choices") or {}
    summary_file = path / "summary.json"
    return Run(
        path=path,
        name=name or path.name,
        train=train,
        val=val,
        config=_read_yaml(hydra_dir / "config.yaml") or {},
        choices=dict(choices),
        overrides=list(_read_yaml(hydra_dir / "overrides.yaml") or []),
        summary=json.loads(summary_file.read_text()) if summary_file.is_file() else {},
        skipped_lines=skipped,
    )


def _natural_key(path: Path) -> list:
    # Job dirs are numbered: 2 before 10.
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Every run dir at or below each path, in order, without duplicates."""
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise NoRunsError(f"{p}: no such file or directory")
        if p.is_file() and p.name == METRICS_FILE:
            p = p.parent
        if (p / METRICS_FILE).is_file():
            runs = [p]
        else:
            runs = sorted((m.parent for m in p.rglob(METRICS_FILE)), key=_natural_key)
        if not runs:
            raise NoRunsError(
                f"{p}: no runs found (expected a run dir with {METRICS_FILE}, "
                "or a sweep dir with run dirs below it)"
            )
        found += [r for r in runs if r.resolve() not in {f.resolve() for f in found}]
    return found


def short_names(paths: list[Path]) -> list[str]:
    """The shortest trailing path parts that keep every name distinct: a sweep's job dirs come
    out as `0`, `1`, ...; jobs from two sweeps as `<time>_<sweep>/0`, and so on."""
    parts = [p.resolve().parts for p in paths]
    longest = max((len(p) for p in parts), default=0)
    for k in range(1, longest + 1):
        names = ["/".join(p[-k:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]  # the same dir twice: find_run_dirs prevents it


def find_runs(paths: Iterable[str | Path]) -> list[Run]:
    dirs = find_run_dirs(paths)
    return [load_run(d, n) for d, n in zip(dirs, short_names(dirs))]
