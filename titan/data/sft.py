"""Supervised fine-tuning data: conversations -> (inputs, labels) micro-batches, labels -100
everywhere but on assistant tokens.

Sources (`data.source`, with `task=sft`):
- embedded: question/answer pairs from the Python standard library's own docstrings (the
  question names a function with its signature, the answer is its docstring), no download;
- files (or any `data.path`): JSONL / JSON / parquet records with OpenAI-style `messages` or
  `prompt`/`response` (titan/data/chat.py);
- hf: a Hugging Face dataset (`data.path`, `data.hf_config`, `data.hf_split`).
Held-out conversations are picked by a stable hash of their name, as for pretraining.

The global stream is layout-independent like the pretraining loader's: conversations in a
seeded per-epoch order become rows of `seq_len + 1` tokens, the same on every rank, cut into
global batches of `global_batch_size` rows of which each data-parallel rank keeps its slice.
- `data.sft_packing=pack`: whole conversations fill a row in order, the rest is padding (EOS,
  untrained); the trainer masks attention per conversation (document ids from the BOS tokens).
- `data.sft_packing=pad`: one conversation per row, each micro-batch padded to its longest
  (to `seq_len` under pipeline parallelism, whose shapes are static).
Conversations longer than `seq_len + 1` tokens are truncated or dropped (`data.sft_overflow`),
and counted (`SFTLoader.stats`).
"""

from __future__ import annotations

import functools
import glob
import inspect
import json
import logging
import os
from typing import Any, Callable, Optional

import numpy as np
import torch

from titan.config.errors import ConfigError
from titan.config.schema import DataConfig, DataSource, SFTOverflow, SFTPacking
from titan.data.chat import ChatTemplate, Message, encode_conversation, to_messages
from titan.data.sources import is_held_out

IGNORE = -100
log = logging.getLogger("titan")

# Modules whose public functions and methods make the embedded question/answer set.
EMBEDDED_MODULES = (
    "os", "os.path", "shutil", "string", "textwrap", "json", "re", "math", "statistics", "random",
    "itertools", "functools", "collections", "heapq", "bisect", "copy", "pathlib", "glob", "fnmatch",
    "datetime", "calendar", "time", "csv", "base64", "binascii", "hashlib", "hmac", "secrets", "uuid",
    "zlib", "gzip", "tarfile", "zipfile", "tempfile", "inspect", "operator", "contextlib", "typing",
    "urllib.parse", "html", "difflib", "pprint", "argparse", "logging", "threading", "subprocess",
    "socket", "struct", "io", "codecs", "unicodedata", "locale", "fractions", "decimal", "array",
    "weakref", "types", "enum", "dataclasses", "abc", "traceback", "warnings", "shlex", "sched",
)


def _first_paragraph(doc: str, limit: int = 500) -> str:
    para = doc.strip().split("\n\n")[0].strip()
    return para if len(para) <= limit else para[:limit].rsplit(" ", 1)[0] + " ..."


@functools.lru_cache(maxsize=1)
def _embedded() -> tuple:
    return tuple(_collect_embedded())


def embedded_conversations() -> list[tuple[str, dict]]:
    return list(_embedded())


def _collect_embedded() -> list[tuple[str, dict]]:
    """(name, {"prompt", "response"}) for each documented public function/method of
    EMBEDDED_MODULES: "What does `json.dumps(obj, *, skipkeys=False, ...)` do?" -> the first
    paragraph of its docstring."""
    import importlib

    out, seen = [], set()
    for mod_name in EMBEDDED_MODULES:
        try:
            module = importlib.import_module(mod_name)
        except ImportError:
            continue
        members = []
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_"):
                continue
            if inspect.isclass(obj):  # its methods, when the class is defined here (not re-exported)
                if getattr(obj, "__module__", "").split(".")[0] == module.__name__.split(".")[0]:
                    members.extend((f"{name}.{m}", f) for m, f in sorted(vars(obj).items()) if not m.startswith("_") and callable(f))
            elif callable(obj):
                members.append((name, obj))
        for qualname, fn in members:
            doc = inspect.getdoc(fn)
            key = f"{mod_name}.{qualname}"
            if not doc or key in seen or len(doc) < 20:
                continue
            try:
                sig = str(inspect.signature(fn))
            except (TypeError, ValueError):
                sig = "(...)"
            seen.add(key)
            out.append((key, {"prompt": f"What does `{key}{sig}` do?", "response": _first_paragraph(doc)}))
    return out


