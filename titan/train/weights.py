"""Weights in and out of a run: start from given weights, write a seed checkpoint, export to HF.

Full (unsharded) weights are read on rank 0 only and broadcast into whatever layout the run
uses, so a model too big for one rank's memory is never materialised on the others."""

from __future__ import annotations

import logging
from pathlib import Path

import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

from titan.models.llama3 import LlamaArgs

log = logging.getLogger("titan")


def load_initial_weights(model: nn.Module, spec: str, args: LlamaArgs, strict: bool = True) -> None:
    """`checkpoint.initial_load`: 'hf:PATH', a DCP checkpoint dir, a seed dir or a run dir.
    strict=False: the model may hold more (LoRA adapters, initialised separately)."""
    from titan.interop import initial_weights

    distributed = dist.is_initialized()
    full = initial_weights(spec, args) if not distributed or dist.get_rank() == 0 else {}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=distributed, strict=strict)
    set_model_state_dict(model, full, options=options)
    log.info("initial weights loaded from %s", spec)


def _full_state(model: nn.Module) -> dict:
    """The whole model's weights on rank 0's CPU (collective: every rank must call it)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_seed_checkpoint(model: nn.Module, args: LlamaArgs, run_dir: str) -> Path:
    """Step-0 weights as a model-only DCP checkpoint: `checkpoint.initial_load=RUN_DIR/seed`."""
    from titan.interop import save_dcp_model

    out = Path(run_dir) / "seed"
    state = _full_state(model)
    if not dist.is_initialized() or dist.get_rank() == 0:
        save_dcp_model(out, state, args)
        log.info("seed checkpoint written to %s: start any layout from it with checkpoint.initial_load=%s", out, out)
    return out


def export_hf(model: nn.Module, args: LlamaArgs, run_dir: str, tokenizer, dtype: str = "float32") -> Path:
    """RUN_DIR/hf: weights (in `dtype`), config.json, generation_config.json and the tokenizer,
    loadable by transformers' AutoTokenizer / AutoModelForCausalLM with nothing else."""
    import torch

    from titan.interop import ConversionError, save_hf
    from titan.interop.hf_tokenizer import save_hf_tokenizer

    from titan.finetune.lora import merge_lora

    out = Path(run_dir) / "hf"
    state = merge_lora(_full_state(model))  # LoRA adapters folded into plain weights
    if not dist.is_initialized() or dist.get_rank() == 0:
        cast = getattr(torch, str(getattr(dtype, "value", dtype)))
        state = {k: v.to(cast) if v.is_floating_point() else v for k, v in state.items()}
        save_hf(out, state, args, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
        try:
            save_hf_tokenizer(tokenizer, out, context=args.context)
        except ConversionError as e:  # the weights are written; say what is missing and why
            log.warning("exported Hugging Face weights to %s, but not the tokenizer: %s", out, e)
            return out
        log.info("exported Hugging Face model and tokenizer to %s", out)
    return out
