"""`--help` names titan and lists exactly the config groups of conf/ plus `sweeps`, each with
its presets and one line; shell completion answers from the same groups (issue 16)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers import REPO
from titan.config.paths import CONF_DIR, SWEEPS_DIR
from titan.train.help import GROUP_HELP


def _cli(*args: str, env: dict | None = None) -> str:
    proc = subprocess.run([sys.executable, "-m", "titan.train", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def expected_groups() -> dict[str, list[str]]:
    groups = {d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in CONF_DIR.iterdir() if d.is_dir() and d.name != "hydra"}
    groups["sweeps"] = sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml"))
    return groups


def test_help_lists_exactly_the_groups_with_presets_and_a_line_each():
    out = _cli("--help")
    assert out.splitlines()[0].startswith("titan:") and "powered by Hydra" not in out
    section = out.split("== Config groups", 1)[1].split("== Config (", 1)[0].splitlines()[2:]
    listed, group = {}, None
    for line in filter(None, section):
        if not line.startswith(" "):
            group, description = line.split(maxsplit=1)
            assert description.strip() == GROUP_HELP[group]
        else:
            listed[group] = line.strip().split(", ")
    assert listed == expected_groups()
    assert "-sc install=bash" in out  # shell completion is mentioned


def test_every_group_has_a_description():
    assert set(expected_groups()) <= set(GROUP_HELP)


def test_shell_completion_offers_presets():
    # What bash's completion function asks the app (after `eval "$(titan-train -sc install=bash)"`).
    out = _cli("-sc", "query=bash", env={"COMP_LINE": "titan-train model=llama3_t"})
    assert out.split() == ["model=llama3_tiny"]
    out = _cli("-sc", "query=bash", env={"COMP_LINE": "titan-train -m +sweeps=t"})
    assert out.split() == ["+sweeps=tiny"]
    assert "complete -o nospace" in _cli("-sc", "install=bash")
