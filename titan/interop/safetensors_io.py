"""A Hugging Face model directory on disk: config.json plus safetensors weights.

Large models are split into shards `model-00001-of-0000N.safetensors` with an index
`model.safetensors.index.json` mapping each tensor to its shard (the layout transformers reads);
small ones are one `model.safetensors`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import torch

from titan.interop.errors import CheckpointReadError, ConversionError
from titan.interop.hf import args_from_hf_config, from_hf, hf_config, to_hf
from titan.models.llama3 import LlamaArgs

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
TORCH_BIN = "pytorch_model.bin"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # transformers' default shard size
_STALE = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?$")


def _natural_key(name: str) -> list:
    """Sort layer 2 before layer 10, so shards hold consecutive layers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def plan_shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Names grouped into shards of at most `max_shard_bytes` (a larger tensor gets a shard alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(tensors, key=_natural_key):
        n = _nbytes(tensors[name])
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def save_hf(out_dir: str | Path, state_dict: dict[str, torch.Tensor], args: LlamaArgs,
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, bos_token_id: Optional[int] = None,
            eos_token_id: Optional[int] = None) -> list[Path]:
    """Write titan weights as a Hugging Face Llama directory; returns the files written."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    adapter = _hf_adapter(args)
    tensors = {k: v.detach().cpu().contiguous() for k, v in adapter.to_hf(state_dict, args).items()}
    # Leftover weight files from an earlier export would mix with these: remove them first.
    for old in out_dir.iterdir():
        if _STALE.match(old.name):
            old.unlink()
    shards = plan_shards(tensors, max_shard_bytes)
    written = []
    if len(shards) == 1:
        save_file(tensors, str(out_dir / SINGLE_FILE), metadata={"format": "pt"})
        written.append(out_dir / SINGLE_FILE)
    else:
        weight_map = {}
        for i, names in enumerate(shards, start=1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file({n: tensors[n] for n in names}, str(out_dir / file), metadata={"format": "pt"})
            weight_map.update({n: file for n in names})
            written.append(out_dir / file)
        index = {"metadata": {"total_size": sum(_nbytes(t) for t in tensors.values())}, "weight_map": weight_map}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        written.append(out_dir / INDEX_FILE)
    dtype = next(iter(tensors.values())).dtype
    config = adapter.hf_config(args, dtype, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    written.append(out_dir / CONFIG_FILE)
    if bos_token_id is not None or eos_token_id is not None:
        generation = {k: v for k, v in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id)) if v is not None}
        (out_dir / GENERATION_CONFIG_FILE).write_text(json.dumps(generation, indent=2) + "\n")
        written.append(out_dir / GENERATION_CONFIG_FILE)
    return written


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointReadError(path, f"cannot read JSON ({e})") from e


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointReadError(path, "file is missing")
    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError and OSError: a truncated or corrupted file
        raise CheckpointReadError(path, f"not a readable safetensors file (truncated or corrupted?): {e}") from e


def read_hf_tensors(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face model dir, keyed by Hugging Face names."""
    model_dir = Path(model_dir)
    if (model_dir / INDEX_FILE).is_file():
        weight_map = _read_json(model_dir / INDEX_FILE).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointReadError(model_dir / INDEX_FILE, "no 'weight_map' in the index")
        tensors: dict[str, torch.Tensor] = {}
        for file in sorted(set(weight_map.values())):
            tensors.update(_read_safetensors(model_dir / file))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise CheckpointReadError(model_dir / INDEX_FILE, f"tensors listed but absent from their shards: {missing[:3]}")
        return tensors
    if (model_dir / SINGLE_FILE).is_file():
        return _read_safetensors(model_dir / SINGLE_FILE)
    if (model_dir / TORCH_BIN).is_file():
        try:  # weights_only: a checkpoint is data and must never run code
            return torch.load(model_dir / TORCH_BIN, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointReadError(model_dir / TORCH_BIN, f"cannot read ({type(e).__name__}: {e})") from e
    raise ConversionError(f"{model_dir}: no {SINGLE_FILE}, {INDEX_FILE} or {TORCH_BIN}")


def load_hf(model_dir: str | Path) -> tuple[dict[str, torch.Tensor], LlamaArgs]:
    """A Hugging Face Llama dir -> (titan state dict, LlamaArgs)."""
    model_dir = Path(model_dir)
    if not (model_dir / CONFIG_FILE).is_file():
        raise ConversionError(f"{model_dir}: no {CONFIG_FILE}, so not a Hugging Face model directory")
    config = _read_json(model_dir / CONFIG_FILE)
    from titan.models.registry import family_for_hf_config

    adapter = family_for_hf_config(config).hf  # by model_type: llama, qwen3, qwen3_moe
    args = adapter.args_from_hf_config(config)
    return adapter.from_hf(read_hf_tensors(model_dir), args), args


def _hf_adapter(args):
    """The Hugging Face adapter of the model family `args` belong to."""
    from titan.models.registry import family_of

    family = family_of(args)
    if family.hf is None:
        raise ConversionError(f"model family {family.name} has no Hugging Face adapter")
    return family.hf
