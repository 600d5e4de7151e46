"""A streamed Hugging Face dataset resumes from the dataset's own state, not by re-reading."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.helpers import run_titan
from tests.test_prefetch import Chars
from titan.config.schema import DataConfig, DataSource
from titan.data.loader import TokenLoader
from titan.data.sources import load_documents


def write_corpus(directory, n=300):
    lines = [json.dumps({"text": f"streamed document number {i} " + "xyz " * (i % 5)}) for i in range(n)]
    directory.mkdir(exist_ok=True)
    (directory / "part-0.jsonl").write_text("\n".join(lines[: n // 2]) + "\n")
    (directory / "part-1.jsonl").write_text("\n".join(lines[n // 2:]) + "\n")


def test_resume_restarts_the_dataset_from_its_state(tmp_path):
    write_corpus(tmp_path / "c")
    docs = load_documents(DataConfig(source=DataSource.hf, path=f"json:{tmp_path}/c/*.jsonl", val_fraction=0.1), "train")
    read = []
    original = docs.open_resumable

    def counting(state):
        records, get_state = original(state)

        def counted():
            for text in records:
                read.append(text)
                yield text

        return counted(), get_state

    docs.open_resumable = counting
    loader = TokenLoader(docs, Chars(), seq_len=16, global_batch_size=4, micro_batch_size=2)
    for _ in range(2 * 90):  # into the second file
        loader.next_batch()
    state = loader.state_dict()
    assert json.loads(state["stream_state"])["index"] > 150
    expected = [loader.next_batch()[0] for _ in range(6)]

    read.clear()
    resumed = TokenLoader(docs, Chars(), seq_len=16, global_batch_size=4, micro_batch_size=2)
    resumed.load_state_dict(state)
    got = [resumed.next_batch()[0] for _ in range(6)]
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert 0 < len(read) < 30, len(read)  # the documents after the cursor only
    # a mid-step state too
    resumed.next_batch()
    mid = resumed.state_dict()
    assert mid["micro_index"] == 1
    again = TokenLoader(docs, Chars(), seq_len=16, global_batch_size=4, micro_batch_size=2)
    again.load_state_dict(mid)
    assert torch.equal(again.next_batch()[0], resumed.next_batch()[0])


@pytest.mark.slow
def test_cli_resume_with_a_streamed_dataset(tmp_path):
    write_corpus(tmp_path / "c")
    common = ["training.steps=4", "data=hf", f"data.path=json:{tmp_path}/c/*.jsonl", "checkpoint.interval=2",
              "checkpoint.keep_last_k=0"]
    full = run_titan(tmp_path / "full", *common).check()
    shutil.rmtree(full.run_dir / "checkpoints" / "step-00000004")
    (full.run_dir / "metrics.jsonl").write_text("")
    resumed = run_titan(full.run_dir, *common).check()
    assert [r["step"] for r in resumed.train] == [3, 4]
    assert resumed.losses == full.losses[2:]  # bit for bit
