"""Makes `sweeps/NAME.yaml` the config group `sweeps` of titan's app
(`python -m titan.train -m +sweeps=lr_scan`), and adds nothing else to Hydra's search path.

A search-path entry is a root whose sub-folders are groups, so mounting the repository root
would also make `conf`, `outputs`, `tests`, ... groups. Instead a small config source exposes
one directory under one group name, and only when titan's own conf/ is the primary config dir
(other Hydra apps in the same environment are left alone).
"""

from __future__ import annotations

import os
from typing import List, Optional

from hydra._internal.core_plugins.file_config_source import FileConfigSource
from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.object_type import ObjectType
from hydra.plugins.config_source import ConfigLoadError, ConfigResult
from hydra.plugins.search_path_plugin import SearchPathPlugin

GROUP = "sweeps"


class TitanSweepsConfigSource(FileConfigSource):
    """`titan-sweeps:///dir`: the files of `dir` as the configs of the group `sweeps`."""

    @staticmethod
    def scheme() -> str:
        return "titan-sweeps"

    def _inner(self, config_path: str) -> Optional[str]:
        """'sweeps/x.yaml' -> 'x.yaml', 'sweeps' -> '', anything else -> None (not ours)."""
        config_path = config_path.strip("/")
        if config_path == GROUP:
            return ""
        if config_path.startswith(GROUP + "/"):
            return config_path[len(GROUP) + 1 :]
        return None

    def load_config(self, config_path: str) -> ConfigResult:
        inner = self._inner(config_path)
        if not inner:
            raise ConfigLoadError(f"Config not found : {config_path}")
        return super().load_config(inner)

    def available(self) -> bool:
        return os.path.isdir(self.path)

    def is_group(self, config_path: str) -> bool:
        inner = self._inner(config_path)
        return config_path.strip("/") == "" or (inner is not None and super().is_group(inner))

    def is_config(self, config_path: str) -> bool:
        inner = self._inner(config_path)
        return bool(inner) and super().is_config(inner)

    def list(self, config_path: str, results_filter: Optional[ObjectType]) -> List[str]:
        groups = results_filter in (None, ObjectType.GROUP)
        configs = results_filter in (None, ObjectType.CONFIG)
        if config_path.strip("/") == "":
            return [GROUP] if groups else []
        inner = self._inner(config_path)
        folder = os.path.join(self.path, inner or "")
        if inner is None or not os.path.isdir(folder):
            return []
        found = set()
        for name in os.listdir(folder):
            full = os.path.join(folder, name)
            if groups and os.path.isdir(full) and name != "__pycache__":
                found.add(name)
            if configs and os.path.isfile(full) and name.endswith(".yaml"):
                found.add(name[: -len(".yaml")])
        return sorted(found)


class TitanSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        from titan.config.paths import CONF_DIR, SWEEPS_DIR

        primary = {os.path.realpath(e.path.split("://", 1)[-1]) for e in search_path.get_path() if e.path}
        if os.path.realpath(CONF_DIR) in primary:
            search_path.append(provider="titan", path=f"titan-sweeps://{SWEEPS_DIR}")
