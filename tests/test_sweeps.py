"""The sweep presets (sweeps/*.yaml) and launcher presets (conf/launcher/*.yaml).

They are composed with the real root config and checked by titan's own validation. The Hydra
multiruns here run `sweep_stub_task.py` instead of the trainer: same config handling, a run
dir like the trainer's, about a second a job. Running the real trainer on `+sweeps=tiny`
belongs with the trainer's end-to-end tests.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict

from titan.config.load import CONF_DIR, SWEEPS_DIR, register_schemas, to_typed
from titan.config.schema import Launcher, TrainConfig
from titan.tools.compare import differing_keys, find_runs, main as compare_main

SWEEPS = SWEEPS_DIR
STUB_TASK = Path(__file__).with_name("sweep_stub_task.py")
# name -> number of jobs its basic-sweeper grid launches (None: Optuna decides)
GRIDS = {"tiny": 2, "lr_scan": 6, "layouts": 4, "precision": 4, "optuna": None}


def needs(plugin: str) -> None:
    """The optional Hydra plugins (`pip install titan[sweeps]`)."""
    pytest.importorskip(f"hydra_plugins.{plugin}", reason=f"{plugin} is not installed")


@pytest.fixture(scope="module")
def conf() -> Path:
    register_schemas()  # `base_train`, the typed schema at the root of conf/train.yaml
    return CONF_DIR


def grid(name: str) -> list[list[str]]:
    """The override lists of every job a basic-sweeper preset launches."""
    params = OmegaConf.load(SWEEPS / f"{name}.yaml").hydra.sweeper.params
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    axes = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] for o in parsed]
    return [list(job) for job in itertools.product(*axes)]


def composed(conf: Path, overrides: list[str]) -> tuple[DictConfig, TrainConfig]:
    """(hydra node, typed job config), resolved as inside a Hydra job."""
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    hydra_config = HydraConfig.instance()
    hydra_config.set_config(cfg)  # for ${hydra:...} interpolations
    try:
        with open_dict(cfg):
            hydra_node = cfg.pop("hydra")
        return hydra_node, to_typed(cfg)
    finally:
        hydra_config.cfg = None  # leave no global Hydra state to other tests


def run_stub(conf: Path, *overrides: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(STUB_TASK), "-cp", str(conf), "-cn", "train", "-m", *overrides],
        capture_output=True, text=True, timeout=120,
        # This checkout's titan and plugin, whatever the installed one points at.
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(STUB_TASK.parents[1]), os.environ.get("PYTHONPATH")]))},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_sweep_file_is_a_global_preset_with_parseable_params(name: str) -> None:
    path = SWEEPS / f"{name}.yaml"
    assert path.read_text().splitlines()[0] == "# @package _global_"
    cfg = OmegaConf.load(path)
    sweep_dir = OmegaConf.to_container(cfg.hydra.sweep)["dir"]  # unresolved: ${now:} needs Hydra
    assert sweep_dir == f"multirun/${{now:%Y-%m-%d}}/${{now:%H-%M-%S}}_{name}"
    assert f"sweep:{name}" in cfg.logging.tags
    params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
    assert all(o.is_sweep_override() for o in OverridesParser.create().parse_overrides(params))
    if GRIDS[name] is not None:
        assert len(grid(name)) == GRIDS[name]


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_sweep_composes_against_the_schema(conf: Path, name: str) -> None:
    if name == "optuna":
        needs("hydra_optuna_sweeper")
    hydra_node, cfg = composed(conf, [f"+sweeps={name}"])
    assert hydra_node["runtime"]["choices"]["sweeps"] == name
    assert hydra_node["sweep"]["dir"].endswith(f"_{name}")
    assert cfg.training.global_batch_size % cfg.training.micro_batch_size == 0
    assert cfg.lr_schedule.warmup_steps < cfg.training.steps
    if name in ("tiny", "precision"):
        assert (cfg.model.dim, cfg.model.n_layers) == (64, 2)
    else:
        assert cfg.model.name == "llama3_debug"
    if name == "tiny":
        assert (cfg.training.steps, cfg.training.seq_len, cfg.logging.interval) == (10, 32, 1)
    if name == "optuna":
        sweeper = hydra_node["sweeper"]
        assert sweeper["_target_"].endswith("OptunaSweeper")
        assert sweeper["sampler"]["_target_"] == "optuna.samplers.TPESampler"
        assert sweeper["sampler"]["seed"] is not None and sweeper["direction"] == "minimize"
        # Trials must stay valid at the top of the warmup range.
        assert cfg.training.steps > 20


@pytest.mark.parametrize("name", [n for n in sorted(GRIDS) if GRIDS[n]] + ["optuna"])
def test_every_job_passes_titans_validation(conf: Path, name: str) -> None:
    from titan.config.validate import validate

    # Optuna: the corner of the search space most likely to be refused.
    jobs = grid(name) if GRIDS[name] else [["optim.lr=1e-2", "lr_schedule.warmup_steps=20",
                                            "optim.weight_decay=0.2"]]
    if name == "optuna":
        needs("hydra_optuna_sweeper")
    for job in jobs:
        _, cfg = composed(conf, [f"+sweeps={name}", *job])
        validate(cfg, cfg.parallel.nproc_per_node)
        if name == "layouts":  # one global batch for every layout
            assert cfg.training.global_batch_size == 8


def test_command_line_choice_beats_the_sweep_preset(conf: Path) -> None:
    _, cfg = composed(conf, ["+sweeps=precision", "model=llama3_debug", "logging=wandb"])
    assert cfg.model.dim == 256 and cfg.logging.backend.value == "wandb"
    assert cfg.logging.interval == 1  # the sweep's settings still apply on top of the preset


def test_slurm_launcher_runs_one_self_launching_task_per_node(conf: Path) -> None:
    needs("hydra_submitit_launcher")
    hydra_node, cfg = composed(conf, ["+launcher=slurm", "hydra.launcher.gpus_per_node=4"])
    launcher = hydra_node["launcher"]
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (launcher["nodes"], launcher["tasks_per_node"]) == (1, 1)
    assert cfg.parallel.nproc_per_node == 4 and cfg.parallel.launcher is Launcher.spawn
    hydra_node, cfg = composed(conf, ["+launcher=local"])
    assert hydra_node["launcher"]["_target_"].endswith("LocalLauncher")
    assert cfg.parallel.nproc_per_node == 1


def test_tiny_sweep_runs_and_compares(conf: Path, tmp_path: Path, capsys) -> None:
    sweep = tmp_path / "sweep"
    run_stub(conf, "+sweeps=tiny", f"hydra.sweep.dir={sweep}")
    runs = find_runs([sweep])
    assert [r.name for r in runs] == ["0", "1"]
    assert [r.config["optim"]["lr"] for r in runs] == [1e-3, 3e-3]
    assert runs[0].choices["model"] == "llama3_tiny" and len(runs[0].train) == 10
    assert differing_keys(runs) == ["optim.lr"]
    assert compare_main([str(sweep), "--reference", "0", "--rtol", "1e-3"]) == 1  # lr matters
    assert "optim.lr=0.003" in capsys.readouterr().out
    assert (sweep / "compare.png").stat().st_size > 0


@pytest.mark.slow  # optuna imports take seconds
def test_optuna_sweep_minimises_the_returned_value(conf: Path, tmp_path: Path) -> None:
    needs("hydra_optuna_sweeper")
    sweep = tmp_path / "sweep"
    run_stub(conf, "+sweeps=optuna", "hydra.sweeper.n_trials=4", f"hydra.sweep.dir={sweep}")
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 4
    # The seeded sampler's 4th trial lands above the stub's divergence lr: it fails, the
    # search goes on, and the best value comes from the trials that finished.
    failed = [j.name for j in jobs if not (j / "metrics.jsonl").exists()]
    assert failed == ["3"]
    runs = find_runs([sweep])
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["best_value"] == min(r.final_val_loss for r in runs)
    assert set(result["best_params"]) == {"optim.lr", "lr_schedule.warmup_steps",
                                          "optim.weight_decay"}
    lrs = [r.config["optim"]["lr"] for r in runs]
    assert len(set(lrs)) == 3 and all(1e-4 <= lr <= 1e-2 for lr in lrs)


@pytest.mark.slow  # one subprocess per job
def test_submitit_local_launcher_runs_the_sweep(conf: Path, tmp_path: Path) -> None:
    needs("hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    run_stub(conf, "+sweeps=tiny", "+launcher=local", f"hydra.sweep.dir={sweep}")
    assert (sweep / ".submitit").is_dir()
    summaries = [json.loads((sweep / str(j) / "summary.json").read_text()) for j in (0, 1)]
    assert [s["steps"] for s in summaries] == [10, 10]
