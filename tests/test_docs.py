"""Runs the commands of every guide in docs/, so a guide cannot rot (issue 16).

The convention (also in docs/README.md), for anyone writing a guide:

- A fenced block opened with ```` ```bash test ```` is run by this test; a plain ```` ```bash ````
  block is shown only (cluster-sized commands, things that need a GPU or Slurm).
- A guide's test blocks run in order, in ONE bash session (`set -euo pipefail`): variables and
  files carry from one block to the next. The working directory is a fresh temporary directory
  that looks like a clone (symlinks to the repository's top-level entries: `conf/`, `scripts/`,
  `titan/`, ...), so commands read exactly as a user types them from the repository root, and
  what they write (`outputs/`, `runs/`, ...) stays out of the checkout.
- Keep them at CPU size and seconds long; the usual way is a `TINY=...` variable of overrides
  set in the guide's first test block and visible to the reader, used as `$TINY` in the
  commands (the reader drops it for a real run). The whole test should stay under ~2 minutes.
- Assertions are plain shell: `test -f ...`, `grep -q ...`, `python -c "..."`. A failing
  command fails the test with the guide, the block's line and the output.
- Every guide (docs/**/*.md except README.md) must hold at least one test block.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

DOCS = REPO / "docs"
FENCE = re.compile(r"^```bash test[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
NOT_LINKED = {".git", "outputs", "multirun", "wandb", "build", ".pytest_cache"}  # run products stay local


def guides() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if p.name != "README.md")


def runnable_blocks(guide: Path) -> list[tuple[int, str]]:
    """(line number, script) of each ```bash test block, in order."""
    text = guide.read_text()
    return [(text.count("\n", 0, m.start()) + 2, m.group(1)) for m in FENCE.finditer(text)]


def script_for(guide: Path) -> str:
    parts = ["set -euo pipefail"]
    for line, block in runnable_blocks(guide):
        parts.append(f"echo '>>> {guide.relative_to(REPO)}:{line}' >&2\nset -x\n{block}set +x")
    return "\n".join(parts) + "\n"


def clone_like(workdir: Path) -> None:
    for entry in REPO.iterdir():
        if entry.name not in NOT_LINKED and not entry.name.startswith("."):
            (workdir / entry.name).symlink_to(entry)


def test_every_guide_has_commands_that_run():
    assert guides(), "no guides under docs/"
    missing = [str(g.relative_to(REPO)) for g in guides() if not runnable_blocks(g)]
    assert not missing, f"guides without a ```bash test block: {missing}"


@pytest.mark.slow
@pytest.mark.parametrize("guide", guides(), ids=lambda p: str(p.relative_to(DOCS)))
def test_guide(guide: Path, tmp_path: Path):
    clone_like(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `python` is this one
    env.pop("PYTHONPATH", None)  # titan comes from the clone-like cwd, as for a user in a checkout
    proc = subprocess.run(["bash", "-c", script_for(guide)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{guide.name} failed (exit {proc.returncode})\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
