"""Tokenizers: the default (trained + cached) sentencepiece model, sentencepiece files, tiktoken
files in the Llama 3 format, and the config errors of `build_tokenizer`."""

import base64
import os
import subprocess
import sys
import time

import pytest

from titan.config.errors import ConfigError
from titan.config.schema import TokenizerConfig, TokenizerKind
from titan.data.default_tokenizer import default_tokenizer_path
from titan.data.tiktoken_tokenizer import (
    MAX_RUN_CHARS,
    TiktokenTokenizer,
    llama3_special_tokens,
    split_long_runs,
)
from titan.data.tokenizer import build_tokenizer

SAMPLES = [
    "",
    "def f(x):\n    if x:\n\treturn x + 1  # two  spaces\n\n\n",
    "héllo wörld, 日本語のテキスト 🙂 naïve café",
    "   leading and trailing   \n",
    "numbers 1234567 3.14159 0xFF",
]


@pytest.fixture(scope="session")
def default_cfg(tmp_path_factory):
    # One cache dir per session (test_data.py uses the same one): the model trains once.
    return TokenizerConfig(cache_dir=str(tmp_path_factory.getbasetemp() / "titan-tokenizers"))


@pytest.fixture(scope="session")
def default_tok(default_cfg):
    return build_tokenizer(default_cfg)


def test_default_tokenizer_round_trips(default_tok):
    assert default_tok.vocab_size == 2048
    assert len({default_tok.bos_id, default_tok.eos_id}) == 2
    for text in SAMPLES:
        ids = default_tok.encode(text)
        assert all(0 <= i < default_tok.vocab_size for i in ids)
        assert default_tok.bos_id not in ids and default_tok.eos_id not in ids
        assert default_tok.decode(ids) == text


def test_default_tokenizer_compresses_python(default_tok):
    code = "import os\n\n\nclass Foo:\n    def __init__(self):\n        self.value = None\n"
    assert len(code) / len(default_tok.encode(code)) > 2.5  # chars per token


def test_default_tokenizer_is_cached(default_cfg, default_tok, capfd):
    path = default_tokenizer_path(default_cfg)
    assert path.is_file()
    start = time.perf_counter()
    again = build_tokenizer(default_cfg)
    assert time.perf_counter() - start < 3.0  # a load, not a training run (~40 s); margin for a loaded CI
    assert "training" not in capfd.readouterr().err
    assert again.path == str(path)
    assert again.encode(SAMPLES[1]) == default_tok.encode(SAMPLES[1])


def test_default_tokenizer_trains_once_across_processes(tmp_path):
    # Two processes race for an empty cache: the lock lets one train, the other reuses it.
    code = (
        "from titan.config.schema import TokenizerConfig\n"
        "from titan.data.tokenizer import build_tokenizer\n"
        f"t = build_tokenizer(TokenizerConfig(vocab_size=512, cache_dir={str(tmp_path)!r}))\n"
        "print(t.vocab_size, t.encode('x = 1'))\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert outs[0][0] == outs[1][0] and outs[0][0].startswith("512 ")
    stderr = "".join(err for _, err in outs)
    assert stderr.count("titan: training the default tokenizer") == 1
    assert "trained in" in stderr
    assert [p.suffix for p in tmp_path.iterdir() if p.suffix != ".lock"] == [".model"]


def test_default_tokenizer_rejects_tiny_vocab(tmp_path):
    with pytest.raises(ConfigError) as e:
        build_tokenizer(TokenizerConfig(vocab_size=100, cache_dir=str(tmp_path)))
    assert e.value.key == "tokenizer.vocab_size"


def test_sentencepiece_file(default_cfg, default_tok):
    path = str(default_tokenizer_path(default_cfg))
    tok = build_tokenizer(TokenizerConfig(kind=TokenizerKind.sentencepiece, path=path))
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (2048, 1, 2)
    assert tok.encode(SAMPLES[2]) == default_tok.encode(SAMPLES[2])


def _write_tiktoken_file(path, merges=(b"th", b"he", b"the", b" t", b" the", b"  ")):
    tokens = [bytes([b]) for b in range(256)] + list(merges)
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens)))
    return len(tokens)


