"""Document sources: which texts make up the corpus, and which of them are held out.

`load_documents(cfg, split)` returns either
- an `IndexedDocuments` (embedded and files sources): a random-access sequence that reads each
  document only when asked, so the loader can shuffle document order per epoch and resume at
  any document without reading the ones before it; or
- a `StreamingDocuments` (hf source): re-iterable in a fixed stream order.

The train/val split is a stable hash of each document's name (its path relative to the glob's
base, `path:line` / `path:row` for jsonl/parquet, its stream index for hf), so it does not
depend on file order, rank or process. `max_documents` caps the corpus before the split.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence

from titan.config.errors import ConfigError
from titan.config.schema import DataConfig, DataSource

SPLITS = ("train", "val")


def unit_hash(name: str) -> float:
    """A stable pseudo-random number in [0, 1) for `name` (the same on every machine)."""
    digest = hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def is_held_out(name: str, val_fraction: float) -> bool:
    return unit_hash(name) < val_fraction


class IndexedDocuments(Sequence):
    """Named documents whose text is read lazily by index."""

    def __init__(self, names: list[str], read: Callable[[int], str], what: str = "documents"):
        self.names = names
        self._read = read
        self.what = what  # for error messages: where these documents come from

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> str:  # type: ignore[override]
        if not -len(self.names) <= i < len(self.names):
            raise IndexError(i)
        return self._read(i % len(self.names))

    def subset(self, indices: Sequence[int]) -> IndexedDocuments:
        idx = list(indices)
        names = [self.names[i] for i in idx]
        return IndexedDocuments(names, lambda j: self._read(idx[j]), self.what)


class StreamingDocuments:
    """Documents from a stream, in stream order; every `iter()` starts a fresh pass."""

    def __init__(self, open_stream: Callable[[], Iterable[str]], split: str, val_fraction: float,
                 max_documents: int | None, what: str, open_resumable=None):
        self._open = open_stream
        # Optional: open_resumable(dataset_state or None) -> (iterator of texts, get_state), for
        # sources that can restart from their own state (datasets' IterableDataset.state_dict).
        self.open_resumable = open_resumable
        self.split = split
        self.val_fraction = val_fraction
        self.max_documents = max_documents
        self.what = what

    def __iter__(self) -> Iterator[str]:
        want_val = self.split == "val"
        yielded = 0
        for index, text in enumerate(self._open()):
            if self.max_documents is not None and index >= self.max_documents:
                break
            if is_held_out(str(index), self.val_fraction) == want_val:
                yielded += 1
                yield text
        if yielded == 0:
            raise ConfigError(
                "data.val_fraction" if want_val else "data.path",
                f"the {self.split} split of {self.what} is empty "
                f"(val_fraction={self.val_fraction}, max_documents={self.max_documents})",
            )


class StreamCursor:
    """A pass over a resumable stream's `split` documents that can report where it is, as a
    JSON string (the raw record index and the dataset's own state), and restart from there
    without re-reading what came before."""

    def __init__(self, docs: StreamingDocuments, state: str | None = None):
        import json

        saved = json.loads(state) if state else {"index": 0, "dataset": None}
        self._docs = docs
        self.index = saved["index"]  # raw records consumed so far
        self._records, self._get_state = docs.open_resumable(saved["dataset"])

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        want_val = self._docs.split == "val"
        for text in self._records:
            index = self.index
            self.index += 1
            if self._docs.max_documents is not None and index >= self._docs.max_documents:
                raise StopIteration
            if is_held_out(str(index), self._docs.val_fraction) == want_val:
                return text
        raise StopIteration

    def state(self) -> str:
        import json

        return json.dumps({"index": self.index, "dataset": self._get_state()}, sort_keys=True)


def split_indexed(docs: IndexedDocuments, split: str, val_fraction: float) -> IndexedDocuments:
    """The `split` part of `docs` under the hash rule.

    Small corpora (a handful of files) would often get no validation document at all, so when
    the rule holds out none, or all, of two or more documents, the single document with the
    smallest hash is held out instead. A corpus of one document is split inside it: its last
    `val_fraction` of text is held out (see `split_text`).
    """
    if val_fraction > 0 and len(docs) == 1:
        return split_text(docs, split, val_fraction)
    hashes = [unit_hash(n) for n in docs.names]
    val = {i for i, h in enumerate(hashes) if h < val_fraction}
    if val_fraction > 0 and len(docs) >= 2 and len(val) in (0, len(docs)):
        val = {min(range(len(docs)), key=hashes.__getitem__)}
    picked = [i for i in range(len(docs)) if (i in val) == (split == "val")]
    if not picked:
        if split == "val":
            raise ConfigError(
                "data.val_fraction",
                f"nothing to hold out for validation from {docs.what} ({len(docs)} document(s), "
                f"val_fraction={val_fraction}); add documents, or set data.val_fraction=0 "
                "and training.val_interval=0",
            )
        raise ConfigError("data.path", f"no training documents in {docs.what}")
    return docs.subset(picked)


def split_text(docs: IndexedDocuments, split: str, val_fraction: float) -> IndexedDocuments:
    """Train on the first (1 - val_fraction) of a single document's text, validate on the rest.

    The cut is by characters (so it does not depend on the tokenizer), moved to the next line
    break when one is near, and never leaves either part empty."""
    name, text = docs.names[0], docs[0]
    cut = int(len(text) * (1 - val_fraction))
    newline = text.find("\n", cut, cut + max(1, len(text) // 100))
    cut = newline + 1 if newline >= 0 else cut
    if not 0 < cut < len(text):
        raise ConfigError(
            "data.val_fraction",
            f"{docs.what} holds one document of {len(text)} characters: too little to hold out "
            f"{val_fraction:.0%} for validation; add text, or set data.val_fraction=0 (no validation)",
        )
    lo, hi = (0, cut) if split == "train" else (cut, None)
    return IndexedDocuments([f"{name}[{lo}:{hi if hi is not None else ''}]"], lambda _i: docs[0][lo:hi], docs.what)


def load_documents(cfg: DataConfig, split: str) -> IndexedDocuments | StreamingDocuments:
    """The documents of `split` ("train" or "val") of the corpus `cfg` names."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise ConfigError("data.val_fraction", f"must be in [0, 1), got {cfg.val_fraction}")
    if cfg.max_documents is not None and cfg.max_documents < 1:
        raise ConfigError("data.max_documents", f"must be >= 1 or null, got {cfg.max_documents}")
    source = DataSource(cfg.source)

    if source == DataSource.hf:
        from titan.data.hf_source import hf_documents

        return hf_documents(cfg, split)

    if source == DataSource.embedded:
        from titan.data.embedded import embedded_documents

        docs = embedded_documents()
    else:
        from titan.data.files import file_documents

        docs = file_documents(cfg.path, cfg.text_field)
    if cfg.max_documents is not None:
        docs = docs.subset(range(min(cfg.max_documents, len(docs))))
    return split_indexed(docs, split, cfg.val_fraction)
