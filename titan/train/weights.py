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


def export_hf(model: nn.Module, args: LlamaArgs, run_dir: str, eos_id: int, bos_id: int) -> Path:
    from titan.interop import save_hf

    from titan.finetune.lora import merge_lora

    out = Path(run_dir) / "hf"
    state = merge_lora(_full_state(model))  # LoRA adapters folded into plain weights
    if not dist.is_initialized() or dist.get_rank() == 0:
        save_hf(out, state, args, bos_token_id=bos_id, eos_token_id=eos_id)
        log.info("exported Hugging Face weights to %s", out)
    return out
