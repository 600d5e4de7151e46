"""LoRA, applied from outside the model like parallelism (`finetune=lora`).

Each target linear (matched by its attribute name, e.g. `wq`) keeps its weight and gains a
child `lora` holding `a` (rank x in), `b` (out x rank) and a `scale` buffer (alpha / rank); a
forward hook adds `scale * b @ a @ dropout(x)` to the linear's output. Parameter names of the
base model are unchanged (`layers.0.attention.wq.weight`), so initial weights, HF export and
checkpoints keep their keys; the adapters add `...wq.lora.a` / `.b` / `.scale`.

Every base parameter is frozen (requires_grad False), so the optimizer, which takes trainable
parameters only, holds no state for them. `a` is drawn from the init stream of the block
that holds it (so any FSDP layout gets the single-process values), `b` starts at zero: the
adapted model starts as the base model.

`merge_lora(state)` folds the adapters of a full state dict into plain weights
(W + scale * b @ a) and drops the adapter keys: that is what HF export and
`titan.tools.convert` write (a plain checkpoint any Llama loader reads).
"""

from __future__ import annotations

import math
import types
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from titan.config.errors import ConfigError
from titan.config.schema import FinetuneConfig, FinetuneMethod

ADAPTER = "lora"


class LoRAAdapter(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.a = nn.Parameter(torch.empty(rank, in_features))
        self.b = nn.Parameter(torch.empty(out_features, rank))
        self.register_buffer("scale", torch.tensor(alpha / rank))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.alpha, self.rank = alpha, rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(self.dropout(x), self.a), self.b) * self.scale

    @torch.no_grad()
    def init_weights(self, generator: Optional[torch.Generator] = None) -> None:
        # As in the LoRA paper / PEFT: a ~ kaiming-uniform(a=sqrt(5)), b = 0.
        bound = 1.0 / math.sqrt(self.a.shape[1])
        self.a.uniform_(-bound, bound, generator=generator)
        self.b.zero_()
        self.scale.fill_(self.alpha / self.rank)


def _add_adapter_output(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output + getattr(module, ADAPTER)(args[0])


def adapted_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(getattr(m, ADAPTER, None), LoRAAdapter)]


def apply_lora(model: nn.Module, cfg: FinetuneConfig) -> nn.Module:
    """Add adapters to every nn.Linear whose attribute name is in `cfg.target_modules`, freeze
    everything else, and extend `model.init_groups` so the adapters are initialised with the
    group (block) that holds them. Call on the meta model, before any parallelism."""
    if cfg.method is not FinetuneMethod.lora:
        return model
    if cfg.rank < 1:
        raise ConfigError("finetune.rank", f"must be >= 1, got {cfg.rank}")
    targets = set(cfg.target_modules)
    for p in model.parameters():
        p.requires_grad_(False)
    found = set()
    for name, module in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear) and leaf in targets:
            adapter = LoRAAdapter(module.in_features, module.out_features, cfg.rank, cfg.alpha, cfg.dropout)
            adapter.to(module.weight.device)
            module.add_module(ADAPTER, adapter)
            module.register_forward_hook(_add_adapter_output)
            found.add(leaf)
    missing = targets - found
    if missing:
        raise ConfigError("finetune.target_modules", f"no linear layer named {sorted(missing)}; use names like wq, wk, wv, wo, w1, w2, w3, output")
    # Bound to the model (not a closure over it), so a deep copy (pipeline stages cut from
    # one meta model) initialises its own adapters.
    model.init_groups = types.MethodType(_init_groups_with_adapters, model)
    return model


def _init_groups_with_adapters(model: nn.Module) -> list:
    """The model's init groups, each also initialising the adapters inside its module."""
    groups = []
    for name, module, fill in type(model).init_groups(model):
        adapters = [m for m in module.modules() if isinstance(m, LoRAAdapter)]
        if adapters:
            def fill_with_adapters(g, fill=fill, adapters=adapters):
                fill(g)
                for adapter in adapters:
                    adapter.init_weights(g)

            groups.append((name, module, fill_with_adapters))
        else:
            groups.append((name, module, fill))
    return groups


def trainable_state_keys(model: nn.Module) -> Optional[set]:
    """The state-dict keys a LoRA checkpoint holds (adapters), or None (everything)."""
    if not adapted_linears(model):
        return None
    return {k for k in model.state_dict() if f".{ADAPTER}." in k}


@torch.no_grad()
def merge_lora(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full state dict with the adapters folded into the weights (W += scale * b @ a) and
    the adapter keys removed. A state dict without adapters is returned unchanged."""
    suffix = f".{ADAPTER}.a"
    merged = dict(state)
    for key in [k for k in state if k.endswith(suffix)]:
        prefix = key[: -len(suffix)]
        a, b, scale = state[key], state[f"{prefix}.{ADAPTER}.b"], state[f"{prefix}.{ADAPTER}.scale"]
        weight = state[f"{prefix}.weight"]
        merged[f"{prefix}.weight"] = (weight.float() + float(scale) * (b.float() @ a.float())).to(weight.dtype)
        for part in ("a", "b", "scale"):
            del merged[f"{prefix}.{ADAPTER}.{part}"]
    return merged


def load_lora_checkpoint(src: str, base: Optional[str] = None, preset: Optional[str] = None):
    """For `titan.tools.convert`: if `src` (a run dir or DCP checkpoint) holds LoRA adapters
    only, the base weights (`base`: 'hf:PATH' or a titan checkpoint/run dir; default: the run's
    checkpoint.initial_load) with the adapters merged in, as `LoadedWeights`; None when `src`
    is not such a checkpoint (convert then reads it as usual)."""
    from pathlib import Path

    from titan.checkpoint import CheckpointError, resolve_checkpoint
    from titan.interop.dcp_io import METADATA_FILE, load_dcp_model_state
    from titan.interop.errors import ConversionError
    from titan.interop.sources import LoadedWeights, _find_run_dir, load_weights, read_run_config

    path = Path(src)
    if not path.is_dir():
        return None
    try:
        ckpt = path if (path / METADATA_FILE).is_file() else resolve_checkpoint(path)
        from torch.distributed.checkpoint import FileSystemReader

        keys = [k for k in FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata if k.startswith("model.")]
    except (CheckpointError, ConversionError, OSError, ValueError):
        return None
    if not keys or not all(f".{ADAPTER}." in k for k in keys):  # read the metadata only: cheap
        return None
    adapters = load_dcp_model_state(ckpt)
    run_dir = _find_run_dir(ckpt)
    if base is None and run_dir is not None:
        base = (read_run_config(run_dir).get("checkpoint") or {}).get("initial_load")
    if not base:
        raise ConversionError(
            f"{ckpt} holds LoRA adapters only; name the weights they were trained on with --base hf:PATH (or a titan checkpoint dir)"
        )
    loaded = load_weights(base[3:] if base.startswith("hf:") else base, preset=preset)
    merged = merge_lora({**loaded.state_dict, **adapters})
    return LoadedWeights(merged, loaded.args, "dcp+lora", ckpt, run_dir)
