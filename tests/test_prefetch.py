"""The background data worker: same batches, same resumable state (the consumed batch's)."""

from __future__ import annotations

import pytest
import torch

from titan.config.schema import DataConfig
from titan.data.loader import TokenLoader, build_data
from titan.data.prefetch import Prefetcher
from titan.data.tokenizer import Tokenizer


class Chars(Tokenizer):
    vocab_size, bos_id, eos_id = 258, 256, 257

    def encode(self, text):
        return list(text.encode())

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode()


DOCS = [f"document {i}: " + "abc" * (i % 7 + 1) for i in range(50)]


def loader(**kw) -> TokenLoader:
    return TokenLoader(DOCS, Chars(), seq_len=8, global_batch_size=4, micro_batch_size=2, seed=3, **kw)


def test_same_batches_and_consumed_state():
    plain, ahead = loader(), Prefetcher(loader(), depth=6)
    for _ in range(9):
        a, b = plain.next_batch(), ahead.next_batch()
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        # the state is that of what the trainer took, although the thread is several batches ahead
        assert ahead.state_dict() == plain.state_dict()
    assert ahead.micro_batches_per_step == 2
    resumed = Prefetcher(loader(), depth=3)
    resumed.load_state_dict(ahead.state_dict())
    for _ in range(5):
        assert torch.equal(resumed.next_batch()[0], plain.next_batch()[0])
    # loading a state into a running prefetcher restarts it there
    ahead.load_state_dict(resumed.state_dict())
    assert torch.equal(ahead.next_batch()[0], plain.next_batch()[0])


def test_end_and_errors_reach_the_consumer():
    finite = Prefetcher(loader(infinite=False), depth=4)
    assert len(list(finite)) == len(list(loader(infinite=False)))

    class Broken(Chars):
        def encode(self, text):
            raise RuntimeError("tokenizer exploded")

    broken = Prefetcher(TokenLoader(DOCS, Broken(), 8, 4, 2), depth=2)
    with pytest.raises(RuntimeError, match="exploded"):
        broken.next_batch()


def test_build_data_prefetches_by_default():
    train, _ = build_data(DataConfig(max_documents=30, val_fraction=0.0), Chars(), 8, 4, 2)
    assert isinstance(train, Prefetcher) and train.depth == 2 * train.micro_batches_per_step
    train, _ = build_data(DataConfig(max_documents=30, val_fraction=0.0, prefetch=0), Chars(), 8, 4, 2)
    assert isinstance(train, TokenLoader)


def test_validation_batches_are_made_once_and_replayed(monkeypatch):
    """A streamed source is opened once for all evaluations; each sees the same batches."""
    from titan.data.sources import StreamingDocuments

    opened = []

    def open_stream():
        opened.append(1)
        return iter(DOCS)

    docs = StreamingDocuments(open_stream, "val", 0.5, None, what="test stream")
    monkeypatch.setattr("titan.data.loader.load_documents", lambda cfg, split: docs)
    _, make_val = build_data(DataConfig(val_fraction=0.5, prefetch=0), Chars(), 8, 4, 2)
    fresh = TokenLoader(docs, Chars(), 8, 4, 2, shuffle=False)
    expected = [fresh.next_batch()[0] for _ in range(6)]
    opened.clear()
    first = make_val()
    assert all(torch.equal(first.next_batch()[0], e) for e in expected[:4])
    second = make_val()  # replays, and goes further on the same stream
    assert all(torch.equal(second.next_batch()[0], e) for e in expected)
    assert len(opened) == 1
