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


def _reorder(tensor: torch.Tensor, heads: Optional[int], fn) -> torch.Tensor:
    """`fn` (one of the two reorderings) over `heads` heads; a 1-D tensor (a per-head norm
    weight) as one column. heads=None: not rotary, unchanged."""
    if heads is None:
        return tensor
    if tensor.dim() == 1:
        return fn(tensor.unsqueeze(-1), heads).squeeze(-1)
    return fn(tensor, heads)


def rename_to_hf(state_dict: dict[str, torch.Tensor], names: dict[str, str], heads_of, tied: bool,
                 converted_elsewhere: frozenset = frozenset()) -> dict[str, torch.Tensor]:
    """titan -> HF for the one-to-one `names` (titan -> HF), rotary rows reordered over
    `heads_of(titan name)` heads; `lm_head` left out when tied. `converted_elsewhere`: titan
    names the caller converts itself, expected in the state dict all the same."""
    expected, given = set(names) | set(converted_elsewhere), set(state_dict)
    if tied:
        expected.discard("output.weight")
        given.discard("output.weight")  # a tied state dict may or may not list it
    _check_keys(given, expected, "titan state dict")
    if tied:
        _check_tied(state_dict["tok_embeddings.weight"], state_dict.get("output.weight"), "titan state dict")
    return {names[ours]: _reorder(state_dict[ours], heads_of(ours), interleaved_to_half_split)
            for ours in sorted(expected & set(names))}


def rename_from_hf(hf_state_dict: dict[str, torch.Tensor], names: dict[str, str], heads_of, tied: bool,
                   converted_elsewhere: frozenset = frozenset()) -> dict[str, torch.Tensor]:
    """The inverse of `rename_to_hf` (`converted_elsewhere`: HF names the caller converts);
    `output.weight` is the embedding when tied, as the titan model's state_dict lists it."""
    # Buffers some exporters keep (rotary inv_freq) are recomputed by titan: drop them.
    given = {k for k in hf_state_dict if not k.endswith("rotary_emb.inv_freq")}
    expected = set(names.values()) | set(converted_elsewhere)
    if tied:
        expected.discard("lm_head.weight")
        given.discard("lm_head.weight")  # transformers ignores it when tied; so do we
    _check_keys(given, expected, "Hugging Face state dict")
    out = {ours: _reorder(hf_state_dict[theirs], heads_of(ours), half_split_to_interleaved)
           for ours, theirs in names.items() if theirs in expected}
    if tied:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


def to_hf(state_dict: dict[str, torch.Tensor], args: LlamaArgs) -> dict[str, torch.Tensor]:
    """titan state dict -> Hugging Face LlamaForCausalLM state dict (`lm_head` left out when tied)."""
    return rename_to_hf(state_dict, name_map(args), lambda name: _rotary_heads(args, name), args.tie_embeddings)


def from_hf(hf_state_dict: dict[str, torch.Tensor], args: LlamaArgs) -> dict[str, torch.Tensor]:
    """Hugging Face Llama state dict -> titan state dict (with `output.weight` = embedding when tied,
    as `Llama3.state_dict()` lists it)."""
    return rename_from_hf(hf_state_dict, name_map(args), lambda name: _rotary_heads(args, name), args.tie_embeddings)


def dtype_name(torch_dtype: torch.dtype | str) -> str:
    """config.json's `torch_dtype`: "bfloat16" for torch.bfloat16; a string is kept."""
    return str(torch_dtype).removeprefix("torch.") if isinstance(torch_dtype, torch.dtype) else torch_dtype


def rope_parameters(args: LlamaArgs) -> dict[str, Any]:
    """RoPE settings as transformers 5.x writes them (`rope_parameters`)."""
    if args.rope_scaling_factor is None:
        return {"rope_type": "default", "rope_theta": float(args.rope_theta)}
    return {
        "rope_type": "llama3",
        "rope_theta": float(args.rope_theta),
        "factor": float(args.rope_scaling_factor),
        "low_freq_factor": float(args.rope_low_freq_factor),
        "high_freq_factor": float(args.rope_high_freq_factor),
        "original_max_position_embeddings": int(args.rope_original_max_seq_len),
    }


def hf_config(args: LlamaArgs, torch_dtype: torch.dtype | str = "float32", bos_token_id: Optional[int] = None,
              eos_token_id: Optional[int] = None) -> dict[str, Any]:
    """config.json for transformers' LlamaForCausalLM with the same architecture as `args`.

    RoPE is written in both forms: `rope_parameters` (transformers 5.x) and the older top-level
    `rope_theta` / `rope_scaling` (transformers 4.x and other readers); they agree."""
    torch_dtype = dtype_name(torch_dtype)
    rope = rope_parameters(args)
    legacy_scaling = {k: v for k, v in rope.items() if k != "rope_theta"} if args.rope_scaling_factor else None
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **decoder_fields(args),
        "mlp_bias": False,
        "rope_parameters": rope,
        "rope_theta": float(args.rope_theta),
        "rope_scaling": legacy_scaling,
        "tie_word_embeddings": bool(args.tie_embeddings),
        "vocab_size": args.vocab_size,
        # The context the model is made for, not the (often shorter) training sequence length.
        "max_position_embeddings": args.context,
        "initializer_range": args.init_std,
        "dtype": torch_dtype,
        "torch_dtype": torch_dtype,  # the key's name before transformers 5
        "use_cache": True,
        **special_token_ids(bos_token_id, eos_token_id),
    }
    return config


