"""The READMEs name only things that exist: code-layout paths, repository paths, relative
links and `python -m` modules."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "benchmarks/README.md", "docs/sweeps.md"]
REPO_PATH = re.compile(r"(?<![\w./<>$-])((?:titan|tests|conf|docs|benchmarks|scripts|sweeps)/[\w./-]*[\w/])")


def layout_block() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = text.split("## Layout of the code", 1)[1].split("```", 2)[1]
    return [line for line in block.splitlines() if line.strip()]


def test_every_path_in_the_code_layout_exists() -> None:
    lines = layout_block()
    assert len(lines) >= 10
    for line in lines:
        path = line.split()[0]
        assert (REPO / path).exists(), f"README's code layout names {path}, which does not exist"
        if path.endswith("/"):
            assert (REPO / path).is_dir(), f"{path} is not a directory"
    packages = [line.split()[0] for line in lines if line.startswith("titan/")]
    for child in sorted((REPO / "titan").iterdir()):  # and every titan package is in it
        if child.is_dir() and (child / "__init__.py").exists():
            assert f"titan/{child.name}/" in packages, f"titan/{child.name}/ is missing from README's code layout"


@pytest.mark.parametrize("doc", DOCS)
def test_paths_links_and_modules_named_in_docs_exist(doc: str) -> None:
    text = (REPO / doc).read_text()
    for path in sorted(set(REPO_PATH.findall(text))):
        assert (REPO / path).exists(), f"{doc} names {path}, which does not exist"
    for link in re.findall(r"\]\(([^)#\s]+)", text):
        if not re.match(r"[a-z]+://", link):
            assert ((REPO / doc).parent / link).exists(), f"{doc} links to {link}, which does not exist"
    for module in sorted(set(re.findall(r"python -m (titan[\w.]*)", text))):
        assert importlib.util.find_spec(module) is not None, f"{doc} runs python -m {module}, which does not exist"
