"""Run lm-eval tasks on a `TitanLM` and reduce the results to {task: {metric: value}}.

titan's local tasks (titan/eval/tasks/) are always on the search path; lm-eval's own task
index is read only when a task outside it is asked for (indexing it takes seconds). A task
that cannot be loaded (unknown name, or a dataset that needs a download without network)
costs one clear log line and is left out; the others run."""

from __future__ import annotations

import contextlib
import logging
import random
from typing import Any, Optional, Sequence

from titan.eval import TASKS_DIR

log = logging.getLogger("titan")

LOCAL_TASKS = sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))
_managers: dict = {}


def task_manager(tasks: Sequence[str], include_path: Optional[str] = None):
    """lm-eval's task index over titan's tasks and `include_path`; lm-eval's own (thousands of
    YAMLs, seconds to index) only when a task is found in neither."""
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR)] + ([include_path] if include_path else [])
    for defaults in (False, True):
        key = (tuple(paths), defaults)
        if key not in _managers:
            _managers[key] = TaskManager(verbosity="ERROR", include_path=paths, include_defaults=defaults)
        if set(tasks) <= set(_managers[key].all_tasks):
            break
    return _managers[key]


def loadable_tasks(tasks: Sequence[str], include_path: Optional[str] = None) -> tuple[list[str], list[str]]:
    """(tasks that load, one message per task that does not). Loading builds the dataset, so a
    missing download fails here rather than half-way through an evaluation."""
    from lm_eval.tasks import get_task_dict

    manager = task_manager(tasks, include_path)
    ok, problems = [], []
    for name in tasks:
        try:
            get_task_dict([name], manager)
            ok.append(name)
        except Exception as e:  # noqa: BLE001 - any loading failure is reported the same way
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            problems.append(f"eval task {name!r} skipped: cannot load it ({type(e).__name__}: {reason[:200]}); "
                            f"titan's offline tasks are {', '.join(LOCAL_TASKS)}")
    return ok, problems


def primary_metrics(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lm-eval's results, filter suffixes (',none') dropped."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results.get("results", {}).items():
        values = {}
        for key, value in metrics.items():
            name, _, _filter = key.partition(",")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and name not in ("alias", "sample_len"):
                values[name] = float(value)
        out[task] = values
    return out


def evaluate(lm, tasks: Sequence[str], limit: Optional[int] = None, num_fewshot: Optional[int] = None,
             include_path: Optional[str] = None, seed: int = 1234) -> tuple[dict[str, dict[str, float]], Optional[dict]]:
    """Scores on rank 0 ({} on other ranks) and lm-eval's full results dict (rank 0, else None).
    Every rank of the job must call this (the model's forwards are collectives)."""
    from lm_eval import simple_evaluate as _simple_evaluate

    _quiet()
    ok, problems = loadable_tasks(tasks, include_path)
    for line in problems:
        log.warning(line)
    if not ok:
        return {}, None
    with _rng_preserved():  # lm-eval seeds the global generators; training must not notice
        results = _simple_evaluate(
            model=lm, tasks=ok, limit=limit, num_fewshot=num_fewshot, task_manager=task_manager(tasks, include_path),
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
            log_samples=False, bootstrap_iters=0, verbosity="ERROR",
        )
    if results is None:
        return {}, None
    return primary_metrics(results), results


def flat_scores(scores: dict[str, dict[str, float]]) -> dict[str, float]:
    """{'eval/<task>/<metric>': value} for metrics.jsonl and W&B."""
    return {f"eval/{task}/{metric}": value for task, metrics in scores.items() for metric, value in metrics.items()
            if not metric.endswith("_stderr")}


def _quiet() -> None:
    """lm-eval and datasets log per task and draw progress bars; titan prints one line per task."""
    import datasets

    datasets.disable_progress_bars()
    for name in ("lm-eval", "lm_eval", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def _rng_preserved():
    import numpy as np
    import torch

    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
