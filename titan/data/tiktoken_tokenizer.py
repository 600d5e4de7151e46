"""A tiktoken BPE file in the Llama 3 format, with Llama 3's pre-tokenizer and special tokens.

The file has one line per mergeable token: `base64(token bytes) rank`. Llama 3 appends 256
special tokens after the base vocabulary, so with its 128,000-token file BOS is 128000, EOS
128001 and the vocabulary 128,256; the same layout is used for any base size.
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Iterator, Sequence

from titan.data.tokenizer import Tokenizer

# Llama 3's pre-tokenizer: contractions, letter runs (with one leading non-letter), numbers in
# groups of up to three digits, punctuation runs, newlines, and whitespace.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

NUM_SPECIAL_TOKENS = 256
# The named specials at the start of the special range (Llama 3.1 layout); the rest are reserved.
_NAMED_SPECIALS = {
    0: "<|begin_of_text|>",
    1: "<|end_of_text|>",
    4: "<|finetune_right_pad_id|>",
    5: "<|step_id|>",
    6: "<|start_header_id|>",
    7: "<|end_header_id|>",
    8: "<|eom_id|>",
    9: "<|eot_id|>",
    10: "<|python_tag|>",
}

# tiktoken's pre-tokenizer regex and BPE get quadratic on very long runs of whitespace or of
# non-whitespace (a minified file, a megabyte of spaces): encode such runs in bounded pieces.
MAX_RUN_CHARS = 25_000
# The lookbehinds anchor each try at the start of a run, so the scan stays linear in the text.
_LONG_RUN = re.compile(r"(?<!\s)\s{%(n)d,}|(?<!\S)\S{%(n)d,}" % {"n": MAX_RUN_CHARS + 1})


def llama3_special_tokens() -> list[str]:
    """The 256 special token strings, in id order after the base vocabulary."""
    names, reserved = [], 0
    for i in range(NUM_SPECIAL_TOKENS):
        if i in _NAMED_SPECIALS:
            names.append(_NAMED_SPECIALS[i])
        else:
            names.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return names


def load_bpe_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Parse a `base64 rank` file into tiktoken's mergeable ranks."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token_b64, rank = line.split()
                ranks[base64.b64decode(token_b64, validate=True)] = int(rank)
            except ValueError as e:  # also binascii.Error, a ValueError subclass
                raise ValueError(
                    f"line {lineno} is not 'base64 rank' (is this a tiktoken BPE file?)"
                ) from e
    if not ranks:
        raise ValueError("the file holds no tokens")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError("token ranks are not 0..n-1")
    return ranks


def split_long_runs(text: str, max_run: int = MAX_RUN_CHARS) -> Iterator[str]:
    """Cut `text` so no piece holds a whitespace or non-whitespace run longer than `max_run`."""
    start = 0
    for m in _LONG_RUN.finditer(text):
        cut = m.start() + max_run
        while cut < m.end():
            yield text[start:cut]
            start = cut
            cut += max_run
    yield text[start:]


class TiktokenTokenizer(Tokenizer):
    def __init__(self, path: str | os.PathLike):
        import tiktoken

        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such file: {os.fspath(path)!r}")
        self.path = os.fspath(path)
        ranks = load_bpe_ranks(self.path)
        n_base = len(ranks)
        specials = {tok: n_base + i for i, tok in enumerate(llama3_special_tokens())}
        self._enc = tiktoken.Encoding(
            name=os.path.basename(self.path),
            pat_str=LLAMA3_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=specials,
        )
        self.vocab_size = n_base + NUM_SPECIAL_TOKENS
        self.bos_id = specials["<|begin_of_text|>"]
        self.eos_id = specials["<|end_of_text|>"]
        self.special_tokens = specials

    def encode(self, text: str) -> list[int]:
        # encode_ordinary: special-token text inside documents is plain text, never a control id.
        if len(text) <= MAX_RUN_CHARS:
            return self._enc.encode_ordinary(text)
        ids: list[int] = []
        for piece in split_long_runs(text):
            ids.extend(self._enc.encode_ordinary(piece))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._enc.decode([int(i) for i in ids])
