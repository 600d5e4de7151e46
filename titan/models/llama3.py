"""Llama 3 decoder: RMSNorm, RoPE (with Llama 3.1 scaling), grouped-query attention, SwiGLU.

Plain PyTorch, no parallelism: `titan/parallel/` shards it from outside. Built on the meta
device, then materialised with `to_empty` and filled by `init_weights`, so a sharded model
never has to exist whole. Layers live in a ModuleDict keyed by index so pipeline stages can
drop layers while parameter names stay the same as in the full model.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from titan.models.document_mask import DocumentMask, document_positions, masked_attention


@dataclass
class LlamaArgs:
    dim: int = 256
    n_layers: int = 6
    n_heads: int = 16
    n_kv_heads: Optional[int] = None
    vocab_size: int = 2048
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling_factor: Optional[float] = None
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 8192
    tie_embeddings: bool = False
    init_std: float = 0.02
    max_seq_len: int = 2048  # length of the precomputed RoPE table
    # Positions the model is made for (Hugging Face's max_position_embeddings); None: max_seq_len.
    context_len: Optional[int] = None

    @property
    def context(self) -> int:
        return self.context_len or self.max_seq_len

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def rope_dim(self) -> int:
        """Dims of a head that RoPE rotates (all of them; MLA rotates a part)."""
        return self.head_dim

    @property
    def ffn_hidden(self) -> int:
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)


def rope_frequencies(args: LlamaArgs) -> torch.Tensor:
    """Inverse frequencies per rotary pair, with Llama 3.1's long-context rescaling."""
    hd = args.rope_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    if args.rope_scaling_factor is None:
        return inv_freq.float()
    factor = args.rope_scaling_factor
    low_wavelen = args.rope_original_max_seq_len / args.rope_low_freq_factor
    high_wavelen = args.rope_original_max_seq_len / args.rope_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    smooth = (args.rope_original_max_seq_len / wavelen - args.rope_low_freq_factor) / (
        args.rope_high_freq_factor - args.rope_low_freq_factor
    )
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    in_band = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return torch.where(in_band, blended, scaled).float()


