"""Hugging Face `datasets` as a document source, streamed (nothing is downloaded up front).

`data.path` is either a dataset name on the Hub (with `data.hf_config` and `data.hf_split`,
e.g. path=allenai/c4 hf_config=en), a local dataset directory, or `BUILDER:DATA_FILES` for
local files read by one of datasets' packaged builders, e.g. `json:/data/*.jsonl`,
`parquet:/data/**/*.parquet`, `csv:train.csv` or `text:/corpus/*.txt`.

Documents come in stream order (every epoch the same order). A resumed run restarts the stream
from the dataset's own state (`IterableDataset.state_dict`, saved with the loader's position),
not by re-reading up to its cursor. Documents are split into train/val by the stable hash of
their stream index.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from titan.config.errors import ConfigError
from titan.config.schema import DataConfig
from titan.data.sources import StreamingDocuments

DATA_FILE_BUILDERS = ("json", "csv", "parquet", "text", "arrow")


def load_dataset_args(cfg: DataConfig) -> dict:
    """Keyword arguments for `datasets.load_dataset` from `data.path` / `data.hf_config`."""
    builder, sep, data_files = cfg.path.partition(":")
    if sep and builder in DATA_FILE_BUILDERS:
        return {"path": builder, "data_files": os.path.expanduser(data_files)}
    return {"path": os.path.expanduser(cfg.path), "name": cfg.hf_config}


def hf_documents(cfg: DataConfig, split: str) -> StreamingDocuments:
    try:
        import datasets
    except ImportError as e:
        raise ConfigError(
            "data.source", "data.source=hf needs the `datasets` package: pip install 'titan[hf]'"
        ) from e
    if not cfg.path or cfg.path == "???":
        raise ConfigError("data.path", "data.source=hf needs a dataset name or BUILDER:FILES "
                          "(e.g. json:/data/*.jsonl)")
    args = load_dataset_args(cfg)
    field = cfg.text_field

    def records():
        try:
            ds = datasets.load_dataset(**args, split=cfg.hf_split, streaming=True)
        except (FileNotFoundError, ValueError) as e:  # no match, unknown split/config
            raise ConfigError("data.path", f"cannot open {cfg.path!r} "
                              f"(split {cfg.hf_split!r}) with datasets: {e}") from e
        return iter(ds)

    # Open once now, so a wrong name, path or field fails at startup rather than mid-run.
    first = next(records(), None)
    if first is None:
        raise ConfigError("data.path", f"{cfg.path!r} (split {cfg.hf_split!r}) is empty")
    if field not in first:
        raise ConfigError("data.text_field", f"{cfg.path!r} records have no field {field!r}; "
                          f"their fields are {sorted(first)}")

    def texts() -> Iterator[str]:
        for index, record in enumerate(records()):
            value = record.get(field)
            if value is not None and not isinstance(value, str):
                raise ConfigError("data.text_field", f"record {index} of {cfg.path!r}: "
                                  f"{field!r} holds {type(value).__name__}, not text")
            yield value or ""

    def open_resumable(state):
        """(texts from `state` on, a function returning the dataset's state after the last one)."""
        ds = datasets.load_dataset(**args, split=cfg.hf_split, streaming=True)
        if state is not None:
            ds.load_state_dict(state)

        def gen() -> Iterator[str]:
            for record in ds:
                value = record.get(field)
                if value is not None and not isinstance(value, str):
                    raise ConfigError("data.text_field", f"a record of {cfg.path!r}: "
                                      f"{field!r} holds {type(value).__name__}, not text")
                yield value or ""

        return gen(), ds.state_dict

    return StreamingDocuments(texts, split, cfg.val_fraction, cfg.max_documents,
                              what=f"hf dataset {cfg.path!r}", open_resumable=open_resumable)
