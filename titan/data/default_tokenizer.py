"""titan's default tokenizer: a sentencepiece BPE model trained on the embedded corpus on first
use, then cached.

Training reads a fixed, bounded sample (documents in stable-hash order, skipping those the
default validation split holds out) and takes a second or two. The model uses byte fallback, so
any text encodes, and identity normalization without whitespace folding, so indentation and
newlines survive a round trip. The cache file name hashes the vocabulary size, this recipe and
the sample text, so another Python version (another stdlib) gets its own model. Concurrent
processes (ranks, parallel tests) serialize on a lock file and install the model with an atomic
rename, so nobody ever reads a half-written file.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

from titan.config.errors import ConfigError
from titan.config.load import cache_dir as titan_cache_dir
from titan.config.schema import DataConfig, TokenizerConfig
from titan.data.tokenizer import SentencePieceTokenizer

RECIPE = "titan-spm-bpe-v1"  # change when the options or the sampling below change
SAMPLE_CHARS = 4_000_000
CHUNK_CHARS = 2_000  # sentencepiece trains on "sentences"; chunks of whole lines keep newlines
MIN_VOCAB = 512  # 256 byte pieces + 3 controls + the corpus's characters + some merges

_TRAINER_OPTIONS = dict(
    model_type="bpe",
    byte_fallback=True,
    character_coverage=0.9995,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    allow_whitespace_only_pieces=True,  # indentation becomes a few tokens
    split_digits=True,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    max_sentence_length=4 * CHUNK_CHARS + 16,  # bytes; a chunk is at most 4 bytes per char
    minloglevel=2,  # silence sentencepiece's own log; titan prints one line instead
)


def cache_dir(cfg: TokenizerConfig) -> Path:
    """tokenizer.cache_dir, else titan's per-machine cache ($TITAN_CACHE_DIR or ~/.cache/titan)."""
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else titan_cache_dir("tokenizers")


def _chunks(text: str, limit: int = CHUNK_CHARS) -> list[str]:
    out, buf = [], ""
    for line in text.splitlines(keepends=True):
        while len(line) > limit:  # a single very long line: cut it
            out.append(line[:limit])
            line = line[limit:]
        if len(buf) + len(line) > limit and buf:
            out.append(buf)
            buf = ""
        buf += line
    if buf:
        out.append(buf)
    return out


@functools.lru_cache(maxsize=1)
def training_sample() -> tuple[str, ...]:
    """A deterministic ~SAMPLE_CHARS slice of the embedded train split, as training chunks."""
    from titan.data.embedded import embedded_documents
    from titan.data.sources import unit_hash

    docs = embedded_documents()
    held_out = DataConfig().val_fraction
    order = sorted(range(len(docs)), key=lambda i: unit_hash(docs.names[i]))
    sample, total = [], 0
    for i in order:
        if unit_hash(docs.names[i]) < held_out:
            continue
        text = docs[i]
        sample.extend(_chunks(text))
        total += len(text)
        if total >= SAMPLE_CHARS:
            break
    return tuple(sample)


def _sample_key(vocab_size: int, sample: tuple[str, ...]) -> str:
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{RECIPE}|{vocab_size}|{sys.version_info[0]}.{sys.version_info[1]}|".encode())
    for chunk in sample:
        h.update(chunk.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


@contextlib.contextmanager
def _file_lock(path: Path):
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the atomic rename alone keeps readers safe
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _train(sample: tuple[str, ...], vocab_size: int, dest: Path) -> None:
    import sentencepiece as spm

    mb = sum(len(s) for s in sample) / 1e6
    print(f"titan: training the default tokenizer (sentencepiece BPE, vocab {vocab_size}) on "
          f"{mb:.1f} MB of Python's own sources; cached at {dest}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sample), model_writer=f, vocab_size=vocab_size,
                num_threads=min(8, os.cpu_count() or 1), **_TRAINER_OPTIONS,
            )
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache may be shared
        os.replace(tmp, dest)
    except RuntimeError as e:  # e.g. a vocabulary too large for the sample
        raise ConfigError("tokenizer.vocab_size", f"cannot train a {vocab_size}-token "
                          f"tokenizer on the embedded corpus: {e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    print(f"titan: tokenizer trained in {time.perf_counter() - start:.1f} s",
          file=sys.stderr, flush=True)


def default_tokenizer_path(cfg: TokenizerConfig) -> Path:
    """Path of the cached default model for `cfg`, training it first if it is missing."""
    if cfg.vocab_size < MIN_VOCAB:
        raise ConfigError("tokenizer.vocab_size", f"must be at least {MIN_VOCAB} for the "
                          f"default tokenizer, got {cfg.vocab_size}")
    sample = training_sample()
    directory = cache_dir(cfg)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"default-bpe{cfg.vocab_size}-{_sample_key(cfg.vocab_size, sample)}.model"
    if not path.exists():
        with _file_lock(path.with_name(path.name + ".lock")):
            if not path.exists():  # another process may have trained it while we waited
                _train(sample, cfg.vocab_size, path)
    return path


def default_tokenizer(cfg: TokenizerConfig) -> SentencePieceTokenizer:
    path = default_tokenizer_path(cfg)
    try:
        return SentencePieceTokenizer(path)
    except ValueError:  # damaged cache entry (not from us: we rename complete files only)
        with _file_lock(path.with_name(path.name + ".lock")):
            _train(training_sample(), cfg.vocab_size, path)
        return SentencePieceTokenizer(path)
