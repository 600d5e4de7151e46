"""`python -m titan.train --help`: titan's name, the config groups Hydra actually sees (those of
conf/ plus `sweeps`) with their presets and one line on each, then the composed config.

Hydra renders conf/hydra/help/titan.yaml; its `${titan_groups:}` is resolved by `groups_text`
below, which asks the running Hydra for its groups, so the list cannot drift from what works.
"""

from __future__ import annotations

import sys

from omegaconf import OmegaConf

# One line per config group. tests/test_cli_help.py checks every group has one.
GROUP_HELP = {
    "model": "architecture and size: Llama 3, Qwen3 dense/MoE, DeepSeek-V3-style MoE (tiny to 405B)",
    "parallel": "layout over the device mesh: DDP/FSDP/HSDP, TP, PP, CP, EP and degrees",
    "precision": "number formats: fp32, bf16, float8, MXFP8",
    "compile": "torch.compile: off, per transformer block, or the whole model",
    "activation_checkpoint": "recompute activations in backward to save memory",
    "optim": "optimizer and its hyperparameters (optim.lr=...)",
    "lr_schedule": "learning-rate warmup and decay",
    "data": "training text: built-in corpus, your JSONL/parquet/text files, or a Hub dataset",
    "tokenizer": "tokenizer (default: sentencepiece trained on the data on first use, cached)",
    "logging": "metrics sinks besides console and metrics.jsonl: W&B, TensorBoard",
    "checkpoint": "saving, resuming, initial weights and Hugging Face export",
    "profiling": "torch.profiler traces, memory records, NaN/Inf checks",
    "fault_tolerance": "torchft replica groups that train on when one dies and heal live",
    "task": "what is trained: pretrain (packed text) or sft (chat data, loss on replies)",
    "finetune": "which weights train: full, or LoRA adapters on frozen weights",
    "experiment": "complete recipes (model, layout, precision, batch, eval) selected with experiment=NAME",
    "launcher": "where sweep jobs run (with -m): +launcher=local or +launcher=slurm",
    "sweeps": "ready-made multirun sweeps: python -m titan.train -m +sweeps=NAME",
}


def app_groups() -> dict[str, list[str]]:
    """{group: presets} as the running Hydra sees them (Hydra's own groups left out)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.object_type import ObjectType

    hydra = GlobalHydra.instance().hydra
    assert hydra is not None
    loader = hydra.config_loader
    groups = [g for g in hydra.list_all_config_groups() if g != "hydra" and not g.startswith("hydra/")]
    return {g: loader.get_group_options(g, results_filter=ObjectType.CONFIG) for g in sorted(groups)}


def groups_text() -> str:
    # Hydra resolves the help template while composing every run, and listing the groups
    # composes each of them (seconds): do it only when the help is what was asked for.
    if not {"--help", "-h"} & set(sys.argv[1:]):
        return "(listed by --help)"
    lines = []
    for group, presets in app_groups().items():
        lines.append(f"{group:<22} {GROUP_HELP.get(group, '')}".rstrip())
        lines.append(f"{'':<22} {', '.join(presets)}")
    return "\n".join(lines).replace("$", "$$")  # Hydra then runs string.Template on the text


def register_help_resolver() -> None:
    OmegaConf.register_new_resolver("titan_groups", groups_text, replace=True)
