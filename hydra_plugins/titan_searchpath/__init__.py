"""Puts the repository root on Hydra's search path so `sweeps/NAME.yaml` is the config group
`sweeps` (`python -m titan.train -m +sweeps=lr_scan`) and `launcher/` presets are found."""

from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

REPO_ROOT = Path(__file__).resolve().parents[2]


class TitanSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="titan", path=f"file://{REPO_ROOT}")
