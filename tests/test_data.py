"""Document sources, packing, determinism, data-parallel slicing and exact resume."""

import json
import sys

import numpy as np
import pytest
import torch

from titan.config.errors import ConfigError
from titan.config.schema import DataConfig, DataSource, TokenizerConfig
from titan.data.loader import TokenLoader, build_data
from titan.data.sources import IndexedDocuments, StreamingDocuments, load_documents, unit_hash
from titan.data.tokenizer import Tokenizer, build_tokenizer


class ByteTokenizer(Tokenizer):
    """ids = utf-8 bytes + 3; 1 = BOS, 2 = EOS: easy to check packing by hand."""

    vocab_size, bos_id, eos_id = 259, 1, 2

    def encode(self, text):
        return [b + 3 for b in text.encode()]

    def decode(self, ids):
        return bytes(i - 3 for i in ids if i >= 3).decode(errors="replace")


class Stream:
    """A re-iterable, non-indexable source (like hf streaming)."""

    def __init__(self, docs):
        self.docs = docs

    def __iter__(self):
        return iter(list(self.docs))


DOCS = [f"document {i}: " + "lorem ipsum " * (i % 7) for i in range(40)]
TOK = ByteTokenizer()


def make(docs=DOCS, seq_len=16, gbs=8, mbs=2, rank=0, world=1, seed=0, **kw):
    return TokenLoader(docs, TOK, seq_len, gbs, mbs, dp_rank=rank, dp_world=world, seed=seed, **kw)


def take(loader, n):
    return [loader.next_batch() for _ in range(n)]


