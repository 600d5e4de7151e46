"""Hugging Face Qwen3 / Qwen3-MoE <-> titan: names, the rotary layout, config.json.

Llama's conversion (titan/interop/hf.py) applies: the same names for attention and norms, and
wq / wk rows reordered per head from titan's interleaved rotary pairs to HF's half split. On
top: q_norm / k_norm weights (one head's worth, reordered the same way), and for MoE layers
the router (`mlp.gate`) and the experts, which titan stacks into (E, ...) tensors and HF
checkpoints keep one per expert (`mlp.experts.{e}.gate_proj` ...).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from titan.interop.errors import ConversionError
from titan.interop.hf import (
    _GLOBAL_NAMES,
    _LAYER_NAMES,
    decoder_fields,
    dtype_name,
    rename_from_hf,
    rename_to_hf,
    special_token_ids,
)
from titan.models.moe import MoEArgs
from titan.models.qwen3.model import Qwen3Args

MODEL_TYPES = ("qwen3", "qwen3_moe")

_QK_NORMS = {"attention.q_norm.weight": "self_attn.q_norm.weight", "attention.k_norm.weight": "self_attn.k_norm.weight"}
_DENSE_FFN = {k: v for k, v in _LAYER_NAMES.items() if k.startswith("feed_forward.")}
EXPERT_PROJECTIONS = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}  # also shared experts


def _check_supported(args: Qwen3Args) -> None:
    moe = args.moe
    if moe is None:
        return
    if moe.n_shared_experts or moe.score != "softmax" or moe.route_scale != 1.0 or moe.bias_update_rate > 0:
        raise ConversionError(
            "Qwen3-MoE has softmax routing without shared experts, route scaling or selection bias; "
            "this model's MoE settings have no Qwen3MoeForCausalLM equivalent"
        )


def _plain_names(args: Qwen3Args) -> dict[str, str]:
    """titan name -> HF name for every parameter that maps one to one."""
    names = dict(_GLOBAL_NAMES)
    for i in range(args.n_layers):
        layer = {k: v for k, v in _LAYER_NAMES.items() if k not in _DENSE_FFN}
        if args.qk_norm:
            layer.update(_QK_NORMS)
        if args.is_moe_layer(i):
            layer["feed_forward.router.gate.weight"] = "mlp.gate.weight"
        else:
            layer.update(_DENSE_FFN)
        names.update({f"layers.{i}.{ours}": f"model.layers.{i}.{theirs}" for ours, theirs in layer.items()})
    return names


def expert_names(args: Qwen3Args) -> dict[str, list[str]]:
    """titan stacked expert weight -> HF per-expert names, in expert order (also DeepSeek-V3's)."""
    return {
        f"layers.{i}.feed_forward.experts.{ours}": [f"model.layers.{i}.mlp.experts.{e}.{theirs}.weight" for e in range(args.moe.num_experts)]
        for i in range(args.n_layers) if args.is_moe_layer(i)
        for ours, theirs in EXPERT_PROJECTIONS.items()
    }


def split_experts(state_dict: dict[str, torch.Tensor], experts: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """titan's stacked (E, ...) expert weights -> one HF tensor per expert."""
    return {name: state_dict[ours][e] for ours, theirs in experts.items() for e, name in enumerate(theirs)}


def stack_experts(hf_state_dict: dict[str, torch.Tensor], experts: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """HF's per-expert tensors -> titan's stacked (E, ...) expert weights."""
    return {ours: torch.stack([hf_state_dict[n] for n in theirs]) for ours, theirs in experts.items()}


def _rotary(args: Qwen3Args, name: str) -> Optional[int]:
    """Heads whose rows are reordered for this tensor (None: not rotary)."""
    if name.endswith("attention.wq.weight"):
        return args.n_heads
    if name.endswith("attention.wk.weight"):
        return args.kv_heads
    if name.endswith(("attention.q_norm.weight", "attention.k_norm.weight")):
        return 1
    return None


def to_hf(state_dict: dict[str, torch.Tensor], args: Qwen3Args) -> dict[str, torch.Tensor]:
    _check_supported(args)
    experts = expert_names(args)
    out = rename_to_hf(state_dict, _plain_names(args), lambda name: _rotary(args, name), args.tie_embeddings,
                       converted_elsewhere=frozenset(experts))
    return {**out, **split_experts(state_dict, experts)}


def from_hf(hf_state_dict: dict[str, torch.Tensor], args: Qwen3Args) -> dict[str, torch.Tensor]:
    _check_supported(args)
    experts = expert_names(args)
    out = rename_from_hf(hf_state_dict, _plain_names(args), lambda name: _rotary(args, name), args.tie_embeddings,
                         converted_elsewhere=frozenset(n for names in experts.values() for n in names))
    return {**out, **stack_experts(hf_state_dict, experts)}


def hf_config(args: Qwen3Args, torch_dtype: torch.dtype | str = "float32", bos_token_id: Optional[int] = None,
              eos_token_id: Optional[int] = None) -> dict[str, Any]:
    """config.json for transformers' Qwen3ForCausalLM (dense) or Qwen3MoeForCausalLM."""
    _check_supported(args)
    torch_dtype = dtype_name(torch_dtype)
    if args.rope_scaling_factor is not None:
        raise ConversionError("Qwen3 export: Llama 3.1 RoPE scaling has no Qwen3 equivalent")
    if not args.qk_norm:
        raise ConversionError("Qwen3 export: Qwen3 always normalises q and k; this model has qk_norm=false")
    moe = args.moe is not None and args.moe.num_experts > 0
    config: dict[str, Any] = {
        "architectures": ["Qwen3MoeForCausalLM" if moe else "Qwen3ForCausalLM"],
        "model_type": "qwen3_moe" if moe else "qwen3",
        **decoder_fields(args),
        "rope_theta": float(args.rope_theta),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(args.rope_theta)},
        "tie_word_embeddings": bool(args.tie_embeddings),
        "vocab_size": args.vocab_size,
        "max_position_embeddings": args.max_seq_len,
        "initializer_range": args.init_std,
        "use_sliding_window": False,
        "torch_dtype": torch_dtype,
        "use_cache": True,
    }
    if moe:
        m = args.moe
        config.update(
            num_experts=m.num_experts,
            num_experts_per_tok=m.top_k,
            moe_intermediate_size=m.expert_hidden,
            norm_topk_prob=bool(m.norm_topk),
            decoder_sparse_step=1,
            mlp_only_layers=list(range(m.n_dense_layers)),
            router_aux_loss_coef=m.aux_loss_coef,
            output_router_logits=False,
        )
    config.update(special_token_ids(bos_token_id, eos_token_id))
    return config


def _get(config: dict[str, Any], key: str) -> Any:
    if key not in config:
        raise ConversionError(f"config.json has no {key!r}")
    return config[key]


def _rope_theta(config: dict[str, Any]) -> float:
    params = config.get("rope_parameters") or {}
    kind = params.get("rope_type", "default")
    scaling = config.get("rope_scaling")
    if kind != "default" or (scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default")):
        raise ConversionError("config.json: only the default RoPE converts to titan's Qwen3 (no YaRN / scaling)")
    return float(params.get("rope_theta", config.get("rope_theta", 1_000_000.0)))


def args_from_hf_config(config: dict[str, Any]) -> Qwen3Args:
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConversionError(f"config.json model_type={model_type!r} is not a Qwen3 model")
    for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("use_sliding_window", False)):
        if config.get(key, ok) != ok:
            raise ConversionError(f"config.json {key}={config[key]!r} is not supported (titan needs {ok!r})")
    n_layers = _get(config, "num_hidden_layers")
    moe = None
    if model_type == "qwen3_moe":
        dense = list(config.get("mlp_only_layers") or [])
        if config.get("decoder_sparse_step", 1) != 1 or dense != list(range(len(dense))):
            raise ConversionError("config.json: titan's MoE layers must follow a (possibly empty) prefix of dense layers "
                                  "(decoder_sparse_step=1, mlp_only_layers=[0..n-1])")
        moe = MoEArgs(
            num_experts=config.get("num_experts", config.get("num_local_experts")),
            top_k=_get(config, "num_experts_per_tok"),
            expert_hidden=_get(config, "moe_intermediate_size"),
            score="softmax",
            norm_topk=bool(config.get("norm_topk_prob", False)),
            aux_loss_coef=float(config.get("router_aux_loss_coef", 0.0)),
            n_dense_layers=len(dense),
        )
    dim, n_heads = _get(config, "hidden_size"), _get(config, "num_attention_heads")
    return Qwen3Args(
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads,
        vocab_size=_get(config, "vocab_size"),
        explicit_head_dim=config.get("head_dim") or dim // n_heads,
        intermediate_size=_get(config, "intermediate_size"),
        norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=_rope_theta(config),
        qk_norm=True,
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        init_std=config.get("initializer_range", 0.02),
        max_seq_len=config.get("max_position_embeddings", 2048),
        moe=moe,
    )
