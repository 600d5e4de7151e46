"""Qwen3 (dense and MoE) on Llama 3's building blocks.

What differs from Llama 3: each query and key head is RMS-normalised before RoPE (QK-norm),
head_dim is set on its own (not dim / n_heads), the FFN hidden size is given explicitly, RoPE
theta is 1e6 with no long-context rescaling, small sizes tie the embeddings, and the MoE
variant replaces every block's FFN by `titan.models.moe.MoE`. Everything else (attention
math, RoPE layout, init groups, layer naming) is Llama's, reused by subclassing, so Llama's
forward path (and what it gains, e.g. extra attention arguments) applies to Qwen3 unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from titan.models.llama3 import Attention, Llama3, LlamaArgs, RMSNorm, TransformerBlock
from titan.models.moe import MoE, MoEArgs
from titan.models.qwen3.mla import MLAArgs, MLAttention


@dataclass
class Qwen3Args(LlamaArgs):
    rope_theta: float = 1_000_000.0
    norm_eps: float = 1e-6
    explicit_head_dim: Optional[int] = None  # None: dim // n_heads
    intermediate_size: Optional[int] = None  # None: Llama's sizing rule
    qk_norm: bool = True
    moe: Optional[MoEArgs] = None  # None: dense FFN in every block

    @property
    def head_dim(self) -> int:  # type: ignore[override]
        return self.explicit_head_dim or self.dim // self.n_heads

    @property
    def ffn_hidden(self) -> int:  # type: ignore[override]
        return self.intermediate_size if self.intermediate_size is not None else LlamaArgs.ffn_hidden.fget(self)

    def is_moe_layer(self, layer_id: int) -> bool:
        return self.moe is not None and self.moe.num_experts > 0 and layer_id >= self.moe.n_dense_layers


class QKNormAttention(Attention):
    """Llama attention whose q and k heads are RMS-normalised right after their projection
    (`qkv` is the one step Llama's forward lets a family change). Under tensor parallelism the
    norms see this rank's heads, each whole (head_dim is never split)."""

    def __init__(self, args: Qwen3Args):
        super().__init__(args)
        self.q_norm = RMSNorm(self.head_dim, args.norm_eps)
        self.k_norm = RMSNorm(self.head_dim, args.norm_eps)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = super().qkv(x)
        return self.q_norm(q), self.k_norm(k), v

    def init_weights(self, std: float, out_std: float, generator: Optional[torch.Generator] = None) -> None:
        super().init_weights(std, out_std, generator)
        self.q_norm.init_weights()
        self.k_norm.init_weights()


class Qwen3Block(TransformerBlock):
    def __init__(self, layer_id: int, args: Qwen3Args):
        super().__init__(layer_id, args)
        if getattr(args, "mla", None) is not None:
            self.attention = MLAttention(args.dim, args.n_heads, args.mla, args.norm_eps)
        elif args.qk_norm:
            self.attention = QKNormAttention(args)
        if args.is_moe_layer(layer_id):
            self.feed_forward = MoE(args.dim, args.moe)


class Qwen3(Llama3):
    """Qwen3ForCausalLM / Qwen3MoeForCausalLM (titan parameter names, Llama's layout)."""

    def __init__(self, args: Qwen3Args):
        super().__init__(args)
        self.layers = nn.ModuleDict({str(i): Qwen3Block(i, args) for i in range(args.n_layers)})


@dataclass
class DeepSeekV3Args(Qwen3Args):
    """The same decoder configured DeepSeek-V3-style (its own args type, so its own family)."""

    rope_theta: float = 10_000.0
    qk_norm: bool = False
    mla: Optional[MLAArgs] = None  # None: grouped-query attention

    @property
    def head_dim(self) -> int:  # type: ignore[override]
        return self.mla.qk_head_dim if self.mla is not None else Qwen3Args.head_dim.fget(self)

    @property
    def rope_dim(self) -> int:  # type: ignore[override]
        return self.mla.qk_rope_head_dim if self.mla is not None else self.head_dim


def active_params(args: Qwen3Args, total: int) -> int:
    """Parameters one token uses: all but the routed experts it does not pick."""
    if args.moe is None or args.moe.num_experts == 0:
        return total
    moe_layers = sum(args.is_moe_layer(i) for i in range(args.n_layers))
    per_expert = 3 * args.dim * args.moe.expert_hidden
    return total - moe_layers * (args.moe.num_experts - args.moe.top_k) * per_expert