def assert_same(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


# ---------------------------------------------------------------------------------------------
# packing
# ---------------------------------------------------------------------------------------------
def test_packing_frames_documents_and_shifts_labels():
    docs = ["ab", "cde", "f"]
    loader = make(docs, seq_len=4, gbs=2, mbs=1, shuffle=False, infinite=False)
    stream = []
    for d in docs:
        stream += [1] + TOK.encode(d) + [2]
    # 13 tokens: two windows of 5 fit in one global batch; the remainder is dropped.
    (x0, y0), (x1, y1) = take(loader, 2)
    for x, y in ((x0, y0), (x1, y1)):
        assert x.shape == y.shape == (1, 4) and x.dtype == y.dtype == torch.int64
    assert x0[0].tolist() + [y0[0, -1].item()] == stream[0:5]
    assert x1[0].tolist() + [y1[0, -1].item()] == stream[5:10]
    assert torch.equal(x0[0, 1:], y0[0, :-1])
    with pytest.raises(StopIteration):
        loader.next_batch()
    assert list(loader) == []


def test_infinite_loader_wraps_epochs_and_reshuffles():
    docs = DOCS[:10]
    loader = make(docs, seq_len=8, gbs=2, mbs=2)
    stream = []
    while loader.state_dict()["epoch"] < 3:
        x, y = loader.next_batch()
        assert x.shape == y.shape == (2, 8)
        stream += torch.cat([x, y[:, -1:]], 1).flatten().tolist()
    # Split the stream at BOS: whole documents, epoch after epoch, each epoch a new permutation.
    texts = [TOK.decode(chunk) for chunk in _split(stream, 1)][1:21]
    epoch0, epoch1 = texts[:10], texts[10:20]
    assert sorted(epoch0) == sorted(epoch1) == sorted(docs)
    assert epoch0 != epoch1


def _split(ids, sep):
    chunks, cur = [], []
    for t in ids:
        if t == sep:
            chunks.append(cur)
            cur = []
        elif t != 2:
            cur.append(t)
    return chunks + [cur]


def test_shuffle_is_deterministic_per_seed():
    assert_same(take(make(seed=3), 10), take(make(seed=3), 10))
    a, b = take(make(seed=3), 10), take(make(seed=4), 10)
    assert any(not torch.equal(xa, xb) for (xa, _), (xb, _) in zip(a, b, strict=True))
    unshuffled = make(shuffle=False).next_batch()[0]
    assert TOK.decode(unshuffled[0].tolist()).startswith("document 0")


# ---------------------------------------------------------------------------------------------
# data parallel slicing
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world,mbs", [(2, 1), (2, 2), (4, 2), (8, 1)])
def test_dp_ranks_partition_the_single_process_global_batch(world, mbs):
    gbs, steps = 8, 5
    single = make(gbs=gbs, mbs=gbs)
    ranks = [make(gbs=gbs, mbs=mbs, rank=r, world=world) for r in range(world)]
    for _ in range(steps):
        x_ref, y_ref = single.next_batch()
        xs, ys = [], []
        for loader in ranks:
            for _ in range(loader.micro_batches_per_step):
                x, y = loader.next_batch()
                xs.append(x)
                ys.append(y)
        assert torch.equal(torch.cat(xs), x_ref) and torch.equal(torch.cat(ys), y_ref)


def test_batch_layout_errors():
    with pytest.raises(ConfigError) as e:
        make(gbs=8, mbs=3)
    assert e.value.key == "training.micro_batch_size"
    with pytest.raises(ConfigError) as e:
        make(gbs=6, world=4)
    assert e.value.key == "training.global_batch_size"
    with pytest.raises(ConfigError) as e:
        make(gbs=8, mbs=4, world=4)  # 2 sequences per rank cannot hold micro-batches of 4
    assert e.value.key == "training.micro_batch_size"


# ---------------------------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", [list, Stream])
@pytest.mark.parametrize("n", [0, 1, 3, 4, 17])  # 4 micro-batches per step: 1, 3 are mid-step
def test_resume_continues_exactly(source, n):
    loader = make(source(DOCS), seq_len=24, gbs=8, mbs=2, rank=1, world=2, seed=5)
    take(loader, n)
    state = loader.state_dict()
    expected = take(loader, 12)  # crosses at least one epoch boundary from n=17
    resumed = make(source(DOCS), seq_len=24, gbs=8, mbs=2, rank=1, world=2, seed=5)
    resumed.load_state_dict(state)
    assert_same(take(resumed, 12), expected)


def test_state_is_small_and_rank_independent_between_steps():
    loaders = [make(gbs=8, mbs=2, rank=r, world=2) for r in range(2)]
    for loader in loaders:
        take(loader, 2 * loader.micro_batches_per_step)
    states = [loader.state_dict() for loader in loaders]
    assert states[0] == states[1]
    assert all(isinstance(v, int) for v in states[0].values())
    # A step-boundary state resumes under another dp degree: 1 process continues the same stream.
    single = make(gbs=8, mbs=8)
    single.load_state_dict(states[0])
    x_single, _ = single.next_batch()
    x_ranks = torch.cat([loader.next_batch()[0] for loader in loaders for _ in range(2)])
    assert torch.equal(x_single, x_ranks)  # rank 0's two micro-batches, then rank 1's


def test_resume_rejects_mismatched_state():
    loader = make(seed=1)
    loader.next_batch()
    with pytest.raises(ValueError, match="seed"):
        make(seed=2).load_state_dict(loader.state_dict())
    with pytest.raises(ValueError, match="mid-step"):
        make(seed=1, mbs=4).load_state_dict(loader.state_dict())


# ---------------------------------------------------------------------------------------------
# sources
# ---------------------------------------------------------------------------------------------
def test_embedded_corpus_split():
    cfg = DataConfig(source=DataSource.embedded)
    train, val = load_documents(cfg, "train"), load_documents(cfg, "val")
    assert len(train) > 300 and 0 < len(val) < len(train) / 5
    assert not set(train.names) & set(val.names)
    assert any(n.startswith("pydoc/") for n in train.names)
    assert all(unit_hash(n) < cfg.val_fraction for n in val.names)
    assert load_documents(cfg, "val").names == val.names  # deterministic
    text = train[train.names.index("stdlib/os.py")]
    assert "def makedirs" in text
    capped = load_documents(DataConfig(max_documents=50), "train")
    assert len(capped) < 50 and set(capped.names) <= set(train.names) | set(val.names)


def _write_files(root):
    (root / "a").mkdir()
    (root / "a" / "one.txt").write_text("first text file")
    (root / "a" / "two.txt").write_text("second text file")
    (root / "b.jsonl").write_text(
        "\n".join(json.dumps({"text": f"json doc {i}", "id": i}) for i in range(20)) + "\n\n"
    )
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"text": [f"parquet row {i}" for i in range(30)], "n": list(range(30))})
    pq.write_table(table, root / "c.parquet", row_group_size=7)


