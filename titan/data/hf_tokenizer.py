"""A Hugging Face `tokenizer.json`, loaded with the `tokenizers` library.

`tokenizer.path` is the file or its directory. The special tokens come from
`tokenizer_config.json` beside it (`bos_token`, `eos_token`, `pad_token`: a string, or a dict
with `content`). Some models define no BOS (Qwen): the EOS token then also opens documents,
which keeps the packed stream's document framing `[bos] + tokens + [eos]` well defined.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from titan.config.errors import ConfigError
from titan.data.tokenizer import Tokenizer


def _token_text(value) -> Optional[str]:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


class HFTokenizer(Tokenizer):
    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer as Backend

        file = Path(path)
        if file.is_dir():
            file = file / "tokenizer.json"
        if not file.is_file():
            raise ConfigError("tokenizer.path", f"no tokenizer.json at {os.fspath(path)!r}; fetch one "
                              "with python -m titan.tools.download REPO --tokenizer-only")
        self.path = os.fspath(file)
        try:
            self._tok = Backend.from_file(self.path)
        except Exception as e:  # the Rust side raises plain Exception on a bad file
            raise ConfigError("tokenizer.path", f"cannot load {self.path!r} as a tokenizer.json: {e}") from e
        config_file = file.with_name("tokenizer_config.json")
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.eos_id = self._special(config, "eos_token", required=True)
        bos = self._special(config, "bos_token", required=False)
        self.bos_id = self.eos_id if bos is None else bos
        pad = self._special(config, "pad_token", required=False)
        self.pad_id = self.eos_id if pad is None else pad

    def _special(self, config: dict, key: str, required: bool) -> Optional[int]:
        text = _token_text(config.get(key))
        if text is None:
            if required:
                raise ConfigError("tokenizer.path", f"{self.path!r}: tokenizer_config.json beside it "
                                  f"names no {key}; the packer needs one to end documents")
            return None
        token_id = self._tok.token_to_id(text)
        if token_id is None:
            raise ConfigError("tokenizer.path", f"{key} {text!r} of tokenizer_config.json is not "
                              f"in the vocabulary of {self.path!r}")
        return int(token_id)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def load_hf_tokenizer(path: str) -> HFTokenizer:
    return HFTokenizer(path)
