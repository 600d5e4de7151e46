"""Parameter groups: weight decay on matmul weights only."""

from __future__ import annotations

from torch import nn

from titan.config.schema import OptimConfig


def _no_decay_ids(model: nn.Module) -> set[int]:
    """Norm weights, biases (any 1-D param) and embedding tables. Decaying them pulls norm
    gains and rare tokens' embeddings toward zero for no regularising benefit."""
    ids = {id(p) for p in model.parameters() if p.ndim < 2}
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            ids.update(id(p) for p in module.parameters(recurse=False))
    return ids


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """[{params, weight_decay}, ...]; each parameter appears once (a tied embedding/output
    weight is one parameter and, being an embedding, is not decayed). Empty groups dropped.
    Works on FSDP2 (DTensor) params: only ndim and module types are inspected."""
    unique = list({id(p): p for p in model.parameters() if p.requires_grad}.values())
    if cfg.decay_norms_and_embeddings:
        return [{"params": unique, "weight_decay": cfg.weight_decay}]
    skip = _no_decay_ids(model)
    groups = [
        {"params": [p for p in unique if id(p) not in skip], "weight_decay": cfg.weight_decay},
        {"params": [p for p in unique if id(p) in skip], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]
