"""Local files as documents: `.txt` (a file is a document), `.jsonl` (a line is a document, text
under `text_field`) and `.parquet` (a row is a document, column `text_field`; needs pyarrow).

`data.path` is a glob (`**` matches any depth) or a directory (all supported files under it).
Relative paths resolve against the working directory. Files are taken in sorted order and
documents are named relative to the glob's fixed leading directory, so moving the whole
dataset does not change the train/val split.
"""

from __future__ import annotations

import bisect
import functools
import glob
import json
import os
from array import array
from collections.abc import Callable

from titan.config.errors import ConfigError
from titan.data.sources import IndexedDocuments

SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".parquet")
_GLOB_CHARS = set("*?[")


def _base_dir(pattern: str) -> str:
    """The leading directories of `pattern` that hold no glob characters."""
    parts = pattern.split(os.sep)
    fixed = []
    for part in parts[:-1]:
        if _GLOB_CHARS & set(part):
            break
        fixed.append(part)
    return os.sep.join(fixed) or "."


def _expand(path: str | None) -> tuple[list[str], str]:
    if not path or path == "???":
        raise ConfigError("data.path", "data=files needs a glob of .txt/.jsonl/.parquet files")
    pattern = os.path.expanduser(path)
    if os.path.isdir(pattern):
        pattern = os.path.join(pattern, "**", "*")
    matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not matches:
        raise ConfigError(
            "data.path", f"no files match {path!r}; point data.path at a glob such as "
            "'data/**/*.jsonl' (relative paths start from the working directory)"
        )
    files = [p for p in matches if p.endswith(SUPPORTED_SUFFIXES)]
    if not files:
        raise ConfigError(
            "data.path", f"{path!r} matches {len(matches)} file(s) but none ends in "
            f"{', '.join(SUPPORTED_SUFFIXES)} (e.g. {matches[0]!r})"
        )
    return files, _base_dir(pattern)


def _text_value(value, name: str, field: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ConfigError("data.text_field", f"{name}: field {field!r} holds "
                          f"{type(value).__name__}, not text")
    return value


def _jsonl_segment(path: str, rel: str, field: str):
    offsets = array("q")
    linenos = []
    with open(path, "rb") as f:
        pos = 0
        for lineno, line in enumerate(f, 1):
            if line.strip():
                offsets.append(pos)
                linenos.append(lineno)
            pos += len(line)
    if offsets:  # check the field on the first record, so a wrong key fails at startup
        with open(path, "rb") as f:
            f.seek(offsets[0])
            first = _parse_json(f.readline(), f"{rel}:{linenos[0]}")
        if field not in first:
            raise ConfigError("data.text_field", f"{rel}:{linenos[0]} has no field {field!r}; "
                              f"its fields are {sorted(first)}")

    def read(j: int) -> str:
        name = f"{rel}:{linenos[j]}"
        with open(path, "rb") as f:
            f.seek(offsets[j])
            record = _parse_json(f.readline(), name)
        if field not in record:
            raise ConfigError("data.text_field", f"{name} has no field {field!r}")
        return _text_value(record[field], name, field)

    return [f"{rel}:{n}" for n in linenos], read


def _parse_json(line: bytes, name: str) -> dict:
    try:
        record = json.loads(line)
    except ValueError as e:
        raise ConfigError("data.path", f"{name} is not valid JSON: {e}") from e
    if not isinstance(record, dict):
        raise ConfigError("data.path", f"{name} is a JSON {type(record).__name__}, not an object")
    return record


def _parquet_segments(path: str, rel: str, field: str):
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ConfigError("data.path", "reading .parquet files needs pyarrow: "
                          "pip install pyarrow (or 'titan[hf]')") from e
    meta = pq.ParquetFile(path)
    columns = meta.schema_arrow.names
    if field not in columns:
        raise ConfigError("data.text_field", f"{rel} has no column {field!r}; "
                          f"its columns are {columns}")

    @functools.lru_cache(maxsize=4)  # shuffled reads revisit a row group; keep a few decoded
    def row_group(g: int) -> list:
        return pq.ParquetFile(path).read_row_group(g, columns=[field]).column(0).to_pylist()

    def reader(g: int, names: list[str]) -> Callable[[int], str]:
        return lambda j: _text_value(row_group(g)[j], names[j], field)

    segments, row = [], 0
    for g in range(meta.metadata.num_row_groups):
        n = meta.metadata.row_group(g).num_rows
        names = [f"{rel}:{row + k}" for k in range(n)]
        segments.append((names, reader(g, names)))
        row += n
    return segments


def _read_text_file(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def file_documents(path: str | None, text_field: str) -> IndexedDocuments:
    files, base = _expand(path)
    names: list[str] = []
    starts: list[int] = []  # first document index of each segment
    readers: list[Callable[[int], str]] = []

    def add(seg_names: list[str], read: Callable[[int], str]) -> None:
        if seg_names:
            starts.append(len(names))
            names.extend(seg_names)
            readers.append(read)

    for p in files:
        rel = os.path.relpath(p, base).replace(os.sep, "/")
        if p.endswith(".txt"):
            add([rel], lambda _j, p=p: _read_text_file(p))
        elif p.endswith(".jsonl"):
            add(*_jsonl_segment(p, rel, text_field))
        else:
            for segment in _parquet_segments(p, rel, text_field):
                add(*segment)
    if not names:
        raise ConfigError("data.path", f"the files matching {path!r} hold no documents")

    def read(i: int) -> str:
        s = bisect.bisect_right(starts, i) - 1
        return readers[s](i - starts[s])

    return IndexedDocuments(names, read, what=f"files matching {path!r}")
