"""The embedded corpus: text that ships with Python itself, so training needs no download.

Documents are the standard library's `.py` files (one per file, named `stdlib/<relative path>`)
and pydoc's documentation topics (one per topic, named `pydoc/<topic>`). Excluded: test suites,
installed packages, the generated codec tables in `encodings/`, and pydoc's own data module
(its topics are already documents). The corpus therefore depends on the Python version: runs on
the same interpreter see the same corpus.
"""

from __future__ import annotations

import functools
import os
import sysconfig
from pathlib import Path

from titan.config.errors import ConfigError
from titan.data.sources import IndexedDocuments

_SKIP_DIRS = {
    "site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
    "encodings", "pydoc_data", "lib-dynload",
}
_MAX_FILE_BYTES = 512 * 1024  # larger .py files are generated data, not prose or code


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@functools.lru_cache(maxsize=1)
def _stdlib_files() -> tuple[str, ...]:
    root = stdlib_dir()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune in place so os.walk never descends into site-packages (large and install-specific).
        dirnames[:] = sorted(
            d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-")
        )
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            if os.path.getsize(path) <= _MAX_FILE_BYTES:
                found.append(os.path.relpath(path, root).replace(os.sep, "/"))
    return tuple(sorted(found))


def _pydoc_topics() -> dict[str, str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        return {}
    return topics


def embedded_documents() -> IndexedDocuments:
    root = stdlib_dir()
    files = _stdlib_files()
    topics = _pydoc_topics()
    topic_names = sorted(topics)
    names = [f"stdlib/{f}" for f in files] + [f"pydoc/{t}" for t in topic_names]
    if not names:
        raise ConfigError(
            "data.source",
            f"no Python sources found under {root} for the embedded corpus; "
            "use data=files with data.path pointing at your own text",
        )

    def read(i: int) -> str:
        if i < len(files):
            return (root / files[i]).read_text(encoding="utf-8", errors="replace")
        return topics[topic_names[i - len(files)]]

    return IndexedDocuments(names, read, what=f"the embedded corpus ({root})")