def _file_records(pattern: str) -> list[tuple[str, dict]]:
    paths = sorted(glob.glob(pattern, recursive=True)) if any(c in pattern for c in "*?[") else [pattern]
    if os.path.isdir(pattern):
        paths = sorted(p for ext in ("jsonl", "json", "parquet") for p in glob.glob(os.path.join(pattern, f"**/*.{ext}"), recursive=True))
    paths = [p for p in paths if os.path.isfile(p)]
    if not paths:
        raise ConfigError("data.path", f"no conversation files match {pattern!r} (.jsonl, .json or .parquet)")
    out = []
    for path in paths:
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq

            for i, row in enumerate(pq.read_table(path).to_pylist()):
                out.append((f"{path}:{i}", row))
        elif path.endswith(".json"):
            rows = json.loads(open(path, encoding="utf-8").read())
            out.extend((f"{path}:{i}", row) for i, row in enumerate(rows if isinstance(rows, list) else [rows]))
        else:
            with open(path, encoding="utf-8") as f:
                for i, line in enumerate(f):
                    if line.strip():
                        try:
                            out.append((f"{path}:{i + 1}", json.loads(line)))
                        except json.JSONDecodeError as e:
                            raise ConfigError("data.path", f"{path}:{i + 1} is not valid JSON ({e.msg})") from None
    return out


def _hf_records(cfg: DataConfig) -> list[tuple[str, dict]]:
    import datasets

    ds = datasets.load_dataset(cfg.path, cfg.hf_config, split=cfg.hf_split)
    return [(str(i), dict(row)) for i, row in enumerate(ds)]


def load_conversations(cfg: DataConfig, split: str) -> list[tuple[str, list[Message]]]:
    """(name, messages) of `split` ("train" or "val")."""
    if cfg.source is DataSource.hf:
        records = _hf_records(cfg)
    elif cfg.path:  # files, or data.path given with the default source
        records = _file_records(cfg.path)
    else:
        records = embedded_conversations()
    if cfg.max_documents is not None:
        records = records[: cfg.max_documents]
    want_val = split == "val"
    fmt = cfg.sft_format.value
    chosen = [(name, to_messages(row, fmt, name)) for name, row in records if is_held_out(name, cfg.val_fraction) == want_val]
    if not chosen:
        raise ConfigError("data.val_fraction" if want_val else "data.path", f"the {split} split of the conversations is empty")
    return chosen


