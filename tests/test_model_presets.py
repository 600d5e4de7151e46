"""Model presets against the public configs, and a sane initial loss for every preset, tied or not."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import run_titan
from titan.interop.hf import args_from_hf_config, hf_config
from titan.interop.sources import preset_config
from titan.models import build_model, count_params, model_args
from titan.parallel.init import materialize_and_init

PRESETS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "model").glob("*.yaml"))


def _public(hidden, inter, heads, layers, factor, tied, params):
    """The fields of a meta-llama config.json on the Hub (Llama 3.1 / 3.2 repos), as published."""
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "hidden_size": hidden, "intermediate_size": inter,
        "num_attention_heads": heads, "num_key_value_heads": 8, "num_hidden_layers": layers,
        "head_dim": hidden // heads, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
        "rope_scaling": {"factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "tie_word_embeddings": tied, "vocab_size": 128256, "max_position_embeddings": 131072,
        "bos_token_id": 128000, "eos_token_id": 128001, "initializer_range": 0.02,
    }
    return config, params


PUBLIC = {
    "llama3_1b": _public(2048, 8192, 32, 16, 32.0, True, 1.24),  # meta-llama/Llama-3.2-1B
    "llama3_3b": _public(3072, 8192, 24, 28, 32.0, True, 3.21),  # meta-llama/Llama-3.2-3B
    "llama3_8b": _public(4096, 14336, 32, 32, 8.0, False, 8.03),  # meta-llama/Llama-3.1-8B
    "llama3_70b": _public(8192, 28672, 64, 80, 8.0, False, 70.55),  # meta-llama/Llama-3.1-70B
    "llama3_405b": _public(16384, 53248, 128, 126, 8.0, False, 405.85),  # meta-llama/Llama-3.1-405B
}
FIELDS = ("dim", "n_layers", "n_heads", "kv_heads", "head_dim", "vocab_size", "ffn_hidden", "norm_eps", "rope_theta",
          "rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_seq_len",
          "tie_embeddings", "context")


@pytest.mark.parametrize("preset", sorted(PUBLIC))
def test_preset_matches_the_public_config(preset):
    public, billions = PUBLIC[preset]
    ours = model_args(preset_config(preset), vocab_size=-1, seq_len=4096)
    theirs = args_from_hf_config(public)
    for field in FIELDS:
        assert getattr(ours, field) == getattr(theirs, field), f"{preset}: {field}"
    assert round(count_params(build_model(ours)) / 1e9, 2) == billions
    # And the export writes the public numbers back (training seq_len does not leak into it).
    exported = hf_config(ours)
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
                "head_dim", "rms_norm_eps", "rope_scaling", "tie_word_embeddings", "vocab_size", "max_position_embeddings"):
        assert exported[key] == public[key], f"{preset}: {key}"


def _first_loss(preset: str, tied: bool, vocab: int = 2048) -> float:
    """Loss of the freshly initialised model (as the trainer builds it) at tiny dims."""
    cfg = dataclasses.replace(preset_config(preset), dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32,
                              vocab_size=vocab, tie_embeddings=tied)
    model = build_model(model_args(cfg, vocab, 32))
    materialize_and_init(model, torch.device("cpu"), seed=0)
    assert (model.output.weight is model.tok_embeddings.weight) == tied
    tokens = torch.randint(0, vocab, (8, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).item()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("preset", PRESETS)
def test_initial_loss_is_near_ln_vocab(preset, tied):
    loss = _first_loss(preset, tied)
    assert abs(loss - math.log(2048)) < 0.1 * math.log(2048), loss


def test_first_training_step_loss_of_a_tied_model_through_the_cli(tmp_path):
    run = run_titan(tmp_path, "training.steps=1", "lr_schedule.warmup_steps=0", "model.tie_embeddings=true").check()
    vocab = 2048  # the default tokenizer
    assert abs(run.losses[0] - math.log(vocab)) < 0.1 * math.log(vocab), run.losses
