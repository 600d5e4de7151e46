"""tokenizer=hf (a tokenizer.json through the `tokenizers` library) and titan.tools.download.

No network here: the Hub is a local directory laid out like its cache (HF_HUB_CACHE with
models--ORG--NAME/refs and snapshots), read by the real huggingface_hub in offline mode; the
error paths run for real (offline, an unreachable endpoint, a local server answering as the Hub
does for a gated repo, a repo without tokenizer.json).
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import REPO
from titan.config.errors import ConfigError
from titan.config.schema import DataConfig, DataSource, TokenizerConfig, TokenizerKind
from titan.data.loader import build_data
from titan.data.tokenizer import build_tokenizer

TEXTS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.",
         "import os\nprint(os.getcwd())\n", "Hello, world! 12345"] * 20
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"


def write_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "pad_token": None,
         "tokenizer_class": "PreTrainedTokenizerFast"}))


def hub_cache(root: Path, repo: str, with_tokenizer: bool = True) -> Path:
    """A Hub cache entry for `repo` at revision main, as huggingface_hub lays it out."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    entry = root / ("models--" + repo.replace("/", "--"))
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)
    snapshot = entry / "snapshots" / commit
    if with_tokenizer:
        write_tokenizer(snapshot)
    else:
        snapshot.mkdir(parents=True)
        (snapshot / "config.json").write_text("{}")
    return snapshot


def run_download(*args: str, env: dict) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    return subprocess.run([sys.executable, "-m", "titan.tools.download", *args], cwd=REPO,
                          env={**full, **env}, capture_output=True, text=True, timeout=120)


def test_download_from_local_cache_then_load(tmp_path):
    cache = tmp_path / "hub"
    snapshot = hub_cache(cache, "org/tiny")
    done = run_download("org/tiny", "--tokenizer-only", env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).resolve() == snapshot.resolve()

    tok = build_tokenizer(TokenizerConfig(kind=TokenizerKind.hf, path=done.stdout.strip()))
    # Checked against transformers' own loader of the same directory.
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(snapshot))
    text = "def add(x, y):\n    return x + y  # héllo"
    assert tok.encode(text) == reference.encode(text, add_special_tokens=False)
    assert (tok.bos_id, tok.eos_id) == (reference.bos_token_id, reference.eos_token_id)
    assert tok.vocab_size == len(reference)
    assert tok.decode(tok.encode(text)) == text
    # the file itself works too
    assert build_tokenizer(TokenizerConfig(kind=TokenizerKind.hf, path=str(snapshot / "tokenizer.json"))).eos_id == tok.eos_id


def test_missing_or_bad_tokenizer_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no tokenizer.json") as e:
        build_tokenizer(TokenizerConfig(kind=TokenizerKind.hf, path=str(tmp_path)))
    assert e.value.key == "tokenizer.path"
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot load"):
        build_tokenizer(TokenizerConfig(kind=TokenizerKind.hf, path=str(tmp_path)))


def test_download_errors_are_one_line(tmp_path):
    cache = {"HF_HUB_CACHE": str(tmp_path / "hub")}
    offline = run_download("org/absent", "--tokenizer-only", env={**cache, "HF_HUB_OFFLINE": "1"})
    unreachable = run_download("org/absent", "--tokenizer-only",
                               env={**cache, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "2"})
    hub_cache(tmp_path / "hub", "org/weights-only", with_tokenizer=False)
    no_file = run_download("org/weights-only", "--tokenizer-only", env={**cache, "HF_HUB_OFFLINE": "1"})
    for proc, says in ((offline, "HF_HUB_OFFLINE is set"), (unreachable, "cannot be reached"),
                       (no_file, "has no tokenizer.json")):
        assert proc.returncode == 1 and says in proc.stderr, proc.stderr
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


class GatedHub(http.server.BaseHTTPRequestHandler):
    """Answers every request as the Hub answers for a gated repo without an accepted license."""

    def do_GET(self):
        self.send_response(403)
        self.send_header("X-Error-Code", "GatedRepo")
        self.send_header("X-Error-Message", "Access to this model is restricted.")
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"error": "gated"}')

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


def test_gated_repo_without_token(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), GatedHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        proc = run_download("org/gated", "--tokenizer-only", env={
            "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}"})
    finally:
        server.shutdown()
    assert proc.returncode == 1 and "gated repo" in proc.stderr and "HF_TOKEN" in proc.stderr, proc.stderr


def test_large_vocabulary_store_uses_uint32(tmp_path):
    """A vocabulary over 65,536 ids: the store's tokens are uint32 and read back the same stream."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(70_000)]
    vocab = {BOS: 0, EOS: 1, "[UNK]": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    tok.save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": BOS, "eos_token": EOS}))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    with open(corpus / "docs.jsonl", "w") as f:
        for _ in range(30):
            f.write(json.dumps({"text": " ".join(rng.choice(words, 50))}) + "\n")

    from titan.tools.plan import compose
    from titan.tools.prepare_data import prepare

    overrides = ["data=files", f"data.path={corpus}", "tokenizer=hf", f"tokenizer.path={tok_dir}"]
    cfg = compose(overrides)
    prepare(cfg, {"out": str(tmp_path / "store"), "workers": 1, "shard_docs": 8})
    assert json.loads((tmp_path / "store" / "manifest.json").read_text())["dtype"] == "uint32"
    tokenizer = build_tokenizer(cfg.tokenizer)
    fly, _ = build_data(DataConfig(source=DataSource.files, path=str(corpus), shuffle=False), tokenizer, 16, 4, 4)
    store, _ = build_data(DataConfig(source=DataSource.tokens, path=str(tmp_path / "store"), shuffle=False), tokenizer, 16, 4, 4)
    import torch

    a = torch.cat([fly.next_batch()[0] for _ in range(5)])
    b = torch.cat([store.next_batch()[0] for _ in range(5)])
    assert a.equal(b) and int(a.max()) > 65_535
