"""The Hydra entry point: compose -> typed config -> validate -> launch.

Config errors exit with status 2 and one line on stderr naming the key (no traceback),
whether Hydra finds them while composing or titan finds them while validating.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from titan.config.errors import ConfigError
from titan.config.load import CONF_DIR, register_schemas, to_typed
from titan.config.schema import Launcher, TrainConfig
from titan.config.validate import validate
from titan.train.env import env_world_size, launched_by_env
from titan.train.help import register_help_resolver

_task_started = False


def typed_config(cfg: DictConfig) -> TrainConfig:
    """Typed config with what only Hydra knows filled in: run dir, group choices, overrides."""
    typed = to_typed(cfg)
    hc = HydraConfig.get()
    typed.run_dir = hc.runtime.output_dir
    typed.choices = {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra") and v is not None}
    typed.overrides = list(hc.overrides.task)
    if hc.mode is not None and hc.mode.name == "MULTIRUN":
        typed.sweep_name = os.path.basename(os.path.normpath(hc.sweep.dir))
    return typed


def world_size_for(cfg: TrainConfig) -> int:
    if cfg.parallel.launcher is not Launcher.spawn and launched_by_env():
        return env_world_size()
    return cfg.parallel.nproc_per_node


def _fail(message: str, code: int) -> None:
    """One message, no traceback. In a sweep, raise instead: exiting would end the other jobs."""
    if HydraConfig.get().mode.name == "MULTIRUN":
        raise RuntimeError(message) from None
    print(message, file=sys.stderr)
    sys.exit(code)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def _hydra_main(cfg: DictConfig) -> Optional[float]:
    global _task_started
    _task_started = True
    from titan.checkpoint import CheckpointError
    from titan.interop.errors import ConversionError
    from titan.profiling import NonFiniteLoss
    from titan.train.interrupt import EXIT_CODE as EXIT_INTERRUPTED
    from titan.train.interrupt import Interrupted
    from titan.train.launch import WorkerFailed, launch

    try:
        typed = typed_config(cfg)
        validate(typed, world_size_for(typed))
        if typed.training.dry_run:
            from titan.train.dry_run import dry_run

            dry_run(typed)
            return None
        return launch(typed)
    except ConfigError as e:
        _fail(f"config error: {e}", 2)
    except WorkerFailed as e:  # a spawned rank's error: its own line and status
        _fail(e.line, e.exit_code)
    except (CheckpointError, ConversionError, NonFiniteLoss) as e:
        _fail(f"error: {e}", 1)
    except Interrupted as e:
        _fail(f"interrupted: {e}", EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        _fail("interrupted: stopped by Ctrl-C (nothing saved at this point)", EXIT_INTERRUPTED)
    return None


def _pin_run_dir_under_launcher() -> None:
    """Under torchrun/srun every rank runs this CLI: give them one run dir (from the job id)
    and let only rank 0 write Hydra's outputs, so ranks never race on `.hydra/`."""
    if not launched_by_env() or any(a.startswith("hydra.run.dir=") for a in sys.argv):
        return
    job = os.environ.get("TITAN_RUN_ID") or os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID", "local")
    sys.argv.append(f"hydra.run.dir=outputs/{job}")
    if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0))) != 0:
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]


def _check_run_dir() -> None:
    """Hydra creates the run dir before our task runs, and fails there with a traceback:
    check it first (the literal part of hydra.run.dir, or ./outputs by default)."""
    if {"-m", "--multirun"} & set(sys.argv):
        return
    value = next((a.split("=", 1)[1] for a in reversed(sys.argv) if a.startswith("hydra.run.dir=")), "outputs")
    path = Path(value.split("${")[0] or ".").expanduser().absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        problem = f"{existing} is not a directory"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{existing} is not writable"
    else:
        return
    print(f"config error: hydra.run.dir: cannot create the run directory {path} ({problem}); "
          "choose another hydra.run.dir=PATH", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    register_schemas()
    _check_run_dir()
    register_help_resolver()
    if launched_by_env() and {"-m", "--multirun"} & set(sys.argv):
        print("config error: -m/--multirun under torchrun or srun would run the whole sweep on every rank; "
              "run the sweep without torchrun (each job self-launches its workers)", file=sys.stderr)
        sys.exit(2)
    _pin_run_dir_under_launcher()
    try:
        _hydra_main()
    except SystemExit as e:
        # Hydra reports a composition error (bad override, wrong type, unknown preset) by
        # printing it and exiting 1 before our task runs: that is a config error too.
        if e.code == 1 and not _task_started:
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
