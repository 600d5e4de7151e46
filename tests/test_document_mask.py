"""Document masking: a packed batch with the mask trains exactly like each document alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from titan.models.document_mask import DocumentMask, document_ids, document_positions
from titan.models.llama3 import Llama3, LlamaArgs

BOS, EOS = 1, 2
ARGS = LlamaArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=32, max_seq_len=32)


def _model() -> Llama3:
    torch.manual_seed(0)
    model = Llama3(ARGS)
    model.init_weights(seed=0)
    return model


def _doc(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.tensor([BOS]), torch.randint(3, ARGS.vocab_size, (n,), generator=g), torch.tensor([EOS])])


def test_ids_and_positions_follow_bos_tokens() -> None:
    tokens = torch.tensor([[7, 8, BOS, 5, EOS, BOS, 4, 4]])
    ids = document_ids(tokens, BOS)
    assert ids.tolist() == [[0, 0, 1, 1, 1, 2, 2, 2]]
    assert document_positions(ids).tolist() == [[0, 1, 0, 1, 2, 0, 1, 2]]
    dense = DocumentMask(ids).dense()[0, 0]
    assert dense[3].tolist() == [False, False, True, True, False, False, False, False]


def test_packed_masked_loss_equals_each_document_alone() -> None:
    model = _model()
    docs = [_doc(n, seed) for seed, n in enumerate((9, 4, 13, 5))]  # 4 documents, 39 tokens
    rows = [torch.cat(docs[:2]), torch.cat(docs[2:])]
    width = max(len(r) for r in rows)
    rows = [torch.cat([r, torch.full((width - len(r),), EOS)]) for r in rows]  # trailing pad
    packed = torch.stack(rows)
    inputs, labels = packed[:, :-1], packed[:, 1:].clone()
    ids = document_ids(inputs, BOS)
    # Score every token whose input and target belong to one document.
    same_doc = torch.ones_like(labels, dtype=torch.bool)
    same_doc[:, :-1] = ids[:, 1:] == ids[:, :-1]
    lengths = [[len(docs[0]), len(docs[1])], [len(docs[2]), len(docs[3])]]
    for r, (a, b) in enumerate(lengths):
        labels[r, a + b - 1:] = -100  # the pad
    labels[~same_doc] = -100
    logits = model(inputs, document_ids=ids)
    packed_losses = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)

    alone = []
    for doc in docs:
        out = model(doc[None, :-1])
        alone.append(F.cross_entropy(out[0], doc[1:], reduction="none"))
    got = packed_losses[labels != -100]
    torch.testing.assert_close(got, torch.cat(alone), rtol=1e-5, atol=1e-5)
    # Without the mask the second document of a row sees the first one: different losses.
    unmasked = F.cross_entropy(model(inputs).flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
    assert not torch.allclose(unmasked[labels != -100], torch.cat(alone), atol=1e-3)


def test_backward_through_the_mask_runs() -> None:
    model = _model()
    tokens = torch.cat([_doc(6, 1), _doc(7, 2)])[None]
    loss = model(tokens[:, :-1], document_ids=document_ids(tokens[:, :-1], BOS)).sum()
    loss.backward()
    assert model.tok_embeddings.weight.grad is not None


def test_positions_and_document_ids_are_exclusive() -> None:
    model = _model()
    tokens = _doc(6, 1)[None]
    with pytest.raises(ValueError, match="cannot be combined"):
        model(tokens, positions=torch.arange(tokens.shape[1]), document_ids=document_ids(tokens, BOS))


def test_context_parallel_is_refused_at_validation() -> None:
    from tests.test_config import compose_typed
    from titan.config.errors import ConfigError
    from titan.config.validate import validate

    cfg = compose_typed("parallel=cp", "data.document_mask=true")
    with pytest.raises(ConfigError, match="data.document_mask.*context parallelism"):
        validate(cfg, world_size=2)


def _short_documents(path) -> str:
    """A JSONL corpus of short documents, so every 32-token window spans several of them."""
    import json
    import random

    rng = random.Random(0)
    words = "the a model data token train loss rank batch step layer head value key query".split()
    lines = [json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))}) for _ in range(300)]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.slow
def test_masked_runs_match_single_process_on_tp_and_pp(tmp_path) -> None:
    """The real trainer with data.document_mask=true: the mask reaches every layout (later
    pipeline stages included) and the losses agree with one process."""
    from tests.helpers import run_titan

    data = ("data=files", f"data.path={_short_documents(tmp_path / 'docs.jsonl')}")
    common = (*data, "data.document_mask=true", "training.steps=3")
    reference = run_titan(tmp_path / "single", *common).check().losses
    assert len(reference) == 3
    unmasked = run_titan(tmp_path / "plain", *data, "training.steps=3").check().losses
    assert abs(unmasked[0] - reference[0]) > 1e-4  # the mask changes the loss
    for layout in ("tp", "pp"):  # fsdp with the mask: tests/test_sft.py (packed conversations)
        got = run_titan(tmp_path / layout, *common, f"parallel={layout}").check().losses
        assert got == pytest.approx(reference, rel=1e-5), layout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention path: CUDA only (no CPU backward)")
def test_flex_attention_matches_the_dense_mask_on_cuda() -> None:
    from titan.models.document_mask import masked_attention

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4, 128, 16, device="cuda", generator=g) for _ in range(3))
    tokens = torch.randint(3, 60, (2, 128), device="cuda", generator=g)
    tokens[:, ::37] = BOS
    mask = DocumentMask(document_ids(tokens, BOS))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense())
    torch.testing.assert_close(masked_attention(q, k, v, mask), expected, rtol=2e-3, atol=2e-3)
