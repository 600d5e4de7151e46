"""Build a W&B workspace comparing a sweep's (or a group's) runs.

    python -m titan.tools.dashboard multirun/2026-12-01/10-00-00_lr_scan
    python -m titan.tools.dashboard my-group --group-by optim.lr,parallel.name --project titan

Panels: loss and val_loss against tokens seen, grad norm, LR, skipped steps, tokens/s, MFU,
memory, and every downstream metric (eval/<task>/<metric>); runs filtered to the group,
grouped (and so coloured) by the config keys the sweep varied, and the runs table pinned to
those keys and the final metrics. A SWEEP_DIR gives the group (its runs' W&B group), the
project and the varied keys (from each run's `.hydra/overrides.yaml`); a GROUP name needs
--group-by. Without a W&B key (or with --offline) nothing is sent: the workspace spec is
written to a JSON file and the command that publishes it is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from titan.tools.runs import NoRunsError, find_runs
from titan.wandb_sink import NOISE_PREFIXES

TRAIN_PANELS = [
    ("Convergence", [("loss", "loss"), ("val_loss", "val_loss")]),
    ("Optimization", [("grad norm", "grad_norm"), ("learning rate", "lr"), ("skipped steps (spike guard)", "skipped_steps")]),
    ("Throughput and memory", [("tokens/s", "tokens_per_sec"), ("tokens/s per device", "tokens_per_sec_per_device"),
                               ("MFU", "mfu"), ("peak memory (GiB)", "memory_gib")]),
]
X_AXIS = "tokens_seen"
FINAL_COLUMNS = ["summary:val_loss", "summary:loss", "summary:final_val_loss", "summary:tokens_seen"]


def varied_keys(overrides_per_run: list[list[str]]) -> list[str]:
    """Override keys whose values differ between runs (e.g. optim.lr of an LR scan), in order."""
    values: dict[str, set] = {}
    for overrides in overrides_per_run:
        for o in overrides:
            key, _, value = o.lstrip("+~").partition("=")
            if not o.lstrip("+~").startswith(NOISE_PREFIXES):
                values.setdefault(key, set()).add(value)
    keys = [k for k, v in values.items() if len(v) > 1 or any(k not in _keys(o) for o in overrides_per_run)]
    # (a key set in some runs only varies too: the others ran its default)
    return sorted(keys, key=lambda k: list(values).index(k))


def _keys(overrides: list[str]) -> set[str]:
    return {o.lstrip("+~").partition("=")[0] for o in overrides}


def config_key(key: str) -> str:
    """A run-config key as W&B groups it: titan logs flat dotted keys (optim.lr), and a group
    choice (parallel=fsdp) under choices.<group>."""
    return key if "." in key else f"choices.{key}"


def build_workspace(name: str, entity: Optional[str], project: str, group: Optional[str], group_by: Sequence[str],
                    eval_metrics: Sequence[str]):
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    def line(title: str, metric: str):
        return wr.LinePlot(title=title, x=X_AXIS, y=[metric])

    sections = [ws.Section(name=title, panels=[line(t, m) for t, m in panels], is_open=True) for title, panels in TRAIN_PANELS]
    downstream = [line(m.removeprefix("eval/"), m) for m in eval_metrics]
    downstream.append(wr.LinePlot(title="all downstream metrics", x=X_AXIS, metric_regex="eval/.*"))
    sections.insert(1, ws.Section(name="Downstream evaluation", panels=downstream, is_open=True))
    keys = [config_key(k) for k in group_by]
    # Flat dotted keys: tell wandb_workspaces where W&B's ".value" envelope goes (at the end).
    groupby = [ws.Config(f"{k}.value") for k in keys]
    columns = [f"config:{k}.value" for k in keys] + FINAL_COLUMNS + [f"summary:{m}" for m in eval_metrics]
    return ws.Workspace(
        entity=entity or "", project=project, name=name, sections=sections,
        settings=ws.WorkspaceSettings(x_axis=X_AXIS, max_runs=100),
        runset_settings=ws.RunsetSettings(filters=[ws.Metric("Group") == group] if group else "", groupby=groupby,
                                          pinned_columns=columns),
    )


def spec_of(workspace) -> dict[str, Any]:
    """The workspace view as W&B stores it (what `save` would send)."""
    return workspace._to_model().model_dump(by_alias=True, exclude_none=True)


def _from_sweep_dir(path: Path) -> dict[str, Any]:
    runs = find_runs([path])
    groups = set()
    projects, entities, eval_metrics = set(), set(), []
    for run in runs:
        state = run.path / "wandb.json"
        if state.is_file():
            groups.add(json.loads(state.read_text()).get("group"))
        logging_cfg = run.config.get("logging") or {}
        projects.add(logging_cfg.get("project") or "titan")
        entities.add(logging_cfg.get("entity"))
        for record in _records(run.path):
            eval_metrics += [k for k in record if k.startswith("eval/") and k not in eval_metrics]
    group = next(iter(groups)) if len(groups) == 1 else None
    return {"group": group or path.name, "project": sorted(projects)[0], "entity": sorted(e or "" for e in entities)[0] or None,
            "group_by": varied_keys([r.overrides for r in runs]), "eval_metrics": eval_metrics, "runs": len(runs)}


def _records(run_dir: Path):
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            continue


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m titan.tools.dashboard", description=__doc__.split("\n\n")[0])
    parser.add_argument("target", help="a sweep dir (multirun/...) or a W&B group name")
    parser.add_argument("--group-by", default=None, help="comma-separated config keys (default: those the sweep varied)")
    parser.add_argument("--project", default=None)
    parser.add_argument("--entity", default=None)
    parser.add_argument("--name", default=None, help="workspace name (default: 'titan: <group>')")
    parser.add_argument("--out", default=None, help="spec file (default: SWEEP_DIR/wandb_workspace.json or ./wandb_workspace-<group>.json)")
    parser.add_argument("--offline", action="store_true", help="only write the spec, even with a W&B key")
    args = parser.parse_args(argv)

    target = Path(args.target)
    try:
        info = _from_sweep_dir(target) if target.is_dir() else {"group": args.target, "project": "titan", "entity": None,
                                                                "group_by": [], "eval_metrics": [], "runs": None}
    except NoRunsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    group_by = [k for k in (args.group_by or "").split(",") if k] or info["group_by"]
    project, entity = args.project or info["project"], args.entity or info["entity"]
    name = args.name or f"titan: {info['group']}"
    workspace = build_workspace(name, entity, project, info["group"], group_by, info["eval_metrics"])
    out = Path(args.out) if args.out else (target / "wandb_workspace.json" if target.is_dir() else Path(f"wandb_workspace-{info['group']}.json"))
    out.write_text(json.dumps({"group": info["group"], "group_by": group_by, "project": project, "entity": entity,
                               "spec": spec_of(workspace)}, indent=2) + "\n")
    print(f"workspace {name!r}: group {info['group']!r}, grouped by {', '.join(group_by) or 'nothing'}; spec written to {out}")
    if args.offline or not os.environ.get("WANDB_API_KEY"):
        sweep = f" {target}" if target.is_dir() else ""
        print("offline: nothing was sent. To publish it, upload the runs and create the workspace with a W&B key:\n"
              f"  wandb sync{sweep or ' RUN_DIR'}/**/wandb/offline-run-*\n"
              f"  WANDB_API_KEY=... python -m titan.tools.dashboard {args.target}" + (" --entity ENTITY" if not entity else ""))
        return 0
    if not entity:
        print("error: --entity is needed to publish (or set logging.entity in the runs)", file=sys.stderr)
        return 2
    workspace.save()
    print(f"published: {workspace.url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