def test_tiktoken_tokenizer(tmp_path):
    n = _write_tiktoken_file(tmp_path / "tok.model")
    cfg = TokenizerConfig(kind=TokenizerKind.tiktoken, path=str(tmp_path / "tok.model"))
    tok = build_tokenizer(cfg)
    assert isinstance(tok, TiktokenTokenizer)
    assert tok.vocab_size == n + 256
    assert (tok.bos_id, tok.eos_id) == (n, n + 1)
    assert tok.special_tokens["<|eot_id|>"] == n + 9
    assert tok.special_tokens["<|start_header_id|>"] == n + 6
    ids = tok.encode("the other")
    assert ids[0] == 256 + 2  # b"the" is one merged token
    assert tok.decode(ids) == "the other"
    # Special-token text inside a document is ordinary text, never a control id.
    ids = tok.encode("<|end_of_text|>")
    assert tok.eos_id not in ids and tok.decode(ids) == "<|end_of_text|>"
    assert tok.decode([tok.bos_id]) == "<|begin_of_text|>"
    for text in SAMPLES:
        assert tok.decode(tok.encode(text)) == text


def test_llama3_special_token_layout():
    names = llama3_special_tokens()
    assert len(names) == len(set(names)) == 256
    assert names[:2] == ["<|begin_of_text|>", "<|end_of_text|>"]
    assert names[9] == "<|eot_id|>" and names[255] == "<|reserved_special_token_246|>"


def test_tiktoken_long_runs_are_fast_and_exact(tmp_path):
    _write_tiktoken_file(tmp_path / "tok.model")
    tok = TiktokenTokenizer(tmp_path / "tok.model")
    text = "a" * 120_000 + " " * 90_000 + "the end\n" * 100
    start = time.perf_counter()
    ids = tok.encode(text)
    assert time.perf_counter() - start < 5.0
    assert tok.decode(ids) == text


def test_split_long_runs():
    text = "x" * (2 * MAX_RUN_CHARS + 7) + " " * (MAX_RUN_CHARS + 1) + "end"
    pieces = list(split_long_runs(text))
    assert "".join(pieces) == text
    assert len(pieces) > 1
    for piece in pieces:
        assert max(len(r) for r in piece.split(" ")) <= MAX_RUN_CHARS
        assert len(piece) - len(piece.lstrip(" ").rstrip(" ")) <= 2 * MAX_RUN_CHARS
    assert list(split_long_runs("short text")) == ["short text"]


@pytest.mark.parametrize("kind", [TokenizerKind.sentencepiece, TokenizerKind.tiktoken])
def test_tokenizer_path_errors(tmp_path, kind):
    with pytest.raises(ConfigError, match="tokenizer.path") as e:
        build_tokenizer(TokenizerConfig(kind=kind, path=None))
    assert e.value.key == "tokenizer.path"
    with pytest.raises(ConfigError, match="no such file") as e:
        build_tokenizer(TokenizerConfig(kind=kind, path=str(tmp_path / "missing.model")))
    assert e.value.key == "tokenizer.path"
    corrupt = tmp_path / "corrupt.model"
    corrupt.write_bytes(b"\x00\x01 not a model \xff\n" * 10)
    with pytest.raises(ConfigError) as e:
        build_tokenizer(TokenizerConfig(kind=kind, path=str(corrupt)))
    assert e.value.key == "tokenizer.path"


def test_wrong_kind_hint(tmp_path, default_cfg):
    path = str(default_tokenizer_path(default_cfg))  # a sentencepiece file read as tiktoken
    with pytest.raises(ConfigError, match="tokenizer.kind=sentencepiece"):
        build_tokenizer(TokenizerConfig(kind=TokenizerKind.tiktoken, path=path))


def test_damaged_cache_entry_is_retrained(tmp_path):
    cfg = TokenizerConfig(vocab_size=512, cache_dir=str(tmp_path))
    path = default_tokenizer_path(cfg)
    path.write_bytes(b"truncated")
    tok = build_tokenizer(cfg)
    assert tok.vocab_size == 512 and tok.decode(tok.encode("x = 1\n")) == "x = 1\n"
