"""The Qwen3 family (dense and MoE) and a DeepSeek-V3-style MoE family on the same module.

`model.family=qwen3` (presets qwen3_*): QK-norm attention, dense or MoE FFN, Hugging Face
Qwen3ForCausalLM / Qwen3MoeForCausalLM adapter. `model.family=deepseek_v3` (presets
deepseek_v3_*): the same decoder with DeepSeek-V3's MoE (shared experts, sigmoid routing, bias
balancing, first layers dense) and multi-head latent attention (`model.mla`, `qwen3/mla.py`) or
grouped-query attention; HF DeepseekV3ForCausalLM adapter (`qwen3/deepseek_hf.py`) for MLA models.
"""

from __future__ import annotations

from titan.config.errors import ConfigError
from titan.models.moe import MoEArgs
from titan.models.qwen3 import deepseek_hf
from titan.models.qwen3 import hf as qwen3_hf
from titan.models.qwen3.mla import MLAArgs
from titan.models.qwen3.model import DeepSeekV3Args, Qwen3, Qwen3Args, active_params
from titan.models.registry import Family, args_from_fields, register


def _moe_args(cfg) -> MoEArgs | None:
    m = cfg.moe
    if m.num_experts <= 0:
        return None
    return MoEArgs(
        num_experts=m.num_experts,
        top_k=m.top_k,
        expert_hidden=m.expert_hidden,
        n_shared_experts=m.n_shared_experts,
        score=getattr(m.score, "value", m.score),
        norm_topk=m.norm_topk,
        route_scale=m.route_scale,
        aux_loss_coef=m.aux_loss_coef,
        bias_update_rate=m.bias_update_rate,
        n_dense_layers=m.n_dense_layers,
        grouped_mm=m.grouped_mm,
    )


def _mla_args(cfg) -> MLAArgs | None:
    m = cfg.mla
    if m.kv_lora_rank <= 0:
        return None
    return MLAArgs(m.kv_lora_rank, m.q_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim)


def _args_builder(args_class):
    def build(cfg, vocab_size: int, seq_len: int):
        extra = {"mla": _mla_args(cfg)} if args_class is DeepSeekV3Args else {}
        return args_from_fields(
            args_class, cfg, vocab_size, seq_len,
            explicit_head_dim=cfg.head_dim, intermediate_size=cfg.ffn_hidden, qk_norm=cfg.qk_norm, moe=_moe_args(cfg), **extra,
        )

    return build


def validate_moe(cfg) -> None:
    """MoE fields that cannot work; each error names the key."""
    m = cfg.moe
    if m.num_experts <= 0:
        return
    if not 0 < m.top_k <= m.num_experts:
        raise ConfigError("model.moe.top_k", f"{m.top_k} must be in 1..num_experts={m.num_experts}")
    if m.expert_hidden <= 0:
        raise ConfigError("model.moe.expert_hidden", "must be positive with num_experts > 0 (the hidden size of one expert)")
    if not 0 <= m.n_dense_layers <= cfg.n_layers:
        raise ConfigError("model.moe.n_dense_layers", f"{m.n_dense_layers} must be in 0..n_layers={cfg.n_layers}")
    if m.aux_loss_coef < 0 or m.bias_update_rate < 0:
        raise ConfigError("model.moe", "aux_loss_coef and bias_update_rate must be >= 0")


def validate_qwen3(cfg) -> None:
    validate_moe(cfg)
    if cfg.mla.kv_lora_rank > 0:
        raise ConfigError("model.mla.kv_lora_rank", "multi-head latent attention belongs to model.family=deepseek_v3; set it to 0")


def validate_mla(cfg) -> None:
    validate_moe(cfg)
    a = cfg.mla
    if a.kv_lora_rank > 0:
        for key in ("q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if getattr(a, key) < (0 if key == "q_lora_rank" else 1):
                raise ConfigError(f"model.mla.{key}", "must be positive (q_lora_rank: 0 or positive)")
        if cfg.n_kv_heads not in (None, cfg.n_heads):
            raise ConfigError("model.n_kv_heads", "latent attention gives every head its own key and value; set it to null (or n_heads)")
        if a.qk_rope_head_dim % 2:
            raise ConfigError("model.mla.qk_rope_head_dim", f"{a.qk_rope_head_dim} must be even (RoPE turns pairs)")


# Every dim: TP splits the attention (QK-norm per local head) and dense / shared FFNs, EP the
# routed experts (titan/parallel/tp.py, expert.py); pipeline stages are pruned models.
_DIMS = frozenset({"dp_replicate", "dp_shard", "cp", "tp", "pp", "ep"})

QWEN3 = register(
    Family(
        name="qwen3",
        args_class=Qwen3Args,
        module_class=Qwen3,
        args_from_config=_args_builder(Qwen3Args),
        active_params=active_params,
        hf=qwen3_hf,
        validate=validate_qwen3,
        parallel_dims=_DIMS,
    )
)
DEEPSEEK_V3 = register(
    Family(
        name="deepseek_v3",
        args_class=DeepSeekV3Args,
        module_class=Qwen3,
        args_from_config=_args_builder(DeepSeekV3Args),
        active_params=active_params,
        hf=deepseek_hf,
        validate=validate_mla,
        parallel_dims=_DIMS,
    )
)
