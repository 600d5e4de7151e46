"""A non-editable install finds its configs: build a wheel, install it into a fresh venv
outside the checkout, and train + sweep from an unrelated directory (issue 10)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, TINY

# What a wheel is built from (a copy, so the build never writes build/ into the checkout).
SOURCES = ["titan", "hydra_plugins", "conf", "sweeps", "setup.py", "pyproject.toml", "README.md", "MANIFEST.in"]


def _run(args, cwd, env, timeout=300):
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args}\nexit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python of a fresh venv holding only the wheel, an empty working dir, env)."""
    root = tmp_path_factory.mktemp("install")
    src = root / "src"
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, src / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", PIP_DISABLE_PIP_VERSION_CHECK="1")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), str(src)], root, env)
    wheel = next((root / "dist").glob("titan-*.whl"))
    venv = root / "venv"
    # System site-packages give torch & co; the venv's own titan (the wheel) shadows any editable one.
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], root, env)
    python = venv / "bin" / "python"
    if sys.prefix != sys.base_prefix:  # run from a venv: --system-site-packages misses its packages
        purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root, env).stdout.strip()
        outer = [p for p in sys.path if p.endswith("site-packages")]
        (Path(purelib) / "_outer_env.pth").write_text("\n".join(outer) + "\n")  # after the venv's own
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(wheel)], root, env)
    work = root / "elsewhere"
    work.mkdir()
    return python, work, env


@pytest.mark.slow
def test_wheel_trains_and_sweeps_outside_the_checkout(installed):
    python, work, env = installed
    where = _run([str(python), "-c", "import titan.config.paths as p; print(p.CONF_DIR); print(p.SWEEPS_DIR)"], work, env)
    conf, sweeps = where.stdout.split()
    assert "site-packages" in conf and conf.endswith("titan/conf") and sweeps.endswith("titan/sweeps"), where.stdout
    assert str(REPO) not in where.stdout

    tiny = [o for o in TINY if not o.startswith("data.max_documents")] + ["data.max_documents=50"]
    _run([str(python), "-m", "titan.train", "hydra.run.dir=run", *tiny, "training.steps=3"], work, env)
    records = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]

    sweep = _run([str(python), "-m", "titan.train", "-m", "+sweeps=tiny", "hydra.sweep.dir=sweep",
                  "training.steps=2", "lr_schedule.warmup_steps=1", "training.val_interval=0", "data.max_documents=50", "optim.lr=1e-3,3e-3"], work, env)
    jobs = sorted(p.name for p in (work / "sweep").iterdir() if (p / "metrics.jsonl").exists())
    assert jobs == ["0", "1"], sweep.stdout[-2000:]

    # The installed console script is the same CLI, and --help sees the shipped groups.
    helped = _run([str(python.parent / "titan-train"), "--help"], work, env)
    assert "sweeps " in helped.stdout and "llama3_tiny" in helped.stdout
