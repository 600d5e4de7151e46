"""Hugging Face DeepseekV3ForCausalLM <-> titan's deepseek_v3 family with multi-head latent
attention: names and config.json.

No tensor is reordered: DeepSeek lays the rotary dims out in interleaved pairs
(`rope_interleave=true`), as titan's RoPE does. Experts are stacked (E, ...) in titan and kept
one per expert in checkpoints (`mlp.experts.{e}.gate_proj` ...), which transformers fuses on
load. What titan cannot express is refused: group-limited routing that drops groups
(topk_group < n_group), YaRN RoPE, attention biases, the half-split rotary layout.
`e_score_correction_bias` is the router's selection bias; an imported model keeps it and
updates it at DeepSeek-V3's rate (0.001) unless the config sets model.moe.bias_update_rate.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from titan.interop.errors import ConversionError
from titan.interop.hf import _GLOBAL_NAMES, _LAYER_NAMES, dtype_name, rename_from_hf, rename_to_hf
from titan.models.moe import MoEArgs
from titan.models.qwen3.hf import EXPERT_PROJECTIONS, expert_names, split_experts, stack_experts
from titan.models.qwen3.mla import MLAArgs
from titan.models.qwen3.model import DeepSeekV3Args

MODEL_TYPES = ("deepseek_v3",)
DEFAULT_BIAS_UPDATE_RATE = 0.001  # DeepSeek-V3's gamma

_NORMS = {"attention_norm.weight": _LAYER_NAMES["attention_norm.weight"], "ffn_norm.weight": _LAYER_NAMES["ffn_norm.weight"]}
_DENSE_FFN = {k: v for k, v in _LAYER_NAMES.items() if k.startswith("feed_forward.")}
_SHARED = {f"feed_forward.shared.{w}.weight": f"mlp.shared_experts.{p}.weight" for w, p in EXPERT_PROJECTIONS.items()}


def _attention_names(mla: MLAArgs) -> dict[str, str]:
    names = {
        "attention.wkv_a.weight": "self_attn.kv_a_proj_with_mqa.weight",
        "attention.kv_norm.weight": "self_attn.kv_a_layernorm.weight",
        "attention.wkv_b.weight": "self_attn.kv_b_proj.weight",
        "attention.wo.weight": "self_attn.o_proj.weight",
    }
    if mla.q_lora_rank:
        names.update({
            "attention.wq_a.weight": "self_attn.q_a_proj.weight",
            "attention.q_norm.weight": "self_attn.q_a_layernorm.weight",
            "attention.wq_b.weight": "self_attn.q_b_proj.weight",
        })
    else:
        names["attention.wq.weight"] = "self_attn.q_proj.weight"
    return names


def _check_supported(args: DeepSeekV3Args) -> None:
    if args.mla is None:
        raise ConversionError("DeepseekV3ForCausalLM has multi-head latent attention; this model uses grouped-query attention (model.mla.kv_lora_rank=0)")
    moe = args.moe
    if moe is None or moe.num_experts == 0:
        raise ConversionError("DeepseekV3ForCausalLM is a mixture-of-experts model; this one has no experts")
    if moe.score != "sigmoid" or not moe.n_shared_experts:
        raise ConversionError("DeepSeek-V3 routes with sigmoid scores next to shared experts; set model.moe.score=sigmoid and n_shared_experts > 0")


def _plain_names(args: DeepSeekV3Args) -> dict[str, str]:
    names = dict(_GLOBAL_NAMES)
    for i in range(args.n_layers):
        layer = {**_NORMS, **_attention_names(args.mla)}
        if args.is_moe_layer(i):
            layer["feed_forward.router.gate.weight"] = "mlp.gate.weight"
            layer.update(_SHARED)
        else:
            layer.update(_DENSE_FFN)
        names.update({f"layers.{i}.{ours}": f"model.layers.{i}.{theirs}" for ours, theirs in layer.items()})
    return names


def _moe_layers(args: DeepSeekV3Args) -> list[int]:
    return [i for i in range(args.n_layers) if args.is_moe_layer(i)]


def _bias_names(args: DeepSeekV3Args) -> dict[str, str]:
    return {f"layers.{i}.feed_forward.router.expert_bias": f"model.layers.{i}.mlp.gate.e_score_correction_bias" for i in _moe_layers(args)}


def to_hf(state_dict: dict[str, torch.Tensor], args: DeepSeekV3Args) -> dict[str, torch.Tensor]:
    _check_supported(args)
    plain, experts, biases = _plain_names(args), expert_names(args), _bias_names(args)
    # No rotary reordering (heads None): the adapter keeps DeepSeek's own rope layout.
    rest = {k: v for k, v in state_dict.items() if k not in biases}  # biases: present or not
    out = rename_to_hf(rest, plain, lambda name: None, args.tie_embeddings, converted_elsewhere=frozenset(experts))
    out.update(split_experts(state_dict, experts))
    for ours, theirs in biases.items():  # absent when the model does not balance by bias: zeros
        out[theirs] = state_dict.get(ours, torch.zeros(args.moe.num_experts)).float()
    return out


def from_hf(hf_state_dict: dict[str, torch.Tensor], args: DeepSeekV3Args) -> dict[str, torch.Tensor]:
    _check_supported(args)
    plain, experts, biases = _plain_names(args), expert_names(args), _bias_names(args)
    elsewhere = frozenset(n for names in experts.values() for n in names) | frozenset(biases.values())
    out = rename_from_hf(hf_state_dict, plain, lambda name: None, args.tie_embeddings, converted_elsewhere=elsewhere)
    out.update(stack_experts(hf_state_dict, experts))
    if args.moe.bias_update_rate > 0:  # a persistent buffer only then (titan.models.moe.Router)
        out.update({ours: hf_state_dict[theirs] for ours, theirs in biases.items()})
    return out


def hf_config(args: DeepSeekV3Args, torch_dtype: torch.dtype | str = "float32", bos_token_id: Optional[int] = None,
              eos_token_id: Optional[int] = None) -> dict[str, Any]:
    _check_supported(args)
    torch_dtype = dtype_name(torch_dtype)
    if args.rope_scaling_factor is not None:
        raise ConversionError("DeepSeek-V3 export: Llama 3.1 RoPE scaling has no DeepseekV3 equivalent")
    m, a = args.moe, args.mla
    config: dict[str, Any] = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden,
        "moe_intermediate_size": m.expert_hidden,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_heads,
        "n_shared_experts": m.n_shared_experts,
        "n_routed_experts": m.num_experts,
        "routed_scaling_factor": float(m.route_scale),
        "kv_lora_rank": a.kv_lora_rank,
        "q_lora_rank": a.q_lora_rank or None,
        "qk_rope_head_dim": a.qk_rope_head_dim,
        "qk_nope_head_dim": a.qk_nope_head_dim,
        "v_head_dim": a.v_head_dim,
        "n_group": 1,
        "topk_group": 1,
        "num_experts_per_tok": m.top_k,
        "first_k_dense_replace": m.n_dense_layers,
        "norm_topk_prob": bool(m.norm_topk),
        "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len,
        "initializer_range": args.init_std,
        "rms_norm_eps": args.norm_eps,
        "tie_word_embeddings": bool(args.tie_embeddings),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(args.rope_theta)},
        "rope_interleave": True,
        "attention_bias": False,
        "torch_dtype": torch_dtype,
        "use_cache": True,
    }
    if bos_token_id is not None:
        config["bos_token_id"] = bos_token_id
    if eos_token_id is not None:
        config["eos_token_id"] = eos_token_id
    return config


def _get(config: dict[str, Any], key: str) -> Any:
    if config.get(key) is None:
        raise ConversionError(f"config.json has no {key!r}")
    return config[key]


def args_from_hf_config(config: dict[str, Any]) -> DeepSeekV3Args:
    if config.get("model_type") not in MODEL_TYPES:
        raise ConversionError(f"config.json model_type={config.get('model_type')!r} is not a DeepSeek-V3 model")
    for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("rope_interleave", True)):
        if config.get(key, ok) != ok:
            raise ConversionError(f"config.json {key}={config[key]!r} is not supported (titan needs {ok!r})")
    groups, kept = config.get("n_group") or 1, config.get("topk_group") or 1
    if kept < groups:
        raise ConversionError(f"config.json: group-limited routing (topk_group={kept} of n_group={groups}) is not implemented in titan")
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if params.get("rope_type", params.get("type", "default")) != "default":
        raise ConversionError("config.json: only the default RoPE converts to titan's DeepSeek-V3 (no YaRN)")
    n_heads = _get(config, "num_attention_heads")
    if config.get("num_key_value_heads", n_heads) != n_heads:
        raise ConversionError("config.json: DeepSeek-V3's latent attention has num_key_value_heads == num_attention_heads")
    return DeepSeekV3Args(
        dim=_get(config, "hidden_size"),
        n_layers=_get(config, "num_hidden_layers"),
        n_heads=n_heads,
        vocab_size=_get(config, "vocab_size"),
        intermediate_size=_get(config, "intermediate_size"),
        norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=float(params.get("rope_theta", config.get("rope_theta", 10_000.0))),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        init_std=config.get("initializer_range", 0.02),
        max_seq_len=config.get("max_position_embeddings", 4096),
        mla=MLAArgs(
            kv_lora_rank=_get(config, "kv_lora_rank"),
            q_lora_rank=config.get("q_lora_rank") or 0,
            qk_nope_head_dim=_get(config, "qk_nope_head_dim"),
            qk_rope_head_dim=_get(config, "qk_rope_head_dim"),
            v_head_dim=_get(config, "v_head_dim"),
        ),
        moe=MoEArgs(
            num_experts=config.get("n_routed_experts", config.get("num_local_experts")),
            top_k=_get(config, "num_experts_per_tok"),
            expert_hidden=_get(config, "moe_intermediate_size"),
            n_shared_experts=_get(config, "n_shared_experts"),
            score="sigmoid",
            norm_topk=bool(config.get("norm_topk_prob", True)),
            route_scale=float(config.get("routed_scaling_factor", 1.0)),
            bias_update_rate=DEFAULT_BIAS_UPDATE_RATE,
            n_dense_layers=config.get("first_k_dense_replace") or 0,
        ),
    )
