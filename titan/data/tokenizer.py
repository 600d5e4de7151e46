"""The tokenizer interface, the sentencepiece implementation, and `build_tokenizer`.

The trainer needs only five things from a tokenizer: the vocabulary size (to size the embedding),
the BOS/EOS ids (to frame documents when packing) and encode/decode. `encode` never adds BOS/EOS:
the packer decides where they go.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence

from titan.config.errors import ConfigError
from titan.config.schema import TokenizerConfig, TokenizerKind


class Tokenizer(ABC):
    vocab_size: int
    bos_id: int
    eos_id: int

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` (special tokens included as their text, where they have one)."""


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece `.model` file (Llama 2 style, or titan's default)."""

    def __init__(self, path: str | os.PathLike):
        import sentencepiece as spm

        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such file: {os.fspath(path)!r}")
        self.path = os.fspath(path)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(self.path)
        except (OSError, RuntimeError) as e:  # sentencepiece raises OSError for a bad proto
            raise ValueError(f"not a sentencepiece model: {self.path!r} ({e})") from e
        self.vocab_size = int(self._sp.vocab_size())
        self.bos_id = int(self._sp.bos_id())
        self.eos_id = int(self._sp.eos_id())
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"sentencepiece model {self.path!r} defines no BOS/EOS piece")

    def encode(self, text: str) -> list[int]:
        return self._sp.EncodeAsIds(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.DecodeIds([int(i) for i in ids])


def build_tokenizer(cfg: TokenizerConfig) -> Tokenizer:
    """The tokenizer named by `cfg`; config mistakes become a ConfigError naming the key."""
    kind = TokenizerKind(cfg.kind)
    if kind == TokenizerKind.default:
        from titan.data.default_tokenizer import default_tokenizer

        return default_tokenizer(cfg)

    if not cfg.path:
        raise ConfigError(
            "tokenizer.path", f"tokenizer.kind={kind.value} needs a model file; set tokenizer.path"
        )
    path = os.path.expanduser(cfg.path)
    if kind == TokenizerKind.hf:
        from titan.data.hf_tokenizer import load_hf_tokenizer

        return load_hf_tokenizer(path)
    if not os.path.isfile(path):
        raise ConfigError("tokenizer.path", f"no such file: {path!r}")
    try:
        if kind == TokenizerKind.sentencepiece:
            return SentencePieceTokenizer(path)
        from titan.data.tiktoken_tokenizer import TiktokenTokenizer

        return TiktokenTokenizer(path)
    except (OSError, ValueError) as e:
        other = "tiktoken" if kind == TokenizerKind.sentencepiece else "sentencepiece"
        raise ConfigError(
            "tokenizer.path",
            f"cannot load {path!r} as a {kind.value} tokenizer: {e}. "
            f"If it is a {other} file, set tokenizer.kind={other}",
        ) from e
