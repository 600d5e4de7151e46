"""One rank's life: set up, train, write the summary, tear down. Importable (not __main__)
so that spawned workers can find it."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

from titan.config.schema import TrainConfig
from titan.train import interrupt
from titan.train.env import setup_rank, teardown_rank


def _configure_logging(rank: int) -> None:
    """Rank 0 logs to the console (and, via Hydra or the launcher, to the run dir); other ranks
    log warnings only: their full output is in logs/."""
    # DTensor notes once per 2-D mesh that a norm takes two all-reduces: known, and harmless.
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    logger = logging.getLogger("titan")
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    if logging.getLogger().handlers:  # in the Hydra process: its console + run-dir log file
        return
    if not logger.handlers:  # a spawned worker: the launcher captures stdout into logs/
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False


class RankUserError(Exception):
    """A spawned rank's user error (bad config, unreadable checkpoint, ...), raised from the
    original so that the rank's error file keeps the whole traceback; its text is the one line
    the launching process prints, then the exit status (`titan.train.launch._worker_failed`)."""

    CODE_SEPARATOR = " |exit "

    @classmethod
    def of(cls, error: Exception) -> "RankUserError":
        from titan.config.errors import ConfigError

        config = isinstance(error, ConfigError)
        line = f"{'config error' if config else 'error'}: {error}".replace("\n", " ")
        return cls(f"{line}{cls.CODE_SEPARATOR}{2 if config else 1}")


def _user_errors() -> tuple[type, ...]:
    from titan.checkpoint import CheckpointError
    from titan.config.errors import ConfigError
    from titan.interop.errors import ConversionError
    from titan.profiling import NonFiniteLoss

    return ConfigError, CheckpointError, ConversionError, NonFiniteLoss


def run_worker(cfg: TrainConfig) -> Optional[float]:
    try:
        with interrupt.rank_handling():
            return _run(cfg)
    except _user_errors() as e:
        if "TORCHELASTIC_RUN_ID" not in os.environ:
            raise  # in the CLI's process: it prints the one line itself
        raise RankUserError.of(e) from e
    except KeyboardInterrupt:
        if "TORCHELASTIC_RUN_ID" not in os.environ:
            raise  # in the CLI's process: it reports the interrupt
        # A spawned worker: end quietly (the launching process reports the interrupt).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(interrupt.EXIT_CODE)


def _run(cfg: TrainConfig) -> Optional[float]:
    from titan.checkpoint import complete_checkpoints
    from titan.metrics import write_summary
    from titan.train.summary import next_commands
    from titan.train.trainer import Trainer

    env = setup_rank(cfg)
    _configure_logging(env.rank)
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    # On failure the exception ends this process; no barrier, which would hang the other ranks.
    trainer = Trainer(cfg, env)
    if cfg.checkpoint.create_seed:
        trainer.save_seed()
        teardown_rank()
        return None
    summary = trainer.fit()
    if env.is_main:
        write_summary(cfg.run_dir, summary)
        val = summary["final_val_loss"]
        logging.getLogger("titan").info(
            "done: %d steps, final loss %.4f, val_loss %s, run dir %s",
            summary["steps"],
            summary["final_loss"] if summary["final_loss"] is not None else float("nan"),
            f"{val:.4f}" if val is not None else "n/a",
            cfg.run_dir,
        )
        saved = bool(complete_checkpoints(Path(cfg.run_dir) / "checkpoints"))
        logging.getLogger("titan").info(next_commands(cfg, saved))
    teardown_rank()
    return summary["final_val_loss"]