def test_files_source_reads_txt_jsonl_parquet(tmp_path):
    _write_files(tmp_path)
    cfg = DataConfig(source=DataSource.files, path=str(tmp_path / "**" / "*"), val_fraction=0.2)
    train, val = load_documents(cfg, "train"), load_documents(cfg, "val")
    texts = sorted(train[i] for i in range(len(train))) + sorted(val[i] for i in range(len(val)))
    assert len(texts) == 2 + 20 + 30
    assert set(texts) == {"first text file", "second text file"} | {
        f"json doc {i}" for i in range(20)} | {f"parquet row {i}" for i in range(30)}
    assert 0 < len(val) < len(train)
    assert "a/one.txt" in train.names + val.names and "b.jsonl:20" in train.names + val.names
    assert "c.parquet:29" in train.names + val.names
    # Names are relative to the glob base, so the split survives moving the dataset.
    only_jsonl = load_documents(DataConfig(source=DataSource.files, path=str(tmp_path / "*.jsonl"),
                                           val_fraction=0.2), "val")
    assert set(only_jsonl.names) == {n for n in val.names if n.startswith("b.jsonl")}


def test_small_corpus_still_holds_out_one_document(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text(f"doc {i}")
    cfg = DataConfig(source=DataSource.files, path=str(tmp_path), val_fraction=0.01)
    assert len(load_documents(cfg, "val")) == 1 and len(load_documents(cfg, "train")) == 2


def test_files_source_errors(tmp_path):
    with pytest.raises(ConfigError, match="no files match") as e:
        load_documents(DataConfig(source=DataSource.files, path=str(tmp_path / "*.txt")), "train")
    assert e.value.key == "data.path"
    (tmp_path / "x.jsonl").write_text(json.dumps({"content": "hi"}) + "\n")
    with pytest.raises(ConfigError, match="'text'") as e:
        load_documents(DataConfig(source=DataSource.files, path=str(tmp_path / "*.jsonl")), "train")
    assert e.value.key == "data.text_field"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "y.parquet")
    with pytest.raises(ConfigError, match="column") as e:
        load_documents(DataConfig(source=DataSource.files, path=str(tmp_path / "*.parquet")), "val")
    assert e.value.key == "data.text_field"
    (tmp_path / "z.csv").write_text("a,b\n")
    with pytest.raises(ConfigError, match="none ends in"):
        load_documents(DataConfig(source=DataSource.files, path=str(tmp_path / "*.csv")), "train")


def test_hf_source_on_local_jsonl(tmp_path):
    pytest.importorskip("datasets", reason="the hf source needs `datasets` (titan[hf])")
    lines = [json.dumps({"text": f"hf doc {i}"}) for i in range(40)]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    cfg = DataConfig(source=DataSource.hf, path=f"json:{tmp_path}/*.jsonl", val_fraction=0.2)
    train, val = load_documents(cfg, "train"), load_documents(cfg, "val")
    assert isinstance(train, StreamingDocuments)
    train_texts, val_texts = list(train), list(val)
    assert sorted(train_texts + val_texts) == sorted(f"hf doc {i}" for i in range(40))
    assert val_texts == [f"hf doc {i}" for i in range(40) if unit_hash(str(i)) < 0.2]
    assert list(train) == train_texts  # every pass restarts the stream in the same order
    capped = DataConfig(source=DataSource.hf, path=cfg.path, val_fraction=0.2, max_documents=10)
    n_capped = sum(len(list(load_documents(capped, split))) for split in ("train", "val"))
    assert n_capped == 10
    # Packs and resumes through the loader like any re-iterable source.
    loader = make(train, seq_len=8, gbs=4, mbs=2)
    take(loader, 3)
    state, expected = loader.state_dict(), take(loader, 4)
    resumed = make(train, seq_len=8, gbs=4, mbs=2)
    resumed.load_state_dict(state)
    assert_same(take(resumed, 4), expected)
    bad = DataConfig(source=DataSource.hf, path=cfg.path, text_field="body")
    with pytest.raises(ConfigError) as e:
        load_documents(bad, "train")
    assert e.value.key == "data.text_field"


