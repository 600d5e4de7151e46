"""Tokenize a corpus once into a token store, for training with `data=tokens data.path=DIR`.

    python -m titan.tools.prepare_data data=files data.path='corpus/**/*.jsonl' out=DIR
    python -m titan.tools.prepare_data data=hf data.path=allenai/c4 data.hf_config=en \\
        tokenizer=hf tokenizer.path=TOKENIZER_DIR out=DIR workers=32

Every argument that is not one of this tool's keys is a Hydra override of the training config
(same `train` root and presets as `python -m titan.train`): `data=...` picks the source and
its train/val split (`data.val_fraction`, `data.max_documents`), `tokenizer=...` the tokenizer.
The tool's keys:

    out=DIR          the store directory (required)
    workers=N        tokenizing processes (default: all cores)
    shard_docs=N     documents per shard (default 1024)

Re-running an interrupted preparation resumes it: complete shards are kept (a shard is written
to a temporary name and renamed), the rest are written again, and the result is the same bytes
as an uninterrupted run. A finished store is left as it is. Exit status: 0 done, 2 config error.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from titan.config.errors import ConfigError

EXIT_OK, EXIT_CONFIG = 0, 2
TOOL_KEYS = {"out": str, "workers": int, "shard_docs": int}


def split_argv(argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    options, overrides = {}, []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if eq and key in TOOL_KEYS:
            try:
                options[key] = TOOL_KEYS[key](value)
            except ValueError:
                raise ConfigError(key, f"{value!r} is not a {TOOL_KEYS[key].__name__}") from None
        else:
            overrides.append(arg)
    if not options.get("out"):
        raise ConfigError("out", "say where to write the store: out=DIR")
    options.setdefault("workers", os.cpu_count() or 1)
    options.setdefault("shard_docs", 1024)
    if options["workers"] < 1:
        raise ConfigError("workers", f"must be >= 1, got {options['workers']}")
    if options["shard_docs"] < 1:
        raise ConfigError("shard_docs", f"must be >= 1, got {options['shard_docs']}")
    return options, overrides


def _plain(obj: Any) -> Any:
    """A dataclass as JSON-friendly values (Enums by value)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return getattr(obj, "value", obj)


# ---------------------------------------------------------------------------------------------
# shards: which documents, tokenized where
# ---------------------------------------------------------------------------------------------
def shard_texts(docs, shard_docs: int, done) -> Iterator[tuple[int, Optional[list[str]]]]:
    """(shard index, its texts) in order; texts is None for a shard already written, which is
    not read at all for a random-access source (a stream is still read past it)."""
    if hasattr(docs, "__len__") and hasattr(docs, "__getitem__"):
        n = len(docs)
        for index, start in enumerate(range(0, n, shard_docs)):
            if done(index):
                yield index, None
            else:
                yield index, [docs[i] for i in range(start, min(n, start + shard_docs))]
        return
    batch, index = [], 0
    for text in docs:
        batch.append(text)
        if len(batch) == shard_docs:
            yield index, None if done(index) else batch
            batch, index = [], index + 1
    if batch:
        yield index, None if done(index) else batch


_worker: dict[str, Any] = {}


def _init_worker(tokenizer_cfg) -> None:
    from titan.data.tokenizer import build_tokenizer

    _worker["tokenizer"] = build_tokenizer(tokenizer_cfg)


def _encode_and_write(root: str, split: str, index: int, texts: list[str], dtype: str) -> tuple[int, int]:
    import numpy as np

    from titan.data.store import encode_documents, write_shard

    tokens, offsets = encode_documents(_worker["tokenizer"], texts, np.dtype(dtype))
    write_shard(root, split, index, tokens, offsets)
    return len(texts), len(tokens)


