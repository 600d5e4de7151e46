"""DictConfig (from Hydra) -> typed, validated `TrainConfig`. Runs once, in the launching process."""

from __future__ import annotations

import dataclasses
import os
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from titan.config.errors import ConfigError
from titan.config.schema import TrainConfig

from titan.config.paths import CONF_DIR, SWEEPS_DIR  # noqa: F401  (re-exported)


def register_schemas() -> None:
    """The root YAML's defaults list starts with `base_train`: the whole typed schema, so each
    group preset is checked field by field against its dataclass when Hydra merges it."""
    ConfigStore.instance().store(name="base_train", node=TrainConfig)


def _unknown_keys(node: Any, schema: Any, prefix: str) -> list[str]:
    """Keys present in the DictConfig that the dataclass does not declare.

    Hydra's `+group.key=value` slips past the schema merge and `to_object` drops it silently,
    so a typo would be ignored; we refuse it instead."""
    if not (isinstance(node, DictConfig) and dataclasses.is_dataclass(schema)):
        return []
    fields = {f.name: f for f in dataclasses.fields(schema)}
    found = []
    for key in node.keys():
        path = f"{prefix}{key}"
        if key not in fields:
            found.append(path)
            continue
        value = getattr(schema, key) if not isinstance(schema, type) else None
        if value is None:
            default = fields[key].default_factory  # type: ignore[misc]
            value = default() if callable(default) else None
        found += _unknown_keys(node._get_node(key), value, path + ".")
    return found


def to_typed(cfg: DictConfig) -> TrainConfig:
    """Typed config from Hydra's DictConfig, or a ConfigError naming the offending key."""
    unknown = _unknown_keys(cfg, TrainConfig(), "")
    if unknown:
        raise ConfigError(
            unknown[0],
            "unknown key; check the spelling against `python -m titan.train --cfg job` "
            "(keys are declared in titan/config/schema.py)",
        )
    try:
        typed = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:  # interpolation or type errors found late
        key = getattr(e, "full_key", None) or "config"
        raise ConfigError(str(key), str(e).splitlines()[0]) from None
    assert isinstance(typed, TrainConfig)
    return typed


def plain(value: Any) -> Any:
    """Dataclasses / enums -> plain dicts / strings (for JSON, W&B and printing)."""
    if dataclasses.is_dataclass(value):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def cache_dir(sub: Optional[str] = None) -> Path:
    """Per-machine cache (tokenizers, measured CPU peak): $TITAN_CACHE_DIR or ~/.cache/titan."""
    root = Path(os.environ.get("TITAN_CACHE_DIR") or Path.home() / ".cache" / "titan").expanduser()
    path = root / sub if sub else root
    path.mkdir(parents=True, exist_ok=True)
    return path
