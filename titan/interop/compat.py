"""Do given weights' architecture and the run's model config agree on everything numerical?

Tensor shapes alone miss settings that change the model's output without changing a shape:
RoPE theta and scaling, the norm epsilon, tied embeddings. `checkpoint.initial_load=hf:PATH`
compares each of them (and the shapes' sources: dims, heads, vocabulary) between the Hugging
Face config.json and the run's `model.*` config, and refuses a mismatch naming both values.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from titan.config.errors import ConfigError
from titan.interop.errors import ConversionError
from titan.models.llama3 import LlamaArgs

# LlamaArgs attribute -> the `model.` key a user sets to change it.
NUMERIC_FIELDS = {
    "dim": "dim",
    "n_layers": "n_layers",
    "n_heads": "n_heads",
    "kv_heads": "n_kv_heads",
    "vocab_size": "vocab_size",
    "ffn_hidden": "ffn_dim_multiplier",  # with model.multiple_of: the FFN hidden size
    "norm_eps": "norm_eps",
    "rope_theta": "rope_theta",
    "rope_scaling_factor": "rope_scaling_factor",
    "rope_low_freq_factor": "rope_low_freq_factor",
    "rope_high_freq_factor": "rope_high_freq_factor",
    "rope_original_max_seq_len": "rope_original_max_seq_len",
    "tie_embeddings": "tie_embeddings",
}
# The low/high/original fields mean nothing without scaling: compare them only when it is on.
_SCALING_DETAILS = ("rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_seq_len")
# Fields of other families (Qwen3, DeepSeek-V3), compared when either side has them.
FAMILY_FIELDS = {"head_dim": "head_dim", "qk_norm": "qk_norm"}
# Routing of a mixture-of-experts FFN (aux_loss_coef, bias_update_rate and grouped_mm change
# training or speed, not what given weights compute: a run may set them freely).
MOE_FIELDS = ("num_experts", "top_k", "expert_hidden", "n_shared_experts", "score", "norm_topk",
              "route_scale", "n_dense_layers")


def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        if a is None or b is None:
            return True
        return abs(float(a) - float(b)) > 1e-9 * max(abs(float(a)), abs(float(b)), 1e-30)
    return a != b


def _moe(args: LlamaArgs, field: str) -> Any:
    moe = getattr(args, "moe", None)
    if moe is None or moe.num_experts <= 0:
        return 0 if field == "num_experts" else None
    return getattr(moe, field)


def mismatches(weights: LlamaArgs, run: LlamaArgs, check_vocab: bool = True) -> list[tuple[str, Any, Any]]:
    """(model key, weights' value, run's value) for each numerics-relevant field that differs."""
    from titan.models.registry import family_of

    if type(weights) is not type(run):  # another architecture: its other fields mean other things
        return [("family", family_of(weights).name, family_of(run).name)]
    out = []
    for attr, key in FAMILY_FIELDS.items():
        if hasattr(weights, attr) and _differs(getattr(weights, attr), getattr(run, attr)):
            out.append((key, getattr(weights, attr), getattr(run, attr)))
    for field in MOE_FIELDS:
        if field == "num_experts" or _moe(weights, "num_experts") and _moe(run, "num_experts"):
            if _differs(_moe(weights, field), _moe(run, field)):
                out.append((f"moe.{field}", _moe(weights, field), _moe(run, field)))
    for attr, key in NUMERIC_FIELDS.items():
        if attr == "vocab_size" and not check_vocab:
            continue
        if attr in _SCALING_DETAILS and (weights.rope_scaling_factor is None or run.rope_scaling_factor is None):
            continue
        ours, theirs = getattr(weights, attr), getattr(run, attr)
        if _differs(ours, theirs):
            out.append((key, ours, theirs))
    return out


def require_same_model(weights: LlamaArgs, run: LlamaArgs, source: str, check_vocab: bool = True) -> None:
    """One ConfigError naming every differing `model.` key with both values."""
    found = mismatches(weights, run, check_vocab)
    if not found:
        return
    parts = [_describe(key, ours, theirs, source) for key, ours, theirs in found]
    fix = "; set the model config to match the weights (or load weights made for this model)"
    raise ConfigError(f"model.{found[0][0]}", "; ".join(parts) + fix)


def _describe(key: str, weights: Any, run: Any, source: str) -> str:
    if key == "ffn_dim_multiplier":
        return (f"model.multiple_of/ffn_dim_multiplier give an FFN hidden size of {run} but {source} "
                f"has intermediate_size={weights}")
    return f"model.{key}={run!r} but {source} has {key}={weights!r}"


def hf_config_args(model_dir: str | Path) -> LlamaArgs:
    """LlamaArgs of a Hugging Face model dir's config.json (ConversionError if unreadable)."""
    from titan.interop.hf import args_from_hf_config
    from titan.interop.safetensors_io import CONFIG_FILE

    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConversionError(f"{model_dir}: no {CONFIG_FILE}, so not a Hugging Face model directory")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConversionError(f"{path}: cannot read JSON ({e})") from e
    return args_from_hf_config(config)


def check_hf_initial_load(spec: str, model_cfg, seq_len: int, vocab_size: Optional[int] = None) -> None:
    """Before launch: `checkpoint.initial_load=hf:PATH` against the run's `model:` config. The
    vocabulary is compared when known (`model.vocab_size` set, or `vocab_size` given)."""
    from titan.models import model_args

    try:
        weights = hf_config_args(spec[3:])
    except ConversionError as e:
        raise ConfigError("checkpoint.initial_load", str(e)) from e
    vocab = vocab_size or (model_cfg.vocab_size if model_cfg.vocab_size > 0 else weights.vocab_size)
    run = model_args(model_cfg, vocab, seq_len)
    require_same_model(weights, run, f"checkpoint.initial_load={spec}",
                       check_vocab=model_cfg.vocab_size > 0 or vocab_size is not None)


def check_dcp_initial_load(spec: str, model_cfg, seq_len: int) -> None:
    """Before launch: `checkpoint.initial_load=` a titan checkpoint or run dir against the run's
    `model:` config, when the architecture it was saved with is known (`titan_model.json`
    beside it, or its run's `.hydra/config.yaml`). The vocabulary is left to the shape check
    unless `model.vocab_size` is set (the tokenizer decides it otherwise, after launch)."""
    from titan.interop.dcp_io import read_dcp_metadata
    from titan.interop.sources import initial_load_checkpoint, saved_args
    from titan.models import model_args

    try:
        ckpt = initial_load_checkpoint(spec)
        embedding = read_dcp_metadata(ckpt).state_dict_metadata.get("model.tok_embeddings.weight")
        vocab = embedding.size[0] if embedding is not None else max(model_cfg.vocab_size, 1)
        weights = saved_args(ckpt, vocab)
    except ConversionError as e:
        raise ConfigError("checkpoint.initial_load", str(e)) from e
    if weights is None:
        return
    run = model_args(model_cfg, model_cfg.vocab_size if model_cfg.vocab_size > 0 else vocab, seq_len)
    require_same_model(weights, run, f"checkpoint.initial_load={spec}", check_vocab=model_cfg.vocab_size > 0)