class Progress:
    """Documents/s, tokens/s and ETA: a tqdm bar on a terminal, a line every `every` s otherwise."""

    def __init__(self, total_docs: Optional[int], every: float = 10.0, stream=sys.stderr):
        self.total = total_docs
        self.docs = self.tokens = 0
        self.t0 = self.last = time.perf_counter()
        self.every = every
        self.stream = stream
        self.bar = None
        if stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_docs, unit="doc", file=stream, dynamic_ncols=True)

    def update(self, docs: int, tokens: int, skipped: bool = False) -> None:
        self.docs += docs
        self.tokens += 0 if skipped else tokens
        now = time.perf_counter()
        if self.bar is not None:
            self.bar.update(docs)
            self.bar.set_postfix_str(f"{self.tokens / max(now - self.t0, 1e-9):,.0f} tok/s")
        elif now - self.last >= self.every:
            self.last = now
            print(self.line(now), file=self.stream, flush=True)

    def line(self, now: float) -> str:
        dt = max(now - self.t0, 1e-9)
        rate = self.docs / dt
        eta = ""
        if self.total and rate > 0:
            eta = f", ETA {time.strftime('%H:%M:%S', time.gmtime((self.total - self.docs) / rate))}"
        of = f"/{self.total}" if self.total else ""
        return (f"prepare_data: {self.docs}{of} documents, {rate:,.0f} docs/s, "
                f"{self.tokens / dt:,.0f} tokens/s{eta}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _prepare_split(pool, root: Path, split: str, docs, options, dtype: str, progress: Progress) -> dict:
    from titan.data.store import completed_shard

    shards: list[Optional[dict]] = []
    pending: deque = deque()

    def record(index: int, n_docs: int, n_tokens: int) -> None:
        shards.extend([None] * (index + 1 - len(shards)))
        shards[index] = {"documents": n_docs, "tokens": n_tokens}

    def finish_oldest() -> None:
        index, result = pending.popleft()
        n_docs, n_tokens = result.get()
        record(index, n_docs, n_tokens)
        progress.update(n_docs, n_tokens)

    for index, texts in shard_texts(docs, options["shard_docs"],
                                    lambda i: completed_shard(root, split, i) is not None):
        if texts is None:
            n_docs, n_tokens = completed_shard(root, split, index)
            record(index, n_docs, n_tokens)
            progress.update(n_docs, n_tokens, skipped=True)
            continue
        if pool is None:
            n_docs, n_tokens = _encode_and_write(str(root), split, index, texts, dtype)
            record(index, n_docs, n_tokens)
            progress.update(n_docs, n_tokens)
            continue
        pending.append((index, pool.apply_async(_encode_and_write, (str(root), split, index, texts, dtype))))
        if len(pending) >= 2 * options["workers"]:  # bounded: never hold the corpus in memory
            finish_oldest()
    while pending:
        finish_oldest()
    return {"shards": shards, "documents": sum(s["documents"] for s in shards),
            "tokens": sum(s["tokens"] for s in shards)}


def prepare(cfg, options: dict[str, Any]) -> dict:
    """Write (or finish) the store; returns its manifest."""
    import json

    from titan.data.sources import load_documents
    from titan.data.store import (FORMAT, MANIFEST, PLAN, VERSION, describe_tokenizer,
                                  token_dtype, tokenizer_identity, write_json_atomic)
    from titan.data.tokenizer import build_tokenizer

    from titan.config.schema import DataSource

    if cfg.data.source == DataSource.tokens or cfg.data.mix:
        raise ConfigError("data", "prepare_data reads documents: pick a document source "
                          "(data=embedded, files or hf), not a token store or a mixture")
    root = Path(os.path.expanduser(options["out"]))
    tokenizer = build_tokenizer(cfg.tokenizer)  # trains/caches the default one before workers start
    identity = tokenizer_identity(tokenizer)
    dtype = token_dtype(tokenizer.vocab_size).name
    data = _plain(asdict(cfg.data))
    data.pop("shuffle", None)  # a training-time choice: the store is in source order
    plan = {"format": FORMAT, "version": VERSION, "source": data, "tokenizer": identity,
            "tokenizer_config": _plain(asdict(cfg.tokenizer)), "dtype": dtype,
            "shard_docs": options["shard_docs"], "framing": "[bos] + tokens + [eos] per document"}
    if (root / PLAN).exists():
        before = json.loads((root / PLAN).read_text())
        if before != plan:
            changed = sorted(k for k in plan if before.get(k) != plan[k])
            raise ConfigError("out", f"{root} holds a preparation with other settings "
                              f"({', '.join(changed)}); use another out= or delete it")
        if (root / MANIFEST).exists():
            print(f"prepare_data: {root} is already complete", file=sys.stderr)
            return json.loads((root / MANIFEST).read_text())
    elif root.exists() and any(root.iterdir()):
        raise ConfigError("out", f"{root} exists and is not a token store; choose an empty or new directory")
    root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(root / PLAN, plan)
    for stale in root.glob("*/*.tmp"):  # left by a killed run; never looks complete
        stale.unlink()
    print(f"prepare_data: {cfg.data.source.value} -> {root} with {describe_tokenizer(identity)}, "
          f"{dtype}, {options['workers']} worker(s)", file=sys.stderr, flush=True)

    splits = ["train"] + (["val"] if cfg.data.val_fraction > 0 else [])
    sources = {s: load_documents(cfg.data, s) for s in splits}
    total = sum(len(d) for d in sources.values()) if all(hasattr(d, "__len__") for d in sources.values()) else cfg.data.max_documents
    progress = Progress(total)
    pool = None
    if options["workers"] > 1:
        pool = multiprocessing.get_context("spawn").Pool(options["workers"], _init_worker, (cfg.tokenizer,))
    else:
        _init_worker(cfg.tokenizer)
    started = time.perf_counter()
    try:
        result = {s: _prepare_split(pool, root, s, sources[s], options, dtype, progress) for s in splits}
    finally:
        progress.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    manifest = {**plan, "splits": result,
                "split_rule": "a document is held out when the blake2b hash of its name is "
                              "below source.val_fraction (titan.data.sources)",
                "documents": sum(r["documents"] for r in result.values()),
                "tokens": sum(r["tokens"] for r in result.values())}
    write_json_atomic(root / MANIFEST, manifest)
    dt = time.perf_counter() - started
    print(f"prepare_data: done: {manifest['documents']} documents, {manifest['tokens']} tokens "
          f"in {dt:.1f} s ({progress.tokens / max(dt, 1e-9):,.0f} tokens/s) -> {root}",
          file=sys.stderr, flush=True)
    return manifest


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return EXIT_OK
    try:
        from titan.tools.plan import compose

        options, overrides = split_argv(argv)
        prepare(compose(overrides), options)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        print("prepare_data: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