def rope_table(args: LlamaArgs, device=None) -> torch.Tensor:
    """(max_seq_len, head_dim // 2, 2) table of cos/sin per position and rotary pair."""
    inv_freq = rope_frequencies(args).to(device)
    pos = torch.arange(args.max_seq_len, device=device, dtype=torch.float32)
    angles = torch.outer(pos, inv_freq)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate (batch, seq, heads, head_dim) by `rope` of shape (seq, head_dim // 2, 2), or
    (batch, seq, head_dim // 2, 2) when positions differ per row (document masking).

    Each (x0, x1) pair times (cos, sin) is one complex product: one kernel forward and one
    backward, instead of a dozen strided elementwise ops (10x faster on CPU, same values)."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    rotation = torch.view_as_complex(rope.contiguous()).unsqueeze(-2)  # (seq, 1, pairs): over heads
    return torch.view_as_real(pairs * rotation).flatten(-2).type_as(x)


def init_generator(seed: int, group: str, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator that fills one init group (embedding, one block, final norm, output).

    Each group draws from its own stream, seeded from (seed, group name), so any subset of the
    model (one pipeline stage, one block materialised at a time for sharding) gets the same
    values as the whole model without replaying the RNG for the groups before it."""
    # 32 bits that depend on both: the CPU generator (mt19937) keeps only the low 32 bits of a seed.
    group_seed = zlib.crc32(f"{seed}/{group}".encode())
    return torch.Generator(device=device).manual_seed(group_seed)


def _trunc_normal(weight: torch.Tensor, std: float, generator: Optional[torch.Generator]) -> None:
    nn.init.trunc_normal_(weight, std=std, a=-3 * std, b=3 * std, generator=generator)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)

    def init_weights(self) -> None:
        nn.init.ones_(self.weight)


class CausalAttention(nn.Module):
    """Causal SDPA over (batch, heads, seq, head_dim). A module of its own so context
    parallelism can swap in a sequence-sharded implementation without touching the model."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[DocumentMask] = None) -> torch.Tensor:
        if mask is not None:  # packed documents: block-causal
            return masked_attention(q, k, v, mask)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class Attention(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.kv_heads
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.sdpa = CausalAttention()

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask: Optional[DocumentMask] = None) -> torch.Tensor:
        bsz, seq, _ = x.shape
        # The table is cut to the length seen here: under sequence parallelism the blocks'
        # inputs are sequence-sharded and only the attention input is gathered to full length.
        rope = rope[:, :seq] if rope.dim() == 4 else rope[:seq]
        q, k, v = self.qkv(x)
        q, k = self.rotate(q, k, rope)
        repeats = self.n_heads // self.n_kv_heads
        if repeats > 1:  # grouped-query attention: share each K/V head across `repeats` queries
            k = k.repeat_interleave(repeats, dim=2)
            v = v.repeat_interleave(repeats, dim=2)
        qkv = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = self.sdpa(*qkv) if mask is None else self.sdpa(*qkv, mask=mask)
        return self.wo(out.transpose(1, 2).reshape(bsz, seq, -1))

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of (batch, seq, dim) as (batch, seq, heads, head_dim), before RoPE. -1 for
        heads: under tensor parallelism each rank holds a slice of the heads."""
        bsz, seq, _ = x.shape
        q = self.wq(x).view(bsz, seq, -1, self.head_dim)
        k = self.wk(x).view(bsz, seq, -1, self.head_dim)
        v = self.wv(x).view(bsz, seq, -1, self.head_dim)
        return q, k, v

    def rotate(self, q: torch.Tensor, k: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE on q and k (a family may rotate only part of each head)."""
        return apply_rope(q, rope), apply_rope(k, rope)

    def init_weights(self, std: float, out_std: float, generator: Optional[torch.Generator] = None) -> None:
        for lin in (self.wq, self.wk, self.wv):
            _trunc_normal(lin.weight, std, generator)
        _trunc_normal(self.wo.weight, out_std, generator)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def init_weights(self, std: float, out_std: float, generator: Optional[torch.Generator] = None) -> None:
        _trunc_normal(self.w1.weight, std, generator)
        for lin in (self.w2, self.w3):
            _trunc_normal(lin.weight, out_std, generator)


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: LlamaArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden)
        # Depth-scaled init of the residual projections keeps early activations bounded.
        self.out_std = args.init_std / math.sqrt(2 * (layer_id + 1))
        self.init_std = args.init_std

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask: Optional[DocumentMask] = None) -> torch.Tensor:
        attn = self.attention(self.attention_norm(x), rope) if mask is None else self.attention(self.attention_norm(x), rope, mask=mask)
        h = x + attn
        return h + self.feed_forward(self.ffn_norm(h))

    def init_weights(self, generator: Optional[torch.Generator] = None) -> None:
        self.attention_norm.init_weights()
        self.ffn_norm.init_weights()
        self.attention.init_weights(self.init_std, self.out_std, generator)
        self.feed_forward.init_weights(self.init_std, self.out_std, generator)


class Llama3(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings: Optional[nn.Embedding] = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(i, args) for i in range(args.n_layers)})
        self.norm: Optional[RMSNorm] = RMSNorm(args.dim, args.norm_eps)
        self.output: Optional[nn.Linear] = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Not persistent: recomputed after `to_empty`, never saved in checkpoints.
        self.register_buffer("rope", rope_table(args), persistent=False)

    def forward(
        self, tokens: torch.Tensor, positions: Optional[torch.Tensor] = None, document_ids: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """tokens: (batch, seq) ids, or (batch, seq, dim) hidden states on a later pipeline
        stage. positions: (seq,) absolute positions when the sequence is sharded (context
        parallel); default 0..seq-1. document_ids: (batch, seq) ids of packed documents
        (`titan.models.document_mask.document_ids`): attention stays within each document and
        positions restart at each one. Returns logits, or hidden states if `output` was removed."""
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        mask = None
        if document_ids is not None:
            if positions is not None:
                raise ValueError("document_ids and positions (context parallel) cannot be combined")
            mask = DocumentMask(document_ids)
            rope = self.rope[document_positions(document_ids)]  # (batch, seq, pairs, 2)
        else:  # the whole table: each attention cuts it to its (gathered) sequence length
            rope = self.rope if positions is None else self.rope[positions]
        for layer in self.layers.values():
            h = layer(h, rope) if mask is None else layer(h, rope, mask=mask)
        h = self.norm(h) if self.norm is not None else h
        return self.output(h) if self.output is not None else h

    def tie_weights(self) -> None:
        """Share the embedding with the output projection (when configured). `to_empty` makes a
        new tensor per module and so unties them: call after it (init_weights does)."""
        if self.args.tie_embeddings and self.output is not None and self.tok_embeddings is not None:
            if self.output.weight is not self.tok_embeddings.weight:
                self.output.weight = self.tok_embeddings.weight

    def init_buffers(self, device: Optional[torch.device] = None) -> None:
        """Recompute non-persistent buffers (after `to_empty` they hold garbage)."""
        self.rope = rope_table(self.args, device=device or self.rope.device)

    def init_groups(self) -> list[tuple[str, nn.Module, Callable[[torch.Generator], None]]]:
        """(name, module, fill) for each independently seeded group of parameters; `fill` writes
        the module's parameters from the generator `init_generator(seed, name)`. Groups hold
        disjoint parameters: a tied weight is filled once, in the embedding's group."""
        groups: list = []
        if self.tok_embeddings is not None:
            groups.append(("tok_embeddings", self.tok_embeddings, self._init_embedding))
        for name, layer in self.layers.items():
            groups.append((f"layers.{name}", layer, layer.init_weights))
        if self.norm is not None:
            groups.append(("norm", self.norm, lambda g: self.norm.init_weights()))
        if self.output is not None and not self.args.tie_embeddings:
            groups.append(("output", self.output, lambda g: _trunc_normal(self.output.weight, self.output_std, g)))
        return groups

    @property
    def output_std(self) -> float:
        """Output projection init: with unit-RMS (normed) inputs, logits start with std ~1, so
        the first loss is about ln(vocab) + 1/2."""
        return self.args.dim**-0.5

    def _init_embedding(self, generator: torch.Generator) -> None:
        if not self.args.tie_embeddings:
            nn.init.normal_(self.tok_embeddings.weight, generator=generator)
            return
        # A tied weight is also the output projection, and the input token's own row then meets
        # itself: at init the final hidden state is mostly that row, normalised to norm
        # sqrt(dim), so its own logit is about std * dim while every other logit has std
        # std * sqrt(dim). The untied embedding's N(0, 1) gives a self-logit of ~dim (first loss
        # in the hundreds); even the output's dim^-0.5 leaves it at sqrt(dim) (8 at dim 64: a
        # first loss 15% above ln(vocab)). std = 1/dim keeps the self-logit ~1 and the others
        # near 0, so training starts at ~ln(vocab). As an embedding a small std is harmless:
        # each block normalises its input.
        _trunc_normal(self.tok_embeddings.weight, 1.0 / self.args.dim, generator)

    @torch.no_grad()
    def init_weights(self, buffer_device: Optional[torch.device] = None, seed: Optional[int] = None) -> None:
        """Fill every parameter; call after `to_empty`. `seed` defaults to torch's initial seed
        (the last `torch.manual_seed`). Each init group has its own generator (see
        `init_generator`), which is what lets `titan.parallel.init` reproduce these weights
        exactly on any sharded layout."""
        seed = torch.initial_seed() if seed is None else seed
        self.tie_weights()
        self.init_buffers(buffer_device)
        for name, module, fill in self.init_groups():
            device = next(module.parameters()).device
            fill(init_generator(seed, name, device))


def count_params(model: nn.Module) -> int:
    """Unique parameters (a tied embedding counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def flops_per_token(args: LlamaArgs, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (matmul parameters) + 12 x L x H x head_dim x S.

    The input embedding is a lookup, so its parameters do no matmul work; the output projection
    does, and counts even when tied to the embedding. Causal attention is counted in full (the
    PaLM convention used by torchtitan and most MFU reports)."""
    matmul_params = n_params - args.vocab_size * args.dim
    if args.tie_embeddings:
        matmul_params += args.vocab_size * args.dim
    attention = 12 * args.n_layers * args.n_heads * args.head_dim * seq_len
    return 6 * matmul_params + attention
