"""Context parallelism (CP): each rank of the cp group holds a slice of every sequence.

Layout: a sequence of length S is cut into 2*cp equal chunks and rank r keeps chunks r and
2*cp-1-r. Under a causal mask late tokens attend to more keys than early ones, so pairing a
front chunk with its mirror from the back gives every rank the same attention work.

Everything outside attention is per-token and runs unchanged on the local tokens (RoPE takes
the absolute `positions`). Attention needs every earlier key, so `apply_cp` swaps each block's
`attention.sdpa` for `ContextParallelAttention`, which is exact in either mode:

  allgather  gather K/V of the whole sequence; each local chunk attends to its key prefix
             (earlier chunks unmasked + its own chunk causally, merged by log-sum-exp; or
             SDPA with a position mask off CPU). One collective per layer; holds
             full-length K/V per layer for backward.
  ring       pass K/V blocks around the ring, merging partial results by log-sum-exp
             (`titan.parallel.ring_attention`). Holds only local K/V; for long sequences.

torch's own `torch.distributed.tensor.experimental.context_parallel` fails on CPU (no DTensor
sharding rule for the CPU flash-attention op), so this module does not use it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from titan.config.errors import ConfigError
from titan.parallel.cp_kernels import KERNELS, prefix_attention
from titan.parallel.ring_attention import ring_attention

MODES = ("allgather", "ring")

# all_gather_single / reduce_scatter_single are the 2.13 names; older releases have the *_tensor ones.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# ---------------------------------------------------------------------------------------------
# Sequence layout
# ---------------------------------------------------------------------------------------------


def validate_cp(seq_len: int, cp: int) -> None:
    """Raise ConfigError unless `seq_len` splits into 2*cp equal chunks (any length for cp=1)."""
    if cp < 1:
        raise ConfigError("parallel.cp", f"{cp} is not a degree; use a positive integer")
    if cp > 1 and seq_len % (2 * cp):
        raise ConfigError(
            "training.seq_len",
            f"{seq_len} is not divisible by 2 x parallel.cp = {2 * cp}: context parallelism cuts each "
            f"sequence into 2 x cp chunks (a front and a back chunk per rank, to balance causal "
            f"attention); use a multiple of {2 * cp}",
        )


def cp_chunks(cp_rank: int, cp_size: int) -> tuple[int, int]:
    """Indices (out of 2*cp_size) of the two chunks rank `cp_rank` holds, front one first."""
    return cp_rank, 2 * cp_size - 1 - cp_rank


def _chunk_len(seq_len: int, cp_size: int) -> int:
    if seq_len % (2 * cp_size):
        raise ValueError(f"sequence length {seq_len} is not divisible by 2 x cp = {2 * cp_size}")
    return seq_len // (2 * cp_size)


def cp_positions(seq_len: int, cp_rank: int, cp_size: int, device=None) -> torch.Tensor:
    """Absolute positions (LongTensor, shape (seq_len // cp_size,)) of this rank's tokens."""
    c = _chunk_len(seq_len, cp_size)
    return torch.cat([torch.arange(g * c, (g + 1) * c, device=device) for g in cp_chunks(cp_rank, cp_size)])


def cp_shard(tensor: torch.Tensor, dim: int, cp_rank: int, cp_size: int) -> torch.Tensor:
    """This rank's slice of `tensor` along its sequence dim `dim` (chunks r and 2*cp-1-r)."""
    if cp_size == 1:
        return tensor
    _chunk_len(tensor.shape[dim], cp_size)
    chunks = tensor.chunk(2 * cp_size, dim)
    return torch.cat([chunks[g] for g in cp_chunks(cp_rank, cp_size)], dim)


def cp_unshard(shards: list[torch.Tensor], dim: int) -> torch.Tensor:
    """Inverse of `cp_shard`: the shards of every rank, in cp-rank order, back in global order."""
    cp_size = len(shards)
    ordered: list[torch.Tensor | None] = [None] * (2 * cp_size)
    for rank, shard in enumerate(shards):
        front, back = shard.chunk(2, dim)
        ordered[rank], ordered[2 * cp_size - 1 - rank] = front, back
    return torch.cat(ordered, dim)


def cp_inputs(
    tokens: torch.Tensor, labels: torch.Tensor, cp_rank: int, cp_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Shard one micro-batch of (batch, seq) tokens and labels for this cp rank.

    Returns (tokens_local, labels_local, positions); positions is None without CP, so the
    model keeps its default 0..seq-1. Call as `model(tokens_local, positions=positions)`."""
    if cp_size == 1:
        return tokens, labels, None
    positions = cp_positions(tokens.shape[1], cp_rank, cp_size, device=tokens.device)
    return cp_shard(tokens, 1, cp_rank, cp_size), cp_shard(labels, 1, cp_rank, cp_size), positions


# ---------------------------------------------------------------------------------------------
# All-gather attention
# ---------------------------------------------------------------------------------------------


class _AllGatherDim0(torch.autograd.Function):
    """All-gather along dim 0. Backward reduce-scatters: every rank's queries used the gathered
    K/V, so the owner's gradient is the sum of all ranks' gradients for its slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, world: int) -> torch.Tensor:
        x = x.contiguous()
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        _all_gather(out, x, group=group)
        ctx.group, ctx.world = group, world
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = grad.new_empty((grad.shape[0] // ctx.world, *grad.shape[1:]))
        _reduce_scatter(out, grad.contiguous(), group=ctx.group)
        return out, None, None


def _gather_global_kv(k: torch.Tensor, v: torch.Tensor, group, cp_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of the whole sequence in global order, (batch, kv_heads, seq, head_dim) each."""
    b, h, local, d = k.shape
    c = local // 2
    gathered = _AllGatherDim0.apply(torch.stack([k, v]), group, cp_size)  # (cp*2, b, h, local, d)
    per_rank = gathered.view(cp_size, 2, b, h, 2, c, d)
    # Chunk g < cp is rank g's front half; chunk g >= cp is rank 2cp-1-g's back half.
    owners = [(g, 0) if g < cp_size else (2 * cp_size - 1 - g, 1) for g in range(2 * cp_size)]
    kv = torch.stack([per_rank[r, :, :, :, half] for r, half in owners], dim=3)  # (2, b, h, 2cp, c, d)
    kv = kv.view(2, b, h, 2 * cp_size * c, d)
    return kv[0], kv[1]


def _masked_sdpa(q, k_all, v_all, chunk_ids) -> torch.Tensor:
    """SDPA per local chunk over its key prefix with an explicit position mask: any device,
    any fused kernel that takes masks (the mask costs chunk x prefix memory)."""
    c = q.shape[2] // 2
    gqa = q.shape[1] != k_all.shape[1]
    if gqa and q.device.type != "cpu":
        # Only some GPU kernels take enable_gqa with a mask; repeating is safe everywhere.
        rep = q.shape[1] // k_all.shape[1]
        k_all, v_all, gqa = k_all.repeat_interleave(rep, 1), v_all.repeat_interleave(rep, 1), False
    outs = []
    for q_chunk, g in zip(q.split(c, dim=2), chunk_ids):
        q_pos = torch.arange(g * c, (g + 1) * c, device=q.device)
        k_pos = torch.arange((g + 1) * c, device=q.device)
        mask = k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)
        keys, values = k_all[:, :, : (g + 1) * c], v_all[:, :, : (g + 1) * c]
        outs.append(F.scaled_dot_product_attention(q_chunk, keys, values, attn_mask=mask, enable_gqa=gqa))
    return torch.cat(outs, dim=2)


ALLGATHER_KERNELS = (*KERNELS, "sdpa_mask")


def allgather_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group, cp_rank: int, cp_size: int, kernel: str | None = None
) -> torch.Tensor:
    """Exact causal attention of this rank's queries over the whole (cp-sharded) sequence.

    q: (batch, heads, local_seq, head_dim); k, v: (batch, kv_heads, local_seq, head_dim) with
    kv_heads dividing heads (grouped-query attention). Each local chunk g attends only to the
    key prefix 0..g, not the whole sequence: half the work, and the ranks stay balanced.
    kernel: a `cp_kernels.KERNELS` key (unmasked + causal blocks merged by log-sum-exp) or
    "sdpa_mask" (SDPA with a position mask); default flash_cpu on CPU, sdpa_mask elsewhere."""
    k_all, v_all = _gather_global_kv(k, v, group, cp_size)
    chunk_ids = cp_chunks(cp_rank, cp_size)
    kernel = kernel or ("flash_cpu" if q.device.type == "cpu" else "sdpa_mask")
    if kernel == "sdpa_mask":
        return _masked_sdpa(q, k_all, v_all, chunk_ids)
    return prefix_attention(q, k_all, v_all, chunk_ids, kernel)


# ---------------------------------------------------------------------------------------------
# The module and how it goes into the model
# ---------------------------------------------------------------------------------------------


class ContextParallelAttention(nn.Module):
    """Drop-in for `CausalAttention` when the sequence is sharded by `cp_shard`: takes this
    rank's q, k, v (batch, heads, local_seq, head_dim) and returns exact causal attention over
    the full sequence for its queries.

    `kv_repeats` = n_heads // n_kv_heads: the model repeats K/V heads for grouped-query
    attention before calling sdpa; only one copy of each is communicated and the attention
    kernels share it across the query heads of its group."""

    def __init__(self, cp_group, cp_rank: int, cp_size: int, mode: str = "allgather", kv_repeats: int = 1):
        super().__init__()
        if mode not in MODES:
            raise ConfigError("parallel.cp_mode", f"unknown context-parallel mode {mode!r}; use one of {', '.join(MODES)}")
        self.cp_group, self.cp_rank, self.cp_size = cp_group, cp_rank, cp_size
        self.mode, self.kv_repeats = mode, kv_repeats

    # Collectives inside an autograd Function: keep torch.compile out (a clean graph break).
    @torch.compiler.disable
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.kv_repeats > 1 and k.shape[1] == q.shape[1]:
            # Copies are identical; the gradient still reaches every copy's source through
            # repeat_interleave's backward, which sums over the group.
            k, v = k[:, :: self.kv_repeats], v[:, :: self.kv_repeats]
        if self.mode == "ring":
            return ring_attention(q, k, v, self.cp_group, self.cp_rank, self.cp_size)
        return allgather_attention(q, k, v, self.cp_group, self.cp_rank, self.cp_size)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, cp_rank={self.cp_rank}, cp_size={self.cp_size}, kv_repeats={self.kv_repeats}"


def apply_cp(model: nn.Module, cp_group, cp_rank: int, cp_size: int, mode: str = "allgather") -> nn.Module:
    """Swap every block's `attention.sdpa` for ContextParallelAttention (in place; returns the
    model). A no-op for cp_size 1. Apply before torch.compile; order with FSDP/TP is free
    (the swapped module has no parameters)."""
    if cp_size == 1:
        return model
    args = model.args
    kv_repeats = args.n_heads // args.kv_heads  # unchanged by TP, which splits both evenly
    for block in model.layers.values():
        block.attention.sdpa = ContextParallelAttention(cp_group, cp_rank, cp_size, mode, kv_repeats)
    return model
