"""The token store: prepare_data writes it, data=tokens trains from it.

What must hold: with shuffle=false the store's stream is the on-the-fly stream (same documents,
order, split and packing); each rank reads only its own windows (a cost flat in the world size)
while the global stream does not depend on the layout; resume is exact, also on another dp
degree; an interrupted preparation (kill -9) finishes into the same bytes.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import REPO, run_titan
from titan.config.errors import ConfigError
from titan.config.schema import DataConfig, DataSource
from titan.data.loader import build_data
from titan.data.store import TokenStore
from titan.data.store_loader import StoreLoader
from titan.data.tokenizer import build_tokenizer
from titan.tools.plan import compose
from titan.tools.prepare_data import main as prepare_main
from titan.tools.prepare_data import prepare

DOCS = ["data.max_documents=40", "data.val_fraction=0.1"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("store") / "s"
    prepare(compose(DOCS), {"out": str(out), "workers": 1, "shard_docs": 7})
    return out


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(compose([]).tokenizer)


def collect(loader, steps: int) -> torch.Tensor:
    return torch.cat([torch.cat(loader.next_batch(), dim=1) for _ in range(steps * loader.micro_batches_per_step)])


def global_batches(data_cfg, tokenizer, dp_world: int, steps: int, **kw) -> torch.Tensor:
    """Inputs of `steps` global batches, concatenated over dp ranks in rank order."""
    per_rank = []
    for rank in range(dp_world):
        loader, _ = build_data(data_cfg, tokenizer, 32, 8, kw.get("micro", 2), rank, dp_world, 5)
        per_rank.append([loader.next_batch()[0] for _ in range(steps * loader.micro_batches_per_step)])
    micro = len(per_rank[0]) // steps
    return torch.cat([torch.cat(per_rank[r][s * micro:(s + 1) * micro])
                      for s in range(steps) for r in range(dp_world)])


def test_manifest_describes_the_store(store, tokenizer):
    m = json.loads((store / "manifest.json").read_text())
    assert m["dtype"] == "uint16" and m["tokenizer"]["vocab_size"] == tokenizer.vocab_size
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == 40 == m["documents"]
    assert len(m["splits"]["train"]["shards"]) == -(-m["splits"]["train"]["documents"] // 7)
    tokens = np.load(store / "train" / "00000.tokens.npy")
    offsets = np.load(store / "train" / "00000.offsets.npy")
    assert tokens.dtype == np.uint16 and offsets[-1] == len(tokens) and len(offsets) == 8
    assert tokens[0] == tokenizer.bos_id and tokens[offsets[1] - 1] == tokenizer.eos_id


def test_unshuffled_store_stream_equals_on_the_fly(store, tokenizer):
    """Same documents, order, split and packing, across an epoch boundary, train and val."""
    fly = DataConfig(max_documents=40, val_fraction=0.1, shuffle=False)
    tok = DataConfig(source=DataSource.tokens, path=str(store), shuffle=False)
    train_tokens = TokenStore.open(str(store)).split("train").n_tokens
    steps = train_tokens // (8 * 33) + 2  # past the end of the first epoch
    assert torch.equal(global_batches(fly, tokenizer, 1, steps), global_batches(tok, tokenizer, 1, steps))
    _, fly_val = build_data(fly, tokenizer, 32, 8, 2, 0, 1, 5)
    _, tok_val = build_data(tok, tokenizer, 32, 8, 2, 0, 1, 5)
    assert torch.equal(collect(fly_val(), 3), collect(tok_val(), 3))


@pytest.mark.parametrize("shuffle", [False, True])
def test_global_stream_independent_of_layout(store, tokenizer, shuffle):
    cfg = DataConfig(source=DataSource.tokens, path=str(store), shuffle=shuffle)
    one = global_batches(cfg, tokenizer, 1, 3)
    assert torch.equal(one, global_batches(cfg, tokenizer, 2, 3))
    assert torch.equal(one, global_batches(cfg, tokenizer, 4, 3, micro=1))


def test_rank_reads_only_its_windows(store):
    """Tokens read per rank per step are its own share: flat in the world size."""
    split = TokenStore.open(str(store)).split("train")
    reads = []
    original = split.read

    def counting(start, n):
        reads.append(n)
        return original(start, n)

    split.read = counting
    for world in (1, 2, 4, 8):
        reads.clear()
        loader = StoreLoader(split, 32, 8 * world, 2, dp_rank=world - 1, dp_world=world, seed=1)
        for _ in range(loader.micro_batches_per_step * 3):
            loader.next_batch()
        assert sum(reads) == 3 * 8 * 33, world


def test_shuffle_is_a_seeded_permutation_of_windows(store):
    split = TokenStore.open(str(store)).split("train")
    n = split.n_tokens // 33

    def epoch(seed):
        loader = StoreLoader(split, 32, 1, 1, seed=seed)
        return [tuple(loader.next_batch()[0][0, :4].tolist()) for _ in range(n)]

    a, b = epoch(1), epoch(1)
    assert a == b and a != epoch(2)
    unshuffled = [tuple(split.read(k * 33, 4).tolist()) for k in range(n)]
    assert sorted(a) == sorted(unshuffled) and a != unshuffled


def test_resume_exact_on_another_dp_degree(store, tokenizer):
    cfg = DataConfig(source=DataSource.tokens, path=str(store), shuffle=True)
    reference = global_batches(cfg, tokenizer, 1, 5)
    saved, _ = build_data(cfg, tokenizer, 32, 8, 2, 1, 2, 5)
    for _ in range(2 * saved.micro_batches_per_step):
        saved.next_batch()
    state = saved.state_dict()
    rest = []
    for rank in range(4):
        loader, _ = build_data(cfg, tokenizer, 32, 8, 2, rank, 4, 5)
        loader.load_state_dict(state)
        rest.append(loader)
    resumed = torch.cat([rest[r].next_batch()[0] for _ in range(3) for r in range(4)])
    assert torch.equal(resumed, reference[2 * 8:])
    # mid-step state (micro_index > 0) resumes on the same layout
    mid, _ = build_data(cfg, tokenizer, 32, 8, 2, 0, 1, 5)
    mid.next_batch()
    again, _ = build_data(cfg, tokenizer, 32, 8, 2, 0, 1, 5)
    again.load_state_dict(mid.state_dict())
    assert torch.equal(again.next_batch()[0], mid.next_batch()[0])


def test_other_tokenizer_is_a_clear_error(store):
    other = build_tokenizer(compose(["tokenizer.vocab_size=512"]).tokenizer)
    with pytest.raises(ConfigError) as e:
        build_data(DataConfig(source=DataSource.tokens, path=str(store)), other, 32, 8, 2)
    message = str(e.value)
    assert e.value.key == "tokenizer" and "default-bpe2048" in message and "default-bpe512" in message


def test_incomplete_or_missing_store_is_a_config_error(tmp_path, capsys):
    with pytest.raises(ConfigError, match="not a directory"):
        TokenStore.open(str(tmp_path / "nope"))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "prepare.json").write_text("{}")
    with pytest.raises(ConfigError, match="re-run the same prepare_data command"):
        TokenStore.open(str(tmp_path / "half"))
    assert prepare_main(["data.max_documents=5"]) == 2
    assert "out=DIR" in capsys.readouterr().err


def _shards_identical(a: Path, b: Path) -> None:
    names = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert not any(n.name.endswith(".tmp") for n in names)
    _, mismatch, errors = filecmp.cmpfiles(a, b, [str(n) for n in names], shallow=False)
    assert not mismatch and not errors, mismatch


@pytest.mark.slow
def test_kill9_then_rerun_gives_identical_store(store, tmp_path):
    out = tmp_path / "s"
    args = [sys.executable, "-m", "titan.tools.prepare_data", *DOCS, f"out={out}", "workers=1", "shard_docs=7"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "train" / "00001.tokens.npy").exists() and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "too late: the preparation finished before the kill"
    again = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    _shards_identical(store, out)


@pytest.mark.slow
def test_parallel_workers_write_the_same_store(store, tmp_path):
    out = tmp_path / "s"
    assert prepare_main([*DOCS, f"out={out}", "workers=2", "shard_docs=7"]) == 0
    _shards_identical(store, out)


TRAIN = ["training.steps=4", "data.shuffle=false", "data.val_fraction=0.1", "data.max_documents=40",
         "checkpoint.save_final=false"]
STORE_LAYOUTS = ("single", "fsdp_tp", "pp")  # fsdp_tp: dp=2 x tp=2, one launch for both


@pytest.fixture(scope="module")
def cli_runs(store, tmp_path_factory) -> dict:
    """One CLI launch per layout, shared by the assertions below: the on-the-fly reference and
    the same run from the store (same documents, tokenizer and packing) on each layout."""
    root = tmp_path_factory.mktemp("cli")
    runs = {"fly": run_titan(root / "fly", *TRAIN).check()}
    for layout in STORE_LAYOUTS:
        saves = ["checkpoint.interval=2"] if layout == "fsdp_tp" else []  # resumed below
        runs[layout] = run_titan(root / layout, *TRAIN, "data=tokens", f"data.path={store}",
                                 f"parallel={layout}", *saves).check()
    return runs


@pytest.mark.slow
def test_cli_store_runs_reproduce_on_the_fly_losses(cli_runs):
    fly = cli_runs["fly"].losses
    assert len(fly) == 4 and cli_runs["single"].losses == fly  # bit for bit: same arithmetic
    for layout in STORE_LAYOUTS[1:]:
        assert np.allclose(cli_runs[layout].losses, fly, rtol=1e-5, atol=0), layout


@pytest.mark.slow
def test_cli_store_resume_on_another_dp_degree(cli_runs, store, tmp_path):
    """The fsdp_tp store run (dp=2) resumed single-process (dp=1) from its step-2 checkpoint
    continues the single-process store run bit for bit."""
    step2 = cli_runs["fsdp_tp"].run_dir / "checkpoints" / "step-00000002"
    assert step2.is_dir()
    resumed = run_titan(tmp_path / "resumed", *TRAIN, "data=tokens", f"data.path={store}",
                        f"checkpoint.resume={step2}").check()
    assert [r["step"] for r in resumed.train] == [3, 4]
    assert resumed.losses == cli_runs["single"].losses[2:]


def test_store_without_val_split_and_validation_on_is_refused(tmp_path):
    from titan.config.validate import validate

    out = tmp_path / "noval"
    prepare(compose(["data.max_documents=3", "data.val_fraction=0"]), {"out": str(out), "workers": 1, "shard_docs": 7})
    cfg = compose(["data=tokens", f"data.path={out}", "training.val_interval=5"])
    with pytest.raises(ConfigError, match="no validation split") as e:
        validate(cfg, world_size=1)
    assert e.value.key == "data.path"
    with pytest.raises(ConfigError, match="pick a document source"):
        prepare(compose(["data=tokens", f"data.path={out}"]), {"out": str(tmp_path / "x"), "workers": 1, "shard_docs": 7})


def test_progress_lines_and_bar():
    import io

    from titan.tools.prepare_data import Progress

    log = io.StringIO()
    progress = Progress(total_docs=10, every=0.0, stream=log)
    progress.update(4, 1000)
    assert "prepare_data: 4/10 documents" in log.getvalue() and "tokens/s" in log.getvalue() and "ETA" in log.getvalue()

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    bar = Progress(total_docs=10, stream=term)
    bar.update(5, 500)
    bar.close()
    assert "5/10" in term.getvalue() and "tok/s" in term.getvalue()
