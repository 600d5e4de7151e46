"""Ring attention for the load-balanced CP layout of `titan.parallel.context_parallel`.

Each rank starts with its own K/V (chunks r and 2cp-1-r) and, over cp steps, sees every
rank's K/V as the blocks travel around the ring (sent to rank+1, received from rank-1) while
it computes on the one it holds. Partial results are merged exactly by log-sum-exp, so the
output equals softmax attention over the whole sequence. Only local K/V is kept for backward;
the backward pass sends the blocks around again, and each block's K/V gradient travels with
it until it is back at its owner.

Work is done per pair of chunks (query chunk i, key chunk j): j < i attends fully, j == i
causally, j > i is skipped. With the mirrored layout every rank computes the same number of
pairs at every step, so no rank waits for another.

Each pair is one call of a `titan.parallel.cp_kernels` kernel (fused flash on CPU); merging
and gradient accumulation run in at least fp32.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from titan.parallel.cp_kernels import KERNELS, acc, default_kernel, merge


class _Ring:
    """Shifts a tensor one step around the cp group: send to rank+1, receive from rank-1."""

    def __init__(self, group, rank: int, size: int):
        self.group, self.size = group, size
        self.next, self.prev = (rank + 1) % size, (rank - 1) % size

    def shift(self, tensor: torch.Tensor, tag: int = 0):
        """Start the exchange; returns (buffer being received into, works to wait on). K/V
        and gradient shifts overlap in backward: distinct tags keep them apart on gloo."""
        recv = torch.empty_like(tensor)
        ops = [
            dist.P2POp(dist.isend, tensor, group=self.group, tag=tag, group_peer=self.next),
            dist.P2POp(dist.irecv, recv, group=self.group, tag=tag, group_peer=self.prev),
        ]
        # Batched, so NCCL posts both at once (separate sends to a peer can deadlock).
        return recv, dist.batch_isend_irecv(ops)


def _wait(works) -> None:
    for w in works:
        w.wait()


def _pairs(cp_rank: int, src: int, cp_size: int):
    """(query chunk index, key chunk index, causal) for the chunk pairs that need work when
    this rank holds the K/V of rank `src`; indices 0/1 are local front/back halves."""
    mine = (cp_rank, 2 * cp_size - 1 - cp_rank)
    theirs = (src, 2 * cp_size - 1 - src)
    return [(i, j, gj == gi) for i, gi in enumerate(mine) for j, gj in enumerate(theirs) if gj <= gi]


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, cp_rank: int, cp_size: int, kernel: str):
        attend = KERNELS[kernel]
        c = k.shape[2] // 2
        scale = 1.0 / math.sqrt(q.shape[-1])
        ring = _Ring(group, cp_rank, cp_size)
        qs = q.chunk(2, dim=2)
        outs, lses = [None, None], [None, None]
        kv = torch.stack([k, v]).contiguous()  # sent in the input dtype
        for step in range(cp_size):
            if step < cp_size - 1:
                incoming, works = ring.shift(kv)  # overlaps the compute below
            src = (cp_rank - step) % cp_size
            for i, j, causal in _pairs(cp_rank, src, cp_size):
                out, lse = attend.forward(qs[i], kv[0, :, :, j * c : (j + 1) * c], kv[1, :, :, j * c : (j + 1) * c], causal, scale)
                # Every pair leaves each query row at least one key (a diagonal pair keeps the
                # diagonal), so every lse is finite and the merge is exact.
                if outs[i] is None:
                    outs[i], lses[i] = acc(out), lse
                else:
                    outs[i], lses[i] = merge(outs[i], lses[i], out, lse)
            if step < cp_size - 1:
                _wait(works)
                kv = incoming
        out = torch.cat(outs, dim=2).to(q.dtype)
        ctx.save_for_backward(q, k, v, out, torch.cat(lses, dim=2))
        ctx.group, ctx.cp_rank, ctx.cp_size, ctx.scale, ctx.kernel = group, cp_rank, cp_size, scale, kernel
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        attend, cp_rank, cp_size, scale = KERNELS[ctx.kernel], ctx.cp_rank, ctx.cp_size, ctx.scale
        c = k.shape[2] // 2
        ring = _Ring(ctx.group, cp_rank, cp_size)
        qs, douts, outs, lses = (x.chunk(2, dim=2) for x in (q, grad_out.contiguous(), out, lse))
        dqs = [torch.zeros_like(acc(x)) for x in qs]
        kv = torch.stack([k, v]).contiguous()
        dkv_incoming, dkv_works = None, []
        for step in range(cp_size):
            if step < cp_size - 1:
                kv_next, kv_works = ring.shift(kv)
            src = (cp_rank - step) % cp_size
            dkv = torch.zeros_like(acc(kv))
            for i, j, causal in _pairs(cp_rank, src, cp_size):
                blk = slice(j * c, (j + 1) * c)
                dq, dk, dv = attend.backward(douts[i], qs[i], kv[0, :, :, blk], kv[1, :, :, blk], outs[i], lses[i], causal, scale)
                dqs[i] += dq
                dkv[0, :, :, blk] += dk
                dkv[1, :, :, blk] += dv
            # This block's gradient from the ranks before arrived while we computed.
            _wait(dkv_works)
            if dkv_incoming is not None:
                dkv += dkv_incoming
            if cp_size > 1:
                dkv_incoming, dkv_works = ring.shift(dkv, tag=1)  # to the next holder, or home
            else:
                dkv_incoming = dkv
            if step < cp_size - 1:
                _wait(kv_works)
                kv = kv_next
        _wait(dkv_works)
        dq = torch.cat(dqs, dim=2).to(q.dtype)
        return dq, dkv_incoming[0].to(k.dtype), dkv_incoming[1].to(v.dtype), None, None, None, None


def ring_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group, cp_rank: int, cp_size: int, kernel: str | None = None
) -> torch.Tensor:
    """Exact causal attention of this rank's queries over the whole cp-sharded sequence.

    q: (batch, heads, local_seq, head_dim); k, v: (batch, kv_heads, local_seq, head_dim),
    kv_heads dividing heads. The local sequence is chunks (r, 2cp-1-r) as `cp_shard` lays out.
    kernel: a key of KERNELS; default `default_kernel(q.device)`."""
    if q.shape[2] % 2:
        raise ValueError(f"local sequence length {q.shape[2]} must be even (two chunks per rank)")
    return _RingAttention.apply(q, k, v, group, cp_rank, cp_size, kernel or default_kernel(q.device))
