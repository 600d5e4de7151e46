"""Hugging Face Llama <-> titan: parameter names, the rotary layout of q/k, and config.json.

titan's RoPE (like Meta's original Llama code) rotates interleaved pairs (x[2i], x[2i+1]) of
each head; Hugging Face's Llama rotates the pair (x[i], x[i + head_dim/2]). The two agree once
the output rows of wq and wk are reordered within each head, so conversion permutes those rows
(per query head for wq, per key/value head for wk). Everything else is a rename. Pure functions:
nothing here touches the disk.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from titan.interop.errors import ConversionError
from titan.models.llama3 import LlamaArgs

# Per-layer names: titan suffix -> Hugging Face suffix.
_LAYER_NAMES = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def name_map(args: LlamaArgs) -> dict[str, str]:
    """titan parameter name -> Hugging Face name, for every parameter of the model."""
    names = dict(_GLOBAL_NAMES)
    for i in range(args.n_layers):
        for ours, theirs in _LAYER_NAMES.items():
            names[f"layers.{i}.{ours}"] = f"model.layers.{i}.{theirs}"
    return names


def interleaved_to_half_split(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's output rows from pairs (2i, 2i+1) to (i, i + head_dim/2)."""
    rows = weight.shape[0]
    head_dim = rows // n_heads
    return weight.reshape(n_heads, head_dim // 2, 2, -1).transpose(1, 2).reshape(weight.shape).contiguous()


def half_split_to_interleaved(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `interleaved_to_half_split`."""
    rows = weight.shape[0]
    head_dim = rows // n_heads
    return weight.reshape(n_heads, 2, head_dim // 2, -1).transpose(1, 2).reshape(weight.shape).contiguous()


def _rotary_heads(args: LlamaArgs, titan_name: str) -> Optional[int]:
    """Heads whose rows must be permuted for this parameter (None: not a rotary projection)."""
    if titan_name.endswith("attention.wq.weight"):
        return args.n_heads
    if titan_name.endswith("attention.wk.weight"):
        return args.kv_heads
    return None


def _check_keys(given: set[str], expected: set[str], where: str) -> None:
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} (e.g. {unexpected[:3]})")
        raise ConversionError(f"{where} does not match the model args: {'; '.join(parts)}")


def _check_tied(embedding: torch.Tensor, output: Optional[torch.Tensor], where: str) -> None:
    if output is not None and output is not embedding and not torch.equal(output, embedding):
        raise ConversionError(f"{where}: the model ties embeddings, but the output weight differs from the embedding")


def to_hf(state_dict: dict[str, torch.Tensor], args: LlamaArgs) -> dict[str, torch.Tensor]:
    """titan state dict -> Hugging Face LlamaForCausalLM state dict (`lm_head` left out when tied)."""
    names = name_map(args)
    expected = set(names)
    given = set(state_dict)
    if args.tie_embeddings:
        expected.discard("output.weight")
        given.discard("output.weight")  # a tied state dict may or may not list it
    _check_keys(given, expected, "titan state dict")
    if args.tie_embeddings:
        _check_tied(state_dict["tok_embeddings.weight"], state_dict.get("output.weight"), "titan state dict")
    out = {}
    for ours in sorted(expected):
        tensor = state_dict[ours]
        heads = _rotary_heads(args, ours)
        out[names[ours]] = interleaved_to_half_split(tensor, heads) if heads else tensor
    return out


def from_hf(hf_state_dict: dict[str, torch.Tensor], args: LlamaArgs) -> dict[str, torch.Tensor]:
    """Hugging Face Llama state dict -> titan state dict (with `output.weight` = embedding when tied,
    as `Llama3.state_dict()` lists it)."""
    theirs_to_ours = {theirs: ours for ours, theirs in name_map(args).items()}
    # Buffers some exporters keep (rotary inv_freq) are recomputed by titan: drop them.
    given = {k for k in hf_state_dict if not k.endswith("rotary_emb.inv_freq")}
    expected = set(theirs_to_ours)
    if args.tie_embeddings:
        expected.discard("lm_head.weight")
        given.discard("lm_head.weight")  # transformers ignores it when tied; so do we
    _check_keys(given, expected, "Hugging Face state dict")
    out = {}
    for theirs in sorted(expected):
        ours = theirs_to_ours[theirs]
        tensor = hf_state_dict[theirs]
        heads = _rotary_heads(args, ours)
        out[ours] = half_split_to_interleaved(tensor, heads) if heads else tensor
    if args.tie_embeddings:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def hf_config(args: LlamaArgs, torch_dtype: torch.dtype | str = "float32", bos_token_id: Optional[int] = None,
              eos_token_id: Optional[int] = None) -> dict[str, Any]:
    """config.json for transformers' LlamaForCausalLM with the same architecture as `args`."""
    if isinstance(torch_dtype, torch.dtype):
        torch_dtype = _DTYPE_NAMES.get(torch_dtype, str(torch_dtype).removeprefix("torch."))
    rope_scaling = None
    if args.rope_scaling_factor is not None:
        rope_scaling = {
            "rope_type": "llama3",
            "factor": float(args.rope_scaling_factor),
            "low_freq_factor": float(args.rope_low_freq_factor),
            "high_freq_factor": float(args.rope_high_freq_factor),
            "original_max_position_embeddings": int(args.rope_original_max_seq_len),
        }
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads,
        "num_hidden_layers": args.n_layers,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": float(args.rope_theta),
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": bool(args.tie_embeddings),
        "vocab_size": args.vocab_size,
        "max_position_embeddings": args.max_seq_len,
        "initializer_range": args.init_std,
        "torch_dtype": torch_dtype,
        "use_cache": True,
    }
    if bos_token_id is not None:
        config["bos_token_id"] = bos_token_id
    if eos_token_id is not None:
        config["eos_token_id"] = eos_token_id
    return config


def _ffn_sizing(dim: int, intermediate: int) -> tuple[int, Optional[float]]:
    """(multiple_of, ffn_dim_multiplier) for which `LlamaArgs.ffn_hidden` gives `intermediate`.

    HF stores the hidden size itself; titan derives it. With multiple_of = intermediate, any
    pre-rounding size in (0, intermediate] rounds up to exactly `intermediate`."""
    base = int(2 * (4 * dim) / 3)
    if intermediate >= base:
        return intermediate, None
    return intermediate, intermediate / base


def _require(config: dict[str, Any], key: str) -> Any:
    if key not in config:
        raise ConversionError(f"config.json has no {key!r}")
    return config[key]


def args_from_hf_config(config: dict[str, Any]) -> LlamaArgs:
    """LlamaArgs for a Hugging Face Llama config.json; unsupported variants are refused."""
    model_type = config.get("model_type", "llama")
    if model_type != "llama":
        raise ConversionError(f"config.json model_type={model_type!r}: only 'llama' converts to titan")
    for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if config.get(key, ok) != ok:
            raise ConversionError(f"config.json {key}={config[key]!r} is not supported (titan needs {ok!r})")
    dim = _require(config, "hidden_size")
    n_heads = _require(config, "num_attention_heads")
    head_dim = config.get("head_dim") or dim // n_heads
    if head_dim * n_heads != dim:
        raise ConversionError(f"config.json head_dim={head_dim} x {n_heads} heads != hidden_size={dim}; titan needs them equal")
    multiple_of, multiplier = _ffn_sizing(dim, _require(config, "intermediate_size"))
    args = LlamaArgs(
        dim=dim,
        n_layers=_require(config, "num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads,
        vocab_size=_require(config, "vocab_size"),
        multiple_of=multiple_of,
        ffn_dim_multiplier=multiplier,
        norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=float(config.get("rope_theta", 10000.0)),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        init_std=config.get("initializer_range", 0.02),
        max_seq_len=config.get("max_position_embeddings", 2048),
    )
    scaling = config.get("rope_scaling")
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "llama3":
            args.rope_scaling_factor = float(scaling["factor"])
            args.rope_low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
            args.rope_high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
            args.rope_original_max_seq_len = int(scaling.get("original_max_position_embeddings", 8192))
        elif kind != "default":
            raise ConversionError(f"config.json rope_scaling type {kind!r} is not supported (titan has 'llama3' only)")
    if args.ffn_hidden != config["intermediate_size"]:  # guards _ffn_sizing's float arithmetic
        raise ConversionError(f"cannot express intermediate_size={config['intermediate_size']} with titan's FFN sizing")
    return args
