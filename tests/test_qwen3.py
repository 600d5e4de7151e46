"""Model families: Qwen3 dense / MoE presets (sizes on the meta device), the family registry,
and logits parity with transformers' own Qwen3ForCausalLM / Qwen3MoeForCausalLM."""

from __future__ import annotations

import pytest
import torch

from tests.test_config import compose_typed
from titan.config.errors import ConfigError
from titan.config.validate import validate
from titan.models import active_params, build_model, count_params, model_args
from titan.models.llama3 import Llama3
from titan.models.qwen3.model import Qwen3

# (preset, total parameters in billions, active in billions, rounding digits): Qwen's model cards.
PRESETS = [
    ("qwen3_0_6b", 0.6, 0.6, 1),
    ("qwen3_1_7b", 1.7, 1.7, 1),
    ("qwen3_4b", 4.0, 4.0, 1),
    ("qwen3_8b", 8.2, 8.2, 1),
    ("qwen3_14b", 14.8, 14.8, 1),
    ("qwen3_32b", 32.8, 32.8, 1),
    ("qwen3_30b_a3b", 30.5, 3.3, 1),
    ("qwen3_235b_a22b", 235, 22, 0),
]


@pytest.mark.parametrize("preset, total, active, digits", PRESETS)
def test_qwen3_preset_sizes_on_meta(preset, total, active, digits):
    cfg = compose_typed(f"model={preset}")
    args = model_args(cfg.model, vocab_size=-1, seq_len=128)
    model = build_model(args)
    assert isinstance(model, Qwen3) and all(p.is_meta for p in model.parameters())
    n = count_params(model)
    assert round(n / 1e9, digits) == total
    # Model cards print active sizes rounded down (30B-A3B: 3.35B active is listed as 3.3B).
    assert abs(active_params(args, n) / 1e9 - active) < 0.6 * 10**-digits


def test_llama_presets_stay_llama():
    cfg = compose_typed("model=llama3_8b")
    assert cfg.model.family == "llama3"
    model = build_model(model_args(cfg.model, -1, 128))
    assert type(model) is Llama3 and active_params(model.args, count_params(model)) == count_params(model)


def test_deepseek_style_preset_counts():
    cfg = compose_typed("model=deepseek_v3_gqa")
    args = model_args(cfg.model, -1, 128)
    n = count_params(build_model(args))
    # DeepSeek-V3 is 671B with MLA; GQA attention of the same width makes it ~675B. Its MoE
    # part is exact: 58 layers x 256 routed experts x 3 x 7168 x 2048.
    assert args.moe.n_dense_layers == 3 and args.moe.n_shared_experts == 1
    routed = 58 * 256 * 3 * 7168 * 2048
    assert n - active_params(args, n) == 58 * (256 - 8) * 3 * 7168 * 2048
    assert round(routed / 1e9) == 654 and round(n / 1e9) == 675


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["model.family=gpt9"], "model.family"),
        (["model=qwen3_moe_debug", "model.moe.top_k=9"], "model.moe.top_k"),
        (["model=qwen3_moe_debug", "model.head_dim=33"], "model.head_dim"),
        (["model=qwen3_moe_debug", "parallel=tp", "model.moe.n_shared_experts=1", "model.moe.expert_hidden=33"], "model.moe.expert_hidden"),
        (["model=qwen3_moe_debug", "parallel=pp"], "model.moe.aux_loss_coef"),  # not carried through pipeline schedules
    ],
)
def test_family_config_errors_name_the_key(overrides, key):
    cfg = compose_typed(*overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=2 if any(o.startswith("parallel=") for o in overrides) else 1)
    assert err.value.key == key


def _tiny_titan(family_overrides):
    cfg = compose_typed("model=qwen3_moe_debug", *family_overrides)
    args = model_args(cfg.model, vocab_size=96, seq_len=16)
    model = build_model(args)
    model.to_empty(device="cpu")
    model.init_weights(seed=3)
    with torch.no_grad():  # non-trivial norm weights, so a wrong reordering would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.rand_like(p) * 0.5)
    return model.eval(), args


@pytest.mark.parametrize("moe", [False, True])
def test_export_matches_transformers_logits(tmp_path, moe):
    """titan -> safetensors dir -> transformers' from_pretrained: same logits."""
    import transformers

    from titan.interop import save_hf

    extra = [] if moe else ["model.moe.num_experts=0"]
    model, args = _tiny_titan(["model.n_layers=2", "model.moe.n_dense_layers=0", *extra])
    save_hf(tmp_path, model.state_dict(), args)
    cls = transformers.Qwen3MoeForCausalLM if moe else transformers.Qwen3ForCausalLM
    theirs = cls.from_pretrained(tmp_path, dtype=torch.float32).eval()
    tokens = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        assert torch.allclose(model(tokens), theirs(tokens).logits, atol=1e-5)


def imported_model(state, args):
    """A titan model holding an imported state dict (built on meta, then materialised)."""
    model = build_model(args)
    model.to_empty(device="cpu")
    model.init_buffers()
    model.load_state_dict(state)
    return model


def test_import_from_transformers_matches_logits(tmp_path):
    """transformers' own random Qwen3-MoE (one dense layer first) -> save_pretrained -> titan."""
    import transformers

    from titan.interop import load_hf

    config = transformers.Qwen3MoeConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=True, mlp_only_layers=[0], max_position_embeddings=64,
    )
    torch.manual_seed(0)
    theirs = transformers.Qwen3MoeForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "norm" in name:
                p.add_(torch.rand_like(p) * 0.5)
    theirs.save_pretrained(tmp_path)
    state, args = load_hf(tmp_path)
    ours = imported_model(state, args)
    tokens = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        assert torch.allclose(ours.eval()(tokens), theirs(tokens).logits, atol=1e-5)


def test_dry_run_and_plan_report_active_parameters():
    from titan.plan import plan
    from titan.train.dry_run import dry_run

    cfg = compose_typed("model=qwen3_30b_a3b", "training.dry_run=true")
    report = dry_run(cfg)
    assert report["params"] == 30_532_122_624 and report["active_params"] == 3_353_032_704
    # MFU counts active FLOPs: 6 x active matmul parameters (+ attention), far below 6 x total.
    assert report["flops_per_token"] < 6 * 3.4e9 + 1e9
    p = plan(compose_typed("model=qwen3_30b_a3b", "parallel=fsdp_ep", "parallel.nproc_per_node=8"), world_size=8)
    assert p.active_params == report["active_params"]
    assert p.communication["ep: token all-to-all (dispatch + combine)"] > 0
