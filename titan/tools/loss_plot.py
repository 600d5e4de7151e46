"""The comparison figure: train / validation loss against steps and against tokens, 2x2."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

# Figure + Agg canvas directly (no pyplot): no global backend switch, no display needed.
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from titan.tools.runs import Run

PANELS = [  # (records, y key, x key, title)
    ("train", "loss", "step", "train loss vs step"),
    ("train", "loss", "tokens_seen", "train loss vs tokens"),
    ("val", "val_loss", "step", "val loss vs step"),
    ("val", "val_loss", "tokens_seen", "val loss vs tokens"),
]


def plot(runs: list[Run], path: str | Path, labels: Optional[dict[str, str]] = None) -> Path:
    """Write the figure to `path` (PNG by its suffix); one line per run, labelled with
    `labels[run.name]` or the run's short name."""
    fig = Figure(figsize=(12, 8.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    for ax, (kind, y_key, x_key, title) in zip(axes.flat, PANELS):
        drawn = 0
        for run in runs:
            points = [
                (r[x_key], r[y_key])
                for r in getattr(run, kind)
                if r.get(x_key) is not None and r.get(y_key) is not None
            ]
            label = (labels or {}).get(run.name, run.name)
            if points:
                xs, ys = zip(*points)
                # Markers keep single-point validation series visible.
                ax.plot(xs, ys, label=label, marker="o" if len(points) < 30 else None, ms=3)
                drawn += 1
            else:  # keep colours aligned across panels
                ax.plot([], [], label=label)
        ax.set_title(title)
        ax.set_xlabel("tokens" if x_key == "tokens_seen" else "step")
        ax.set_ylabel(y_key)
        ax.grid(alpha=0.3)
        if not drawn:
            ax.text(0.5, 0.5, "no records", ha="center", va="center", transform=ax.transAxes)
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncols=min(3, max(1, len(names))),
               fontsize="small")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
