"""The Llama 3 model: parameter counts of every preset (meta device), shapes, RoPE, FLOPs."""

from __future__ import annotations

import pytest
import torch

from tests.test_config import compose_typed
from titan.models import build_model, count_params, flops_per_token, model_args
from titan.models.llama3 import LlamaArgs, rope_frequencies

# (preset, parameters in billions to 2 decimals, FFN hidden size), from the published configs.
PRESETS = [
    ("llama3_1b", 1.24, 8192),
    ("llama3_3b", 3.21, 8192),
    ("llama3_8b", 8.03, 14336),
    ("llama3_70b", 70.55, 28672),
    ("llama3_405b", 405.85, 53248),
]


@pytest.mark.parametrize("preset, billions, ffn", PRESETS)
def test_preset_sizes_on_meta(preset, billions, ffn):
    cfg = compose_typed(f"model={preset}")
    args = model_args(cfg.model, vocab_size=-1, seq_len=128)
    model = build_model(args)
    assert all(p.is_meta for p in model.parameters())  # nothing allocated
    assert args.ffn_hidden == ffn
    assert round(count_params(model) / 1e9, 2) == billions


def test_debug_model_matches_torchtitan_debugmodel():
    cfg = compose_typed()
    args = model_args(cfg.model, vocab_size=2048, seq_len=256)
    model = build_model(args)
    assert count_params(model) == 6_163_712
    assert flops_per_token(args, count_params(model), 256) == pytest.approx(38.56e6, rel=1e-3)


def test_forward_shapes_and_tied_embeddings():
    args = LlamaArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=32, max_seq_len=16, tie_embeddings=True)
    model = build_model(args)
    model.to_empty(device="cpu")
    model.init_weights(seed=0)
    assert model.output.weight is model.tok_embeddings.weight
    logits = model(torch.randint(0, 128, (3, 16)))
    assert logits.shape == (3, 16, 128) and torch.isfinite(logits).all()


def test_llama31_rope_scaling_keeps_high_frequencies_and_slows_low_ones():
    plain = LlamaArgs(dim=128, n_heads=1)
    scaled = LlamaArgs(dim=128, n_heads=1, rope_scaling_factor=8.0)
    f0, f1 = rope_frequencies(plain), rope_frequencies(scaled)
    assert torch.equal(f0[:4], f1[:4])  # short wavelengths untouched
    assert torch.allclose(f1[-4:], f0[-4:] / 8)  # long wavelengths slowed by the factor
