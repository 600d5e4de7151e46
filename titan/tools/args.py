"""`key=value` arguments of the tools that are not Hydra apps (generate, eval), read into the
fields of a dataclass, and the `main` those tools share: `--help` prints the module doc, a bad
argument or an unreadable checkpoint is one line on stderr with exit status 2."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable, Optional, Sequence

from titan.config.errors import ConfigError
from titan.interop.errors import ConversionError


class UsageError(ValueError):
    pass


def convert(field: dataclasses.Field, raw: str) -> Any:
    """`raw` as the field's type (int, float, bool, str; `null`/`none` for an Optional field).
    Values are taken literally otherwise, so a prompt may hold spaces, colons or '='."""
    kind = field.type.replace("Optional[", "").rstrip("]")
    if raw.lower() in ("null", "none") and field.type.startswith("Optional"):
        return None
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise UsageError(f"{field.name}={raw!r}: expected {kind}") from None
    if kind == "bool":
        if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise UsageError(f"{field.name}={raw!r}: expected true or false")
        return raw.lower() in ("true", "1", "yes")
    return raw


def parse_key_values(argv: Sequence[str], args_class: type, internal: tuple[str, ...] = (),
                     aliases: Optional[dict[str, str]] = None) -> Any:
    """An `args_class` from `key=value` items (`--key=value` and dashes in keys accepted);
    `internal` fields are filled by the tool, never from the command line. `aliases` maps a
    command-line name (e.g. the training CLI's `parallel.tp`) to the field it alone sets."""
    aliases = aliases or {}
    fields = {f.name: f for f in dataclasses.fields(args_class) if f.name not in internal}
    names = [f for f in fields if f not in aliases.values()] + list(aliases)
    values = {}
    for item in argv:
        key, sep, raw = item.partition("=")
        key = key.lstrip("-").replace("-", "_")
        key = aliases.get(key, "" if key in aliases.values() else key)
        if not sep or key not in fields:
            raise UsageError(f"bad argument {item!r}: expected key=value with key in {', '.join(names)}")
        values[key] = convert(fields[key], raw)
    return args_class(**values)


def tool_main(argv: Optional[Sequence[str]], doc: Optional[str], work: Callable[[list[str]], int]) -> int:
    """Run `work(argv)` (its return: the exit status) with the tools' help and error handling."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in argv):
        print(doc)
        return 0
    try:
        return work(argv)
    except (UsageError, ConversionError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
