"""Compare runs and sweeps: a summary table, a loss figure, and an optional agreement check.

    python -m titan.tools.compare RUN_OR_SWEEP_DIR [...] [--out PLOT.png] [--no-plot]
        [--reference RUN --rtol X [--atol Y] [--key loss] [--no-val]] [--ignore KEY ...]

Every directory at or below the given paths that holds a `metrics.jsonl` is one run. The figure
goes to `--out`, by default `compare.png` inside the first path given (a sweep's plot lands in
its sweep dir). With `--reference`, every other run must match the reference's `--key` (and,
for the default `loss`, also `val_loss` when both have it, unless `--no-val`) on their common
steps; the exit status is 1 when any run diverges or shares no step with the reference, so CI
can gate on it.
Exit status 2: bad arguments or a path with no runs.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import yaml

from titan.tools.agreement import Agreement, check_agreement, format_agreement
from titan.tools.loss_plot import plot
from titan.tools.runs import (
    NoRunsError,
    Run,
    find_run_dirs,
    find_runs,
    load_run,
    short_names,
)

__all__ = [
    "Run",
    "load_run",
    "find_runs",
    "differing_keys",
    "check_agreement",
    "plot",
    "format_table",
    "main",
]

# Keys that differ between runs without making them different experiments. Seeds stay: they do.
NOISE_KEYS = (
    "hydra",
    "run_dir",
    "choices",
    "overrides",
    "sweep_name",
    "logging.name",
    "logging.group",
    "logging.tags",
)
_MISSING = "-"  # shown for a key a run does not have


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {dotted.key: leaf}. Lists stay whole: they are one setting."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """Hydra override strings -> {key: value}; for runs without a `.hydra/config.yaml`."""
    parsed = {}
    for item in overrides:
        key, sep, value = item.lstrip("+~").partition("=")
        if sep:
            try:
                parsed[key] = yaml.safe_load(value)
            except yaml.YAMLError:
                parsed[key] = value
    return parsed


def settings(run: Run) -> dict[str, Any]:
    """The run's settings as dotted keys, plus its config-group choices under the group name
    (`parallel` -> `fsdp`)."""
    flat = flatten(run.config) if run.config else parse_overrides(run.overrides)
    groups = {g: c for g, c in run.choices.items() if not g.startswith("hydra/")}
    return {**flat, **groups}


def _is_noise(key: str, ignore: Sequence[str]) -> bool:
    return any(key == n or key.startswith(n + ".") for n in ignore)


def differing_keys(runs: Sequence[Run], ignore: Sequence[str] = NOISE_KEYS) -> list[str]:
    """Setting keys whose values are not the same in every run, sorted; groups first.

    When a group's choice differs (`parallel: ddp` vs `fsdp`) only the group is reported, not
    each key below it that the preset changed."""
    if len(runs) < 2:
        return []
    views = [settings(r) for r in runs]
    groups = {g for r in runs for g in r.choices if not g.startswith("hydra/")}

    def differs(key: str) -> bool:
        return len({repr(v.get(key, _MISSING)) for v in views}) > 1

    keys = sorted({k for v in views for k in v if not _is_noise(k, ignore)})
    changed_groups = [k for k in keys if k in groups and differs(k)]
    return changed_groups + [
        k
        for k in keys
        if k not in groups
        and not any(k.startswith(g + ".") for g in changed_groups)
        and differs(k)
    ]


def describe(run: Run, keys: Sequence[str]) -> str:
    """`k=v, k=v` for the given keys, as this run has them."""
    view = settings(run)
    return ", ".join(f"{k}={view.get(k, _MISSING)}" for k in keys)


def _fmt(value: Optional[float], spec: str) -> str:
    if value is None:
        return _MISSING
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return format(value, spec)


def format_table(runs: Sequence[Run], keys: Optional[Sequence[str]] = None) -> str:
    """One line per run: losses, steps, throughput and what differs from the others."""
    keys = differing_keys(runs) if keys is None else keys
    header = ["run", "final loss", "min loss", "final val", "steps", "tokens/s", "MFU", "differs"]
    rows = [header]
    for run in runs:
        mfu = run.mean("mfu")
        rows.append([
            run.name,
            _fmt(run.final_loss, ".4f"),
            _fmt(run.min_loss, ".4f"),
            _fmt(run.final_val_loss, ".4f"),
            str(run.steps),
            _fmt(run.mean("tokens_per_sec"), ",.0f"),
            _fmt(None if mfu is None else 100 * mfu, ".2f") + ("%" if mfu is not None else ""),
            describe(run, keys) if keys else "",
        ])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    lines = []
    for row in rows:
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells + [row[-1]]).rstrip())
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(lines)


def _load(paths: Sequence[str], reference: Optional[str]) -> tuple[list[Run], Optional[Run]]:
    """Runs under `paths`, plus the reference: a run dir (added when not among them) or the
    short name of one of them."""
    dirs = find_run_dirs(paths)
    ref_dir = None
    if reference is not None and (Path(reference) / "metrics.jsonl").is_file():
        ref_dir = Path(reference)
        if ref_dir.resolve() not in {d.resolve() for d in dirs}:
            dirs.insert(0, ref_dir)
    runs = [load_run(d, n) for d, n in zip(dirs, short_names(dirs))]
    if reference is None:
        return runs, None
    if ref_dir is not None:
        return runs, next(r for r in runs if r.path.resolve() == ref_dir.resolve())
    matches = [r for r in runs if r.name == reference or r.name.endswith("/" + reference)]
    if len(matches) != 1:
        names = ", ".join(r.name for r in runs)
        what = "matches several runs" if matches else "is neither a run dir nor a run's name"
        raise NoRunsError(f"--reference {reference!r} {what} (runs: {names})")
    return runs, matches[0]


def _agreements(
    runs: list[Run], ref: Run, key: str, rtol: float, atol: float, with_val: bool = True
) -> list[Agreement]:
    results = check_agreement(runs, ref, key, rtol, atol)
    # The default check also covers validation loss, where both sides logged any.
    if with_val and key == "loss" and ref.val:
        results += [
            a
            for a in check_agreement([r for r in runs if r.val], ref, "val_loss", rtol, atol)
            if a.common_steps
        ]
    return results


def _labels(runs: Sequence[Run], keys: Sequence[str], limit: int = 70) -> dict[str, str]:
    """Legend entries: the short name, and what differs when that fits."""
    labels = {}
    for run in runs:
        label = f"{run.name}: {describe(run, keys)}" if keys else run.name
        labels[run.name] = label if len(label) <= limit else label[: limit - 3] + "..."
    return labels


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m titan.tools.compare",
        description="Compare titan runs: summary table, loss plot, optional agreement check.",
    )
    p.add_argument("paths", nargs="+", help="run dirs or sweep dirs (searched recursively)")
    p.add_argument("--out", help="figure path (default: compare.png in the first path)")
    p.add_argument("--no-plot", action="store_true", help="skip the figure")
    p.add_argument("--reference", help="run dir or run name every other run must agree with")
    p.add_argument("--rtol", type=float, default=1e-3, help="relative tolerance (default 1e-3)")
    p.add_argument("--atol", type=float, default=0.0, help="absolute tolerance (default 0)")
    p.add_argument("--key", default="loss", help="metric to check (default loss; + val_loss)")
    p.add_argument("--no-val", action="store_true", help="with --key loss: skip val_loss")
    p.add_argument("--ignore", action="append", default=[], metavar="KEY",
                   help="setting key (or prefix) to leave out of 'differs'; repeatable")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        runs, ref = _load(args.paths, args.reference)
    except NoRunsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    keys = differing_keys(runs, NOISE_KEYS + tuple(args.ignore))
    print(format_table(runs, keys))
    for run in runs:
        if run.skipped_lines:
            print(f"warning: {run.name}: skipped {run.skipped_lines} unreadable metrics line(s)")
    if not args.no_plot:
        first = Path(args.paths[0])
        out = Path(args.out) if args.out else (first if first.is_dir() else first.parent)
        out = out / "compare.png" if out.is_dir() else out
        print(f"figure: {plot(runs, out, _labels(runs, keys))}")
    if ref is None:
        return 0
    results = _agreements(runs, ref, args.key, args.rtol, args.atol, not args.no_val)
    print(format_agreement(results, ref, args.rtol, args.atol))
    if not results:
        print("error: no other run to check against the reference", file=sys.stderr)
        return 1
    return 0 if all(a.ok for a in results) else 1


if __name__ == "__main__":
    sys.exit(main())
