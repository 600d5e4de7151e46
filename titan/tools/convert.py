"""Convert model weights between titan checkpoints, Hugging Face and torch.save.

    python -m titan.tools.convert SRC DST --to {hf,titan,torch} [--model PRESET]
        [--dtype float32|bfloat16|float16] [--max-shard-size 5GB]

SRC: a titan run dir (its latest complete checkpoint), a DCP checkpoint dir, a Hugging Face
model dir, or a torch.save file. The architecture comes from the run's `.hydra/config.yaml`,
the checkpoint's `titan_model.json`, or config.json; `--model PRESET` (a conf/model/ name)
names it for bare weights (the vocabulary size is read from the embedding).

    --to hf     DST is a Hugging Face dir: config.json + model.safetensors (sharded with an
                index above --max-shard-size), loadable by transformers' LlamaForCausalLM;
                from a titan run also its tokenizer (tokenizer.json, for AutoTokenizer) and
                generation_config.json; from a Hugging Face dir its tokenizer files are copied.
                --dtype bfloat16 writes bf16 weights.
    --to titan  DST is a model-only DCP checkpoint dir with its `.complete` marker, usable as
                `checkpoint.initial_load=DST` (state dict {"model": ...}).
    --to torch  DST is one torch.save file of the titan state dict (reading it back needs --model).

Exit status: 0 done, 2 bad arguments or unreadable/mismatched weights (the message says which file).
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from titan.interop.dcp_io import save_dcp_model, save_torch
from titan.interop.errors import ConversionError
from titan.interop.safetensors_io import DEFAULT_MAX_SHARD_BYTES, save_hf
from titan.interop.sources import load_weights

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB', '500MiB', '1000000' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MiB, 1000000)")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m titan.tools.convert", description="Convert titan / Hugging Face / torch weights.")
    p.add_argument("src", help="run dir, DCP checkpoint dir, Hugging Face dir, or torch.save file")
    p.add_argument("dst", help="output dir (hf, titan) or file (torch)")
    p.add_argument("--to", required=True, choices=["hf", "titan", "torch"])
    p.add_argument("--model", default=None, help="model preset (conf/model/NAME.yaml) for weights without a config")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast floating-point weights (default: keep)")
    p.add_argument("--base", default=None, help="LoRA checkpoints: the weights the adapters were trained on (hf:PATH or a titan dir; default: the run's checkpoint.initial_load)")
    p.add_argument("--max-shard-size", type=parse_size, default=DEFAULT_MAX_SHARD_BYTES, help="hf: largest safetensors file (default 5GiB)")
    return p


def convert(src: str, dst: str, to: str, model: Optional[str] = None, dtype: Optional[str] = None,
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, base: Optional[str] = None) -> str:
    """Do one conversion; returns a one-line description of what was written. A LoRA run's
    checkpoint (adapters only) is merged into its base weights (`base`, default the run's
    checkpoint.initial_load): the output is plain weights."""
    from titan.finetune.lora import load_lora_checkpoint

    loaded = load_lora_checkpoint(src, base, model) or load_weights(src, preset=model)
    state_dict = loaded.state_dict
    if dtype is not None:
        state_dict = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in state_dict.items()}
        if loaded.args.tie_embeddings:  # keep the tie: one tensor under both names
            state_dict["output.weight"] = state_dict["tok_embeddings.weight"]
    if to == "hf":
        tokenizer, note = _run_tokenizer(loaded)
        ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id} if tokenizer else {}
        files = save_hf(dst, state_dict, loaded.args, max_shard_bytes=max_shard_bytes, **ids)
        if tokenizer is not None:
            from titan.interop.hf_tokenizer import save_hf_tokenizer

            files += save_hf_tokenizer(tokenizer, dst, context=loaded.args.context)
        elif loaded.kind == "hf":
            files += _copy_tokenizer_files(loaded.path, Path(dst))
            note = None
        written = f"{len(files)} files in {dst}" + (f"; {note}" if note else "")
    elif to == "titan":
        written = str(save_dcp_model(dst, state_dict, loaded.args))
    else:
        written = str(save_torch(dst, state_dict))
    return f"{loaded.kind} weights from {loaded.path} -> {to}: {written}"


_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                       "generation_config.json", "chat_template.jinja")


def _copy_tokenizer_files(src: Path, dst: Path) -> list[Path]:
    """Hugging Face -> Hugging Face: keep the source's tokenizer and generation settings."""
    copied = []
    for name in _HF_TOKENIZER_FILES:
        if (src / name).is_file() and src.resolve() != dst.resolve():
            shutil.copyfile(src / name, dst / name)
            copied.append(dst / name)
    return copied


def _run_tokenizer(loaded):
    """(the run's tokenizer, None) when the weights come from a titan run whose tokenizer can be
    built and fits the model; else (None, why not), said in the summary line."""
    from omegaconf import OmegaConf

    from titan.config.errors import ConfigError
    from titan.config.schema import TokenizerConfig
    from titan.data import build_tokenizer

    section = (loaded.run_config() or {}).get("tokenizer")
    if not section:
        return None, "no tokenizer written: the weights come without a titan run config"
    try:
        tokenizer = build_tokenizer(OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TokenizerConfig), section)))
    except (ConfigError, OSError, ValueError) as e:
        return None, f"no tokenizer written: the run's tokenizer cannot be built ({e})"
    if tokenizer.vocab_size > loaded.args.vocab_size:
        return None, (f"no tokenizer written: the run's tokenizer has {tokenizer.vocab_size} tokens, "
                      f"more than the model's {loaded.args.vocab_size}")
    return tokenizer, None


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(convert(args.src, args.dst, args.to, args.model, args.dtype, args.max_shard_size, args.base))
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
