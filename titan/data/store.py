"""The token store: documents tokenized once (by `python -m titan.tools.prepare_data`), read by
memory map at training time.

Layout of a store directory:

    manifest.json                  written last: its presence means the store is complete
    prepare.json                   the preparation's settings (to resume or refuse a mismatch)
    train/00000.tokens.npy ...     flat tokens, uint16 when the vocabulary fits, else uint32
    train/00000.offsets.npy ...    int64 document starts in that shard, plus the end (n_docs + 1)
    val/...                        the held-out split, fixed at preparation time

Each document is framed as `[bos] + encode(text) + [eos]`, exactly as the on-the-fly loader
frames it, and the documents of a split are stored in source order, so the concatenated shards
of `train/` are the on-the-fly loader's unshuffled token stream. A shard holds a fixed number
of consecutive documents (`shard_docs`); it is written to a temporary name and renamed (offsets
first, tokens last), so a shard whose tokens file exists is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from titan.config.errors import ConfigError

FORMAT = "titan-token-store"
VERSION = 1
MANIFEST = "manifest.json"
PLAN = "prepare.json"
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_identity(tokenizer) -> dict[str, Any]:
    """What makes two tokenizers produce the same ids: class, specials, and the model file's hash
    (or, for a tokenizer without a file, the hash of the ids of a probe text)."""
    path = getattr(tokenizer, "path", None)
    if path and os.path.isfile(path):
        digest, name = file_sha256(path), os.path.basename(path)
    else:
        probe = "def f(x):\n    return x + 1  # héllo, wörld 123\n"
        digest = hashlib.sha256(str(tokenizer.encode(probe)).encode()).hexdigest()
        name = type(tokenizer).__name__
    return {"class": type(tokenizer).__name__, "file": name, "sha256": digest,
            "vocab_size": int(tokenizer.vocab_size), "bos_id": int(tokenizer.bos_id),
            "eos_id": int(tokenizer.eos_id)}


def describe_tokenizer(identity: dict[str, Any]) -> str:
    return (f"{identity['class']} {identity['file']} (vocab {identity['vocab_size']}, "
            f"sha256 {identity['sha256'][:12]})")


def frame(tokenizer, text: str) -> list[int]:
    return [tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id]


def encode_documents(tokenizer, texts: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(flat framed tokens, int64 offsets of length len(texts) + 1)."""
    pieces = [frame(tokenizer, t) for t in texts]
    offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
    np.cumsum([len(p) for p in pieces], out=offsets[1:])
    tokens = np.fromiter((i for p in pieces for i in p), dtype=dtype, count=int(offsets[-1]))
    return tokens, offsets


def shard_paths(root: str | os.PathLike, split: str, index: int) -> tuple[Path, Path]:
    base = Path(root) / split
    return base / f"{index:05d}.tokens.npy", base / f"{index:05d}.offsets.npy"


def _save_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_shard(root: str | os.PathLike, split: str, index: int, tokens: np.ndarray,
                offsets: np.ndarray) -> None:
    """Offsets first, tokens last: a tokens file only ever exists next to its offsets."""
    tokens_path, offsets_path = shard_paths(root, split, index)
    tokens_path.parent.mkdir(parents=True, exist_ok=True)
    _save_atomic(offsets_path, offsets)
    _save_atomic(tokens_path, tokens)


def completed_shard(root: str | os.PathLike, split: str, index: int) -> Optional[tuple[int, int]]:
    """(documents, tokens) of a shard already written, or None."""
    tokens_path, offsets_path = shard_paths(root, split, index)
    if not tokens_path.exists():
        return None
    offsets = np.load(offsets_path, mmap_mode="r")
    return len(offsets) - 1, int(offsets[-1])


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
def check_store_path(path: Optional[str]) -> Path:
    """The store directory, or a ConfigError naming data.path and the fix."""
    if not path or path == "???":
        raise ConfigError("data.path", "data=tokens needs data.path=DIR, a store written by "
                          "python -m titan.tools.prepare_data ... out=DIR")
    root = Path(os.path.expanduser(path))
    if not root.is_dir():
        raise ConfigError("data.path", f"no token store at {path!r} (not a directory); write one "
                          f"with python -m titan.tools.prepare_data data=... out={path}")
    if not (root / MANIFEST).is_file():
        hint = ("its preparation did not finish; re-run the same prepare_data command to resume it"
                if (root / PLAN).exists() else "write one with python -m titan.tools.prepare_data")
        raise ConfigError("data.path", f"{path!r} is not a complete token store (no {MANIFEST}): {hint}")
    return root


class SplitTokens:
    """One split of a store: its shards memory-mapped, read as one flat token array."""

    def __init__(self, root: Path, split: str, info: dict[str, Any]):
        self.split = split
        self.n_documents = int(info["documents"])
        self._shards = []
        starts = [0]
        for index in range(len(info["shards"])):
            tokens_path, _ = shard_paths(root, split, index)
            array = np.load(tokens_path, mmap_mode="r")
            self._shards.append(array)
            starts.append(starts[-1] + len(array))
        self._starts = np.asarray(starts, dtype=np.int64)
        self.n_tokens = int(self._starts[-1])
        if self.n_tokens != int(info["tokens"]):
            raise ConfigError("data.path", f"the {split} shards of {root} hold {self.n_tokens} "
                              f"tokens but the manifest says {info['tokens']}: the store is damaged")

    def read(self, start: int, n: int) -> np.ndarray:
        """Tokens [start, start + n) of the split's stream repeated forever, as int64."""
        out = np.empty(n, dtype=np.int64)
        filled = 0
        pos = start % self.n_tokens
        while filled < n:
            s = int(np.searchsorted(self._starts, pos, side="right")) - 1
            local = pos - int(self._starts[s])
            k = min(n - filled, len(self._shards[s]) - local)
            out[filled:filled + k] = self._shards[s][local:local + k]
            filled += k
            pos = (pos + k) % self.n_tokens
        return out


@dataclass
class TokenStore:
    root: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, path: Optional[str]) -> TokenStore:
        root = check_store_path(path)
        manifest = json.loads((root / MANIFEST).read_text())
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise ConfigError("data.path", f"{root} holds a {manifest.get('format')} store version "
                              f"{manifest.get('version')}; this titan reads {FORMAT} version {VERSION}")
        return cls(root, manifest)

    def split(self, name: str) -> Optional[SplitTokens]:
        info = self.manifest["splits"].get(name)
        if not info or not info["tokens"]:
            return None
        return SplitTokens(self.root, name, info)

    def check_tokenizer(self, tokenizer) -> None:
        """A store is only meaningful with the tokenizer that wrote it."""
        theirs, ours = self.manifest["tokenizer"], tokenizer_identity(tokenizer)
        keys = ("sha256", "vocab_size", "bos_id", "eos_id")
        if any(theirs[k] != ours[k] for k in keys):
            raise ConfigError(
                "tokenizer", f"the token store {self.root} was prepared with tokenizer "
                f"{describe_tokenizer(theirs)}, but this run uses {describe_tokenizer(ours)}; "
                "set tokenizer= to the store's tokenizer, or prepare the store again with this one")
