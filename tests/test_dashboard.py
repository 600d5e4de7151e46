"""W&B comparison: run config as flat dotted keys, and the workspace spec that
`python -m titan.tools.dashboard` builds for a sweep (checked offline, no network)."""

from __future__ import annotations

import json

import pytest

from titan.config.schema import TrainConfig
from titan.tools.dashboard import main as dashboard_main
from titan.tools.dashboard import varied_keys
from titan.wandb_sink import flat_config
from tests.helpers import run_titan


def test_run_config_is_flat_and_holds_the_choices():
    cfg = TrainConfig(choices={"model": "llama3_tiny", "parallel": "fsdp"}, overrides=["optim.lr=0.001"])
    flat = flat_config(cfg)
    assert flat["optim.lr"] == cfg.optim.lr and flat["choices.parallel"] == "fsdp"
    assert flat["training.spike_guard.sigmas"] == 6.0 and flat["eval.tasks"] == []
    assert not any(isinstance(v, dict) for v in flat.values()) and flat["overrides"] == "optim.lr=0.001"


def test_varied_keys_are_what_differs_between_runs():
    runs = [["optim.lr=1e-3", "model=llama3_tiny", "logging=wandb"], ["optim.lr=3e-3", "model=llama3_tiny", "logging=wandb"],
            ["optim.lr=3e-3", "model=llama3_tiny", "parallel=fsdp"]]
    assert varied_keys(runs) == ["optim.lr", "parallel"]


def test_group_name_needs_group_by_and_writes_a_spec(tmp_path, capsys):
    out = tmp_path / "ws.json"
    assert dashboard_main(["my-group", "--group-by", "optim.lr,parallel", "--offline", "--out", str(out)]) == 0
    spec = json.loads(out.read_text())
    run_set = spec["spec"]["spec"]["section"]["runSets"][0]
    assert [g["name"] for g in run_set["grouping"]] == ["optim.lr.value", "choices.parallel.value"]
    assert run_set["filters"]["filters"][0]["value"] == "my-group"
    assert "wandb sync" in capsys.readouterr().out


@pytest.mark.slow
def test_sweep_dashboard_spec_and_wandb_run_identity(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    for job, lr in enumerate(["1e-3", "3e-3"]):
        run_titan(sweep / str(job), f"optim.lr={lr}", "training.steps=3", "logging=wandb", "logging.group=lr-test",
                  env={"WANDB_API_KEY": ""}).check()
    state = json.loads((sweep / "1" / "wandb.json").read_text())
    assert "optim.lr=3e-3" in state["name"] and state["group"] == "lr-test"
    (wandb_file,) = (sweep / "1" / "wandb").glob("offline-run-*/run-*.wandb")
    blob = wandb_file.read_bytes()
    assert b"optim.lr" in blob and b"choices.model" in blob  # flat dotted keys in the run config

    assert dashboard_main([str(sweep)]) == 0
    printed = capsys.readouterr().out
    assert "grouped by optim.lr" in printed and "offline" in printed
    spec = json.loads((sweep / "wandb_workspace.json").read_text())
    assert spec["group"] == "lr-test" and spec["group_by"] == ["optim.lr"]
    view = spec["spec"]["spec"]["section"]
    panels = {p["config"].get("chartTitle"): p["config"] for s in view["panelBankConfig"]["sections"] for p in s["panels"]}
    for title, metric in [("loss", "loss"), ("val_loss", "val_loss"), ("grad norm", "grad_norm"), ("learning rate", "lr"),
                          ("tokens/s", "tokens_per_sec"), ("MFU", "mfu"), ("peak memory (GiB)", "memory_gib")]:
        assert panels[title]["metrics"] == [metric] and panels[title]["xAxis"] == "tokens_seen"
    assert any(p.get("metricRegex") == "eval/.*" for p in panels.values())
    run_set = view["runSets"][0]
    assert run_set["grouping"] == [{"section": "config", "name": "optim.lr.value"}]
    assert run_set["filters"]["filters"][0]["key"]["name"] == "group" and run_set["filters"]["filters"][0]["value"] == "lr-test"
    assert "config:optim.lr.value" in run_set["runFeed"]["columnPinned"] and "summary:val_loss" in run_set["runFeed"]["columnPinned"]
    assert view["settings"]["xAxis"] == "tokens_seen"
