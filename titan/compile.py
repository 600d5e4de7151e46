"""torch.compile applied in place, so parameter and state-dict names stay unchanged.

`block` compiles each transformer block on its own: the blocks share one class and, with
dynamo's default of treating nn.Module parameters as graph inputs (inline_inbuilt_nn_modules),
share one compiled graph, so a 6- or 80-layer model costs one compile. FSDP2 is applied after
this, around the compiled blocks; its hooks stay outside the graphs.
`model` compiles the whole forward as one graph (fewer boundaries, longer compile).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from titan.config.schema import CompileConfig, CompileMode


def _allow_graph_per_block(n_blocks: int) -> None:
    # If guards ever specialise per block (e.g. on a layer index), each block needs its own
    # cache entry: keep the limit above the depth rather than fall back to eager silently.
    limit = torch._dynamo.config.cache_size_limit
    torch._dynamo.config.cache_size_limit = max(limit, n_blocks + 1)


def apply_compile(model: nn.Module, cfg: CompileConfig) -> nn.Module:
    if cfg.mode is CompileMode.off:
        return model
    if cfg.mode is CompileMode.block:
        blocks = list(model.layers.values())
        _allow_graph_per_block(len(blocks))
        for block in blocks:
            block.compile(backend=cfg.backend, fullgraph=True)
    elif cfg.mode is CompileMode.model:
        model.compile(backend=cfg.backend)
    return model


def compile_loss(fn: Callable, cfg: CompileConfig) -> Callable:
    """`fn` compiled when `compile.loss` is set (whatever `compile.mode` does to the model);
    else `fn` itself. Like torchtitan's `compile.components=["loss"]`: the fp32 upcast and the
    cross-entropy become one graph."""
    if cfg.loss:
        return torch.compile(fn, backend=cfg.backend)
    return fn