class SFTLoader:
    """(inputs, labels) micro-batches of conversations for one data-parallel rank; the same
    interface and resumable state as `TokenLoader` (see the module docstring)."""

    def __init__(
        self,
        conversations: list[tuple[str, list[Message]]],
        encode: Callable[[list[Message]], tuple[list[int], list[bool]]],
        pad_id: int,
        seq_len: int,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_world: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        packing: SFTPacking = SFTPacking.pack,
        overflow: SFTOverflow = SFTOverflow.truncate,
        pad_multiple: int = 1,
        fixed_width: bool = False,
    ):
        local = global_batch_size // dp_world
        if global_batch_size % dp_world or local % micro_batch_size:
            raise ConfigError("training.micro_batch_size", f"{micro_batch_size} must divide global_batch_size / dp = {global_batch_size}/{dp_world}")
        self.conversations, self._encode, self.pad_id = conversations, encode, pad_id
        self.seq_len, self.global_batch_size, self.micro_batch_size = seq_len, global_batch_size, micro_batch_size
        self.dp_rank, self.dp_world, self.seed, self.shuffle = dp_rank, dp_world, seed, shuffle
        self.packing, self.overflow = SFTPacking(packing), SFTOverflow(overflow)
        self.pad_multiple, self.fixed_width = pad_multiple, fixed_width
        self.local_batch_size = local
        self.micro_batches_per_step = local // micro_batch_size
        self.stats = {"conversations": 0, "truncated": 0, "dropped": 0}
        self._cache: dict[int, Optional[tuple[np.ndarray, np.ndarray]]] = {}
        self._epoch = self._index = 0
        self._order: Optional[tuple[int, np.ndarray]] = None
        self._rows: Optional[list[tuple[np.ndarray, np.ndarray]]] = None
        self._batch_start = (0, 0)
        self._micro = 0

    # --------------------------------------------------------------------------------------
    def _example(self, epoch: int, index: int) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """(token ids, trained flags) of the `index`-th conversation of `epoch`'s order, None if
        dropped for length."""
        n = len(self.conversations)
        if self.shuffle:
            if self._order is None or self._order[0] != epoch:
                self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(n))
            index = int(self._order[1][index])
        if index not in self._cache:
            ids, trained = self._encode(self.conversations[index][1])
            width = self.seq_len + 1
            self.stats["conversations"] += 1
            if len(ids) > width:
                if self.overflow is SFTOverflow.truncate and any(trained[1:width]):
                    self.stats["truncated"] += 1
                    ids, trained = ids[:width], trained[:width]
                else:  # dropped, or nothing left to train on once cut
                    self.stats["dropped"] += 1
                    ids = None
                if self.stats["truncated"] + self.stats["dropped"] == 1:
                    log.warning("a conversation is longer than training.seq_len + 1 = %d tokens: %s (data.sft_overflow); "
                                "later ones are counted in the loader's stats", width,
                                "truncated" if ids is not None else "dropped")
            self._cache[index] = None if ids is None else (np.asarray(ids, np.int64), np.asarray(trained, bool))
        return self._cache[index]

    def _next_example(self) -> tuple[np.ndarray, np.ndarray]:
        for _ in range(len(self.conversations) + 1):
            if self._index >= len(self.conversations):
                self._epoch, self._index = self._epoch + 1, 0
            example = self._example(self._epoch, self._index)
            self._index += 1
            if example is not None:
                return example
        raise ConfigError("data.sft_overflow", f"every conversation is longer than training.seq_len + 1 = {self.seq_len + 1} tokens and was dropped")

    def _peek(self) -> tuple[np.ndarray, np.ndarray]:
        epoch, index = self._epoch, self._index
        example = self._next_example()
        self._epoch, self._index = epoch, index
        return example

    def _next_row(self) -> tuple[np.ndarray, np.ndarray]:
        """One row: token ids and trained flags (unpadded for `pad`, seq_len+1 for `pack`)."""
        if self.packing is SFTPacking.pad:
            return self._next_example()
        width = self.seq_len + 1
        ids, trained = [], []
        used = 0
        while True:
            e_ids, e_trained = self._peek()
            if used and used + len(e_ids) > width:
                break
            self._next_example()
            ids.append(e_ids)
            trained.append(e_trained)
            used += len(e_ids)
            if used >= width:
                break
        return np.concatenate(ids), np.concatenate(trained)

    def _next_global_batch(self) -> None:
        self._batch_start = (self._epoch, self._index)
        rows = [self._next_row() for _ in range(self.global_batch_size)]
        lo = self.dp_rank * self.local_batch_size
        self._rows = rows[lo : lo + self.local_batch_size]
        self._micro = 0

    def _to_tensors(self, rows: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = self.seq_len + 1
        if self.packing is SFTPacking.pad and not self.fixed_width:
            longest = max(len(ids) for ids, _ in rows) - 1  # sequence length of the inputs
            width = min(self.seq_len, -(-longest // self.pad_multiple) * self.pad_multiple) + 1
        tokens = np.full((len(rows), width), self.pad_id, np.int64)
        trained = np.zeros((len(rows), width), bool)
        for r, (ids, flags) in enumerate(rows):
            tokens[r, : len(ids)], trained[r, : len(ids)] = ids, flags
        labels = np.where(trained[:, 1:], tokens[:, 1:], IGNORE)
        return torch.from_numpy(tokens[:, :-1].copy()), torch.from_numpy(labels)

    # --------------------------------------------------------------------------------------
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rows is None or self._micro == self.micro_batches_per_step:
            self._next_global_batch()
        m = self.micro_batch_size
        rows = self._rows[self._micro * m : (self._micro + 1) * m]
        self._micro += 1
        return self._to_tensors(rows)

    def state_dict(self) -> dict[str, Any]:
        if self._rows is not None and self._micro < self.micro_batches_per_step:
            (epoch, index), micro = self._batch_start, self._micro
        else:
            epoch, index, micro = self._epoch, self._index, 0
        return {"epoch": epoch, "document": index, "micro_index": micro, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = {k: int(v) for k, v in state.items()}
        if state["seed"] != self.seed:
            raise ValueError(f"loader state was saved with seed {state['seed']}, this loader uses {self.seed}")
        self._epoch, self._index, self._rows, self._micro = state["epoch"], state["document"], None, 0
        if state["micro_index"]:
            self._next_global_batch()
            self._micro = state["micro_index"]


def build_sft_data(
    data_cfg: DataConfig,
    tokenizer,
    template: ChatTemplate,
    seq_len: int,
    global_batch_size: int,
    micro_batch_size: int,
    dp_rank: int = 0,
    dp_world: int = 1,
    seed: int = 0,
    pad_multiple: int = 1,
    fixed_width: bool = False,
) -> tuple[SFTLoader, Optional[Callable[[], SFTLoader]]]:
    """The train loader and a factory of validation loaders over the held-out conversations
    (fixed order, each call a fresh loader at the start)."""

    def encode(messages: list[Message]) -> tuple[list[int], list[bool]]:
        return encode_conversation(tokenizer, template, messages)

    common = dict(
        encode=encode, pad_id=tokenizer.eos_id, seq_len=seq_len, global_batch_size=global_batch_size,
        micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_world=dp_world, seed=seed,
        packing=data_cfg.sft_packing, overflow=data_cfg.sft_overflow, pad_multiple=pad_multiple, fixed_width=fixed_width,
    )
    train = SFTLoader(load_conversations(data_cfg, "train"), shuffle=True, **common)
    if data_cfg.val_fraction <= 0:
        return train, None
    val = load_conversations(data_cfg, "val")
    return train, lambda: SFTLoader(val, shuffle=False, **common)
