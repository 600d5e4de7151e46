"""Model families: `model.family` in a preset picks one; a family bundles everything that
depends on the architecture.

A `Family` holds its module class, how its args come from a `ModelConfig`, its parameter and
FLOP counts (active ones for mixture-of-experts), its Hugging Face adapter and which parallel
dims it supports. Adding a family is one package (e.g. `titan/models/qwen3/`) that calls
`register(...)` plus YAML presets; nothing else dispatches on the architecture.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional

from torch import nn


@dataclass(frozen=True)
class Family:
    name: str
    args_class: type  # the args dataclass; `build` takes one of these
    module_class: type  # nn.Module built from the args (on the meta device by `build_model`)
    args_from_config: Callable[[Any, int, int], Any]  # (ModelConfig, vocab_size, seq_len) -> args
    active_params: Callable[[Any, int], int]  # (args, total params) -> params one token uses
    hf: Any = None  # namespace: to_hf, from_hf, hf_config, args_from_hf_config, MODEL_TYPES
    validate: Optional[Callable[[Any], None]] = None  # (ModelConfig) -> raises ConfigError
    # Parallel dims the family's modules support (checked before launch).
    parallel_dims: frozenset = frozenset({"dp_replicate", "dp_shard", "cp", "tp", "pp"})


_FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    _FAMILIES[family.name] = family
    return family


def families() -> list[str]:
    _load_builtin()
    return sorted(_FAMILIES)


def get_family(name: str) -> Family:
    _load_builtin()
    if name not in _FAMILIES:
        from titan.config.errors import ConfigError

        raise ConfigError("model.family", f"unknown family {name!r}; one of {', '.join(sorted(_FAMILIES))}")
    return _FAMILIES[name]


def family_of(args: Any) -> Family:
    """The family whose args class is exactly `type(args)` (subclasses are families of their own)."""
    _load_builtin()
    for family in _FAMILIES.values():
        if type(args) is family.args_class:
            return family
    raise TypeError(f"no model family for args of type {type(args).__name__}")


def family_for_hf_config(config: dict) -> Family:
    """The family whose HF adapter reads this config.json's model_type."""
    _load_builtin()
    model_type = config.get("model_type", "llama")
    for family in _FAMILIES.values():
        if family.hf is not None and model_type in family.hf.MODEL_TYPES:
            return family
    from titan.interop.errors import ConversionError

    known = sorted(t for f in _FAMILIES.values() if f.hf is not None for t in f.hf.MODEL_TYPES)
    raise ConversionError(f"config.json model_type={model_type!r}: titan converts {', '.join(known)}")


def args_from_fields(args_class: type, cfg: Any, vocab_size: int, seq_len: int, **extra: Any) -> Any:
    """Args from the ModelConfig fields the args class shares, plus `extra`."""
    names = {f.name for f in dataclasses.fields(args_class)}
    values = {k: v for k, v in dataclasses.asdict(cfg).items() if k in names}
    values["vocab_size"] = cfg.vocab_size if cfg.vocab_size > 0 else vocab_size
    values["max_seq_len"] = seq_len
    values.update(extra)
    return args_class(**values)


_loaded = False


def _load_builtin() -> None:
    """Import the built-in family packages (each registers itself) once, lazily."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import titan.models.llama_family  # noqa: F401
    import titan.models.qwen3  # noqa: F401


def count_params(model: nn.Module) -> int:
    """Unique parameters (a tied embedding counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
