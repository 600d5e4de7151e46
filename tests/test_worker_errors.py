"""A user error that only a spawned rank can find ends a multi-process run with one line naming
the problem and the rank's error file, and the exit status it would have in one process.
(The run through the CLI: tests/test_multiprocess.py::test_failing_rank_ends_the_job_with_its_error.)"""

from __future__ import annotations

from titan.config.errors import ConfigError
from titan.train.launch import _worker_failed
from titan.train.worker import RankUserError


def test_a_config_error_raised_in_a_rank_keeps_exit_status_2(tmp_path, monkeypatch):
    """What the launching process makes of the error file torch's elastic `record` writes."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ErrorHandler, ProcessFailure

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    try:
        raise RankUserError.of(ConfigError("model.vocab_size", "too small\nfor the tokenizer"))
    except RankUserError as e:
        ErrorHandler().record_exception(e)
    crash = ProcessFailure(local_rank=0, pid=1, exitcode=1, error_file=str(tmp_path / "none.json"))
    user = ProcessFailure(local_rank=1, pid=2, exitcode=1, error_file=str(error_file))
    failed = _worker_failed(ChildFailedError("run_worker", {0: crash, 1: user}))
    assert failed.exit_code == 2
    assert failed.line == f"config error: model.vocab_size: too small for the tokenizer (rank 1; traceback in {error_file})"


def test_a_rank_killed_by_a_signal_points_to_the_log_dir(tmp_path):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    killed = ProcessFailure(local_rank=0, pid=1, exitcode=-9, error_file=str(tmp_path / "none.json"))
    failed = _worker_failed(ChildFailedError("run_worker", {0: killed}), tmp_path / "logs")
    assert failed.exit_code == 1
    assert failed.line == f"error: rank 0 failed (exit code -9): Signal 9 (SIGKILL) received by PID 1; its output is in {tmp_path / 'logs'}"
