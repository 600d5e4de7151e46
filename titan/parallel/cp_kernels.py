"""Attention on blocks of keys, merged exactly by log-sum-exp: the compute under both CP modes.

Under the CP layout a query chunk g needs keys of chunks 0..g: the earlier chunks in full and
its own chunk causally. Doing that as separate unmasked/causal kernel calls, merged by their
log-sum-exps, avoids a (chunk x seq) mask (which torch materialises as floats and keeps for
backward: quadratic memory) and never computes a masked-out block.

A kernel returns (output, log-sum-exp) and its backward takes the *final* output and
log-sum-exp of the merged result, which makes each block's gradients exact on their own.
  flash_cpu  torch's fused CPU flash-attention op: tiled (no score matrix in memory), native
             grouped-query heads. Default on CPU.
  math       plain matmuls, any device; holds one block's (heads, queries, keys) scores.
"""

from __future__ import annotations

import math

import torch


def acc(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 for accumulation (bf16 is upcast; fp64 stays fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class FlashCPU:
    @staticmethod
    def forward(q, k, v, causal: bool, scale: float):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)

    @staticmethod
    def backward(dout, q, k, v, out, lse, causal: bool, scale: float):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out.to(q.dtype), lse, 0.0, causal, scale=scale
        )


class Math:
    """Query head h uses K/V head h // groups (repeat_interleave order). `causal` blocks are
    square (a chunk against itself)."""

    @staticmethod
    def _scores(q, k, scale: float, causal: bool):
        b, _, n, d = q.shape
        qg = acc(q).reshape(b, k.shape[1], -1, d)  # (b, kv_heads, groups * n, d)
        s = qg @ acc(k).transpose(-1, -2) * scale
        if causal:
            future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
            s = s.unflatten(-2, (-1, n)).masked_fill(future, float("-inf")).flatten(-3, -2)
        return qg, s

    @staticmethod
    def forward(q, k, v, causal: bool, scale: float):
        _, s = Math._scores(q, k, scale, causal)
        lse = s.logsumexp(-1, keepdim=True)
        out = torch.exp(s - lse) @ acc(v)
        return out.view(q.shape), lse.view(q.shape[:-1])

    @staticmethod
    def backward(dout, q, k, v, out, lse, causal: bool, scale: float):
        qg, s = Math._scores(q, k, scale, causal)
        rows = qg.shape[:-1]  # (b, kv_heads, groups * n)
        dout, out, lse = (acc(x).reshape(rows + x.shape[-1:]) for x in (dout, out, lse.unsqueeze(-1)))
        p = torch.exp(s - lse)
        dv = p.transpose(-1, -2) @ dout
        ds = p * (dout @ acc(v).transpose(-1, -2) - (dout * out).sum(-1, keepdim=True))
        dq = (ds @ acc(k)) * scale
        dk = (ds.transpose(-1, -2) @ qg) * scale
        return dq.view(q.shape), dk, dv


KERNELS = {"flash_cpu": FlashCPU, "math": Math}


def default_kernel(device: torch.device) -> str:
    return "flash_cpu" if device.type == "cpu" else "math"


def merge(out, lse, block_out, block_lse):
    """Combine two softmax-normalised partial results over disjoint keys. Both lse must be
    finite (every query row saw at least one key in each block)."""
    merged = torch.logaddexp(lse, block_lse)
    out = out * torch.exp(lse - merged).unsqueeze(-1) + acc(block_out) * torch.exp(block_lse - merged).unsqueeze(-1)
    return out, merged


class _PrefixAttention(torch.autograd.Function):
    """Local query chunks against full-sequence K/V: chunk g attends to chunks < g in full
    and to chunk g causally (two kernel calls, merged)."""

    @staticmethod
    def forward(ctx, q, k_all, v_all, chunk_ids: tuple, kernel: str):
        attend, c = KERNELS[kernel], q.shape[2] // len(chunk_ids)
        scale = 1.0 / math.sqrt(q.shape[-1])
        outs, lses = [], []
        for qi, g in zip(q.split(c, dim=2), chunk_ids):
            out, lse = attend.forward(qi, k_all[:, :, g * c : (g + 1) * c], v_all[:, :, g * c : (g + 1) * c], True, scale)
            out = acc(out)
            if g > 0:
                out, lse = merge(out, lse, *attend.forward(qi, k_all[:, :, : g * c], v_all[:, :, : g * c], False, scale))
            outs.append(out)
            lses.append(lse)
        out = torch.cat(outs, dim=2).to(q.dtype)
        ctx.save_for_backward(q, k_all, v_all, out, torch.cat(lses, dim=2))
        ctx.chunk_ids, ctx.kernel, ctx.scale = chunk_ids, kernel, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k_all, v_all, out, lse = ctx.saved_tensors
        attend, scale, c = KERNELS[ctx.kernel], ctx.scale, q.shape[2] // len(ctx.chunk_ids)
        dq = torch.zeros_like(acc(q))
        dk, dv = torch.zeros_like(acc(k_all)), torch.zeros_like(acc(v_all))
        grad_out = grad_out.contiguous()
        for i, g in enumerate(ctx.chunk_ids):
            rows = slice(i * c, (i + 1) * c)
            blocks = [(slice(g * c, (g + 1) * c), True)] + ([(slice(0, g * c), False)] if g > 0 else [])
            for keys, causal in blocks:
                dqi, dki, dvi = attend.backward(
                    grad_out[:, :, rows], q[:, :, rows], k_all[:, :, keys], v_all[:, :, keys],
                    out[:, :, rows], lse[:, :, rows], causal, scale,
                )
                dq[:, :, rows] += dqi
                dk[:, :, keys] += dki
                dv[:, :, keys] += dvi
        return dq.to(q.dtype), dk.to(k_all.dtype), dv.to(v_all.dtype), None, None


def prefix_attention(q, k_all, v_all, chunk_ids: tuple, kernel: str) -> torch.Tensor:
    """q: (batch, heads, n_chunks * c, head_dim), this rank's chunks `chunk_ids` of the global
    sequence; k_all, v_all: (batch, kv_heads, seq, head_dim) in global order. Exact causal
    attention of the local queries."""
    return _PrefixAttention.apply(q, k_all, v_all, tuple(chunk_ids), kernel)
