"""Where titan's Hydra configs live: `conf/` (the root config and one folder per group) and
`sweeps/` (the `sweeps` group). Both sit at the top of the repository; a wheel carries them
inside the package as titan/conf and titan/sweeps (see setup.py), so an installed titan finds
them wherever it is run from. Kept free of heavy imports: the Hydra search-path plugin uses it.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]


def _shipped(name: str) -> Path:
    """titan/<name> in an installed wheel, else <checkout>/<name> (source tree, editable install)."""
    inside = PACKAGE_DIR / name
    return inside if inside.is_dir() else PACKAGE_DIR.parent / name


CONF_DIR = _shipped("conf")
SWEEPS_DIR = _shipped("sweeps")