def test_hf_source_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(ConfigError, match="titan\\[hf\\]"):
        load_documents(DataConfig(source=DataSource.hf, path="json:x.jsonl"), "train")


def test_loader_rejects_one_shot_iterators():
    with pytest.raises(TypeError, match="re-iterable"):
        make(iter(DOCS))


def test_indexed_documents_read_lazily():
    reads = []
    docs = IndexedDocuments([f"d{i}" for i in range(1000)], lambda i: reads.append(i) or "x" * 50)
    loader = make(docs, seq_len=16, gbs=2, mbs=1)
    take(loader, 4)
    assert 0 < len(reads) < 10


# ---------------------------------------------------------------------------------------------
# end to end: embedded corpus + default tokenizer
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def default_tok(tmp_path_factory):
    # Same cache dir as test_tokenizer.py: the model trains once per session.
    cfg = TokenizerConfig(cache_dir=str(tmp_path_factory.getbasetemp() / "titan-tokenizers"))
    return build_tokenizer(cfg)


def test_build_data_embedded(default_tok):
    train, make_val = build_data(DataConfig(), default_tok, seq_len=64, global_batch_size=4,
                                 micro_batch_size=2, dp_rank=0, dp_world=1, seed=42)
    x, y = train.next_batch()
    assert x.shape == y.shape == (2, 64) and int(x.max()) < default_tok.vocab_size
    assert train.micro_batches_per_step == 2
    val_a, val_b = make_val(), make_val()
    assert_same(take(val_a, 3), take(val_b, 3))  # every evaluation sees the same batches
    val_docs = set(load_documents(DataConfig(), "val").names)
    assert not val_docs & set(train.documents.names)
    _, no_val = build_data(DataConfig(val_fraction=0.0), default_tok, 64, 4, 2, 0, 1, 42)
    assert no_val is None


def test_val_loader_wraps_instead_of_running_out():
    docs = ["a short validation document"] * 2
    val = make(docs, seq_len=16, gbs=4, mbs=4, shuffle=False)
    assert len(take(val, 10)) == 10


def test_tokens_decode_back_to_documents(default_tok):
    docs = ["def f():\n    return 1\n", "print('hi')\n"]
    loader = TokenLoader(docs, default_tok, 8, 1, 1, shuffle=False, infinite=True)
    ids = []
    for _ in range(6):
        x, y = loader.next_batch()
        ids += x[0].tolist() + [y[0, -1].item()]
    ids = np.array(ids)
    bos = np.flatnonzero(ids == default_tok.bos_id)
    eos = np.flatnonzero(ids == default_tok.eos_id)
    assert default_tok.decode(ids[bos[0] + 1:eos[0]].tolist()) == docs[0]
    assert default_tok.decode(ids[bos[1] + 1:eos[1]].tolist()) == docs[1]


def test_one_document_is_split_inside_and_val_fraction_0_means_no_validation(tmp_path):
    text = "".join(f"line {i} of the only document\n" for i in range(200))
    (tmp_path / "book.txt").write_text(text)
    cfg = DataConfig(source=DataSource.files, path=str(tmp_path / "book.txt"), val_fraction=0.1)
    train, val = load_documents(cfg, "train"), load_documents(cfg, "val")
    assert len(train) == len(val) == 1
    assert train[0] + val[0] == text and val[0].startswith("line ")  # cut at a line break
    assert 0.08 < len(val[0]) / len(text) < 0.12
    everything = load_documents(DataConfig(source=DataSource.files, path=cfg.path, val_fraction=0.0), "train")
    assert [everything[0]] == [text]
    (tmp_path / "book.txt").write_text("x")
    with pytest.raises(ConfigError, match="data.val_fraction=0") as e:
        load_documents(cfg, "val")
    assert e.value.key == "data.val_fraction"
