"""README's "Your own data in three commands" runs as written.

The three commands are read from README.md and run in order in one bash session, from a
directory that looks like a clone, on a JSONL corpus under nested directories. No network here:
the Hub is a local cache holding the README's repo (a small `tokenizer.json` laid out as
huggingface_hub caches it, tests/test_hf_tokenizer.py) with HF_HUB_OFFLINE=1, read by the real
huggingface_hub. The training command gets CPU-sized overrides appended (Hydra: the last value
wins), as the guides' `$TINY` does; everything else is the README's text.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO
from tests.test_docs import clone_like
from tests.test_hf_tokenizer import TEXTS, hub_cache

TINY = ("model=llama3_tiny training.seq_len=32 training.global_batch_size=4 training.steps=2 "
        "training.val_interval=0 lr_schedule.warmup_steps=1 hydra.run.dir=run")


def readme_commands() -> list[str]:
    section = (REPO / "README.md").read_text().split("## Your own data in three commands", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1)
    return [line.split("   #")[0].strip() for line in block.splitlines() if line.strip()]


@pytest.mark.slow
def test_readme_three_commands(tmp_path):
    download, prepare, train = readme_commands()
    assert download.startswith("python -m titan.tools.download") and "--dir tok" in download
    assert "prepare_data" in prepare and "out=store" in prepare and "data.path=store" in train
    repo = download.split()[3]
    hub_cache(tmp_path / "hub", repo)
    work = tmp_path / "clone"
    work.mkdir()
    clone_like(work)
    for i, where in enumerate(["corpus/2025", "corpus/2026/web"]):  # the README's '**' recurses
        (work / where).mkdir(parents=True)
        docs = [f"{text} (document {i}.{k})" for k, text in enumerate(TEXTS[:40])]
        (work / where / "part.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("PYTHONPATH", None)
    script = "\n".join(["set -euo pipefail", download, prepare, f"{train} {TINY}"])
    proc = subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"

    assert (work / "tok" / "tokenizer.json").is_file() and (work / "tok" / "tokenizer_config.json").is_file()
    from tokenizers import Tokenizer

    manifest = json.loads((work / "store" / "manifest.json").read_text())
    vocab = Tokenizer.from_file(str(work / "tok" / "tokenizer.json")).get_vocab_size()
    assert manifest["documents"] == 80 and manifest["tokenizer"]["vocab_size"] == vocab, manifest
    records = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