def decoder_fields(args: LlamaArgs) -> dict[str, Any]:
    """The config.json sizes and block settings every Llama-like decoder in transformers reads."""
    return {
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads,
        "num_hidden_layers": args.n_layers,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "attention_bias": False,
        "rms_norm_eps": args.norm_eps,
    }


def special_token_ids(bos_token_id: Optional[int], eos_token_id: Optional[int]) -> dict[str, int]:
    return {k: v for k, v in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id)) if v is not None}


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


# Fields that change what the model computes, with the only value titan can express. A config
# that sets one otherwise is refused rather than converted into a model that computes
# something else. (Dropout, `pretraining_tp` and cache settings do not change inference logits.)
_FIXED_FIELDS = {
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "partial_rotary_factor": 1.0,
}
_LLAMA3_ROPE_KEYS = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}


def read_rope(config: dict[str, Any]) -> dict[str, Any]:
    """One `rope_parameters`-style dict from either form a config.json may hold: transformers
    5.x's `rope_parameters`, or the older top-level `rope_theta` + `rope_scaling`. When both
    are present they must agree (readers differ on which one wins)."""
    legacy: dict[str, Any] = dict(config.get("rope_scaling") or {})
    if "rope_theta" in config:
        legacy["rope_theta"] = config["rope_theta"]
    if "type" in legacy:  # the oldest spelling of rope_type
        legacy.setdefault("rope_type", legacy.pop("type"))
    modern = dict(config.get("rope_parameters") or {})
    if "type" in modern:
        modern.setdefault("rope_type", modern.pop("type"))
    for key in set(legacy) & set(modern):
        if legacy[key] != modern[key]:
            raise ConversionError(f"config.json rope_parameters.{key}={modern[key]!r} disagrees with the "
                                  f"top-level rope_theta/rope_scaling ({legacy[key]!r}); fix the config")
    rope = {**legacy, **modern}
    rope.setdefault("rope_theta", 10000.0)  # transformers' LlamaConfig default
    rope.setdefault("rope_type", "default")
    return rope


def args_from_hf_config(config: dict[str, Any]) -> LlamaArgs:
    """LlamaArgs for a Hugging Face Llama config.json; any setting that changes the model's
    numerics and that titan cannot express is refused, naming the field."""
    model_type = config.get("model_type", "llama")
    if model_type != "llama":
        raise ConversionError(f"config.json model_type={model_type!r}: only 'llama' converts to titan")
    for key, ok in _FIXED_FIELDS.items():
        if config.get(key, ok) != ok:
            raise ConversionError(f"config.json {key}={config[key]!r} is not supported (titan needs {ok!r})")
    dim = _require(config, "hidden_size")
    n_heads = _require(config, "num_attention_heads")
    head_dim = config.get("head_dim") or dim // n_heads
    if head_dim * n_heads != dim:
        raise ConversionError(f"config.json head_dim={head_dim} x {n_heads} heads != hidden_size={dim}; titan needs them equal")
    multiple_of, multiplier = _ffn_sizing(dim, _require(config, "intermediate_size"))
    rope = read_rope(config)
    kind = rope["rope_type"]
    if kind not in ("default", "llama3"):
        raise ConversionError(f"config.json RoPE type {kind!r} (rope_parameters/rope_scaling) is not supported "
                              f"(titan has 'default' and 'llama3')")
    extra = sorted(set(rope) - {"rope_type", "rope_theta"} - (_LLAMA3_ROPE_KEYS if kind == "llama3" else set()))
    if kind == "default":  # transformers ignores scaling fields with the default type: so do we
        extra = [k for k in extra if k not in _LLAMA3_ROPE_KEYS]
    for key in extra:
        if key == "partial_rotary_factor" and rope[key] == 1.0:
            continue
        raise ConversionError(f"config.json RoPE field {key}={rope[key]!r} is not supported by titan's RoPE")
    context = config.get("max_position_embeddings", 2048)
    args = LlamaArgs(
        dim=dim,
        n_layers=_require(config, "num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads,
        vocab_size=_require(config, "vocab_size"),
        multiple_of=multiple_of,
        ffn_dim_multiplier=multiplier,
        norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope["rope_theta"]),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        init_std=config.get("initializer_range", 0.02),
        max_seq_len=context,
        context_len=context,
    )
    if kind == "llama3":
        if "factor" not in rope:
            raise ConversionError("config.json llama3 RoPE scaling has no 'factor'")
        args.rope_scaling_factor = float(rope["factor"])
        args.rope_low_freq_factor = float(rope.get("low_freq_factor", 1.0))
        args.rope_high_freq_factor = float(rope.get("high_freq_factor", 4.0))
        args.rope_original_max_seq_len = int(rope.get("original_max_position_embeddings", 8192))
    if args.ffn_hidden != config["intermediate_size"]:  # guards _ffn_sizing's float arithmetic
        raise ConversionError(f"cannot express intermediate_size={config['intermediate_size']} with titan's FFN sizing")
    return args
