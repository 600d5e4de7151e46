"""Multi-head latent attention (family deepseek_v3): transformers' own random DeepseekV3 (one
dense layer, then MoE with a shared expert, sigmoid routing with a non-zero selection bias)
loads into titan with equal logits, and titan's export loads back into transformers with equal
logits; the 671B preset has DeepSeek-V3's parameter count."""

from __future__ import annotations

import pytest
import torch

from tests.test_config import compose_typed
from tests.test_qwen3 import imported_model
from titan.models import active_params, build_model, count_params, model_args


@pytest.mark.parametrize("q_lora_rank", [None, 24])
def test_deepseek_v3_mla_round_trip_matches_transformers_logits(tmp_path, q_lora_rank):
    import transformers

    from titan.interop import load_hf, save_hf

    config = transformers.DeepseekV3Config(
        vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2,
        routed_scaling_factor=2.5, kv_lora_rank=32, q_lora_rank=q_lora_rank, qk_rope_head_dim=8, qk_nope_head_dim=16,
        v_head_dim=12, n_group=1, topk_group=1, first_k_dense_replace=1, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    theirs = transformers.DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norms and router (HF initialises them to ones / zeros)
        for name, p in theirs.named_parameters():
            if "norm" in name:
                p.add_(torch.rand_like(p) * 0.5)
            elif name.endswith("mlp.gate.weight"):
                p.normal_(std=0.5)
        theirs.model.layers[1].mlp.gate.e_score_correction_bias.normal_(std=0.3)
    theirs.save_pretrained(tmp_path / "hf")
    state, args = load_hf(tmp_path / "hf")
    assert args.mla is not None and args.mla.q_lora_rank == (q_lora_rank or 0) and args.moe.n_dense_layers == 1
    ours = imported_model(state, args)
    tokens = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        expected = theirs(tokens).logits
        assert torch.allclose(ours.eval()(tokens), expected, atol=1e-5)
    save_hf(tmp_path / "back", ours.state_dict(), args)
    again = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(again(tokens).logits, expected, atol=1e-5)


def test_deepseek_v3_671b_preset_size():
    cfg = compose_typed("model=deepseek_v3_671b")
    args = model_args(cfg.model, -1, 128)
    n = count_params(build_model(args))
    # DeepSeek-V3: 671B total, 37B activated (the main model, without the multi-token-prediction module).
    # Measured: 671,026,404,352 total, 37,552,282,624 active (embedding and output included).
    assert round(n / 1e9) == 671 and int(active_params(args, n) / 1e9) == 37


def test_mla_debug_preset_trains_and_decodes_with_a_kv_cache():
    from tests.parallel_harness import run_reference
    from titan.generate import CachedDecoder

    run = run_reference(["model=deepseek_v3_debug", "model.dim=64", "model.n_layers=2", "model.ffn_hidden=128"])
    assert run["losses"][-1] < run["losses"][0]
    assert any(".attention.wkv_b." in name for name in run["final"])
    cfg = compose_typed("model=deepseek_v3_debug", "model.dim=64", "model.n_layers=2", "model.ffn_hidden=128")
    model = build_model(model_args(cfg.model, 96, 32))
    model.to_empty(device="cpu")
    model.init_weights(seed=0)
    tokens = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        decoder = CachedDecoder(model.eval(), 32)
        cache = decoder.new_cache(2)
        cached = torch.cat([decoder.forward(tokens[:, :8], cache), decoder.forward(tokens[:, 8:], cache)], dim=1)
        assert torch.allclose(cached, model(tokens), atol=1e-5)


@pytest.mark.parametrize(
    "overrides, world, key",
    [
        (["model=deepseek_v3_debug", "parallel=tp"], 2, "parallel.tp"),  # no TP plan for latent attention
        (["model=deepseek_v3_debug", "model.n_kv_heads=2"], 1, "model.n_kv_heads"),
        (["model=qwen3_moe_debug", "model.mla.kv_lora_rank=16"], 1, "model.mla.kv_lora_rank"),
    ],
)
def test_mla_config_errors_name_the_key(overrides, world, key):
    from titan.config.errors import ConfigError
    from titan.config.validate import validate

    with pytest.raises(ConfigError) as err:
        validate(compose_typed(*overrides), world_size=world)
    assert err.value.key == key
