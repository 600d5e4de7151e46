"""Multi-head latent attention (DeepSeek-V2/V3): keys and values come from one low-rank latent
per token, plus a small rotary key shared by all heads.

Per token: q = wq(x) (or wq_b(norm(wq_a(x))) with a query rank), each head split into a part
without position (qk_nope_head_dim) and a rotary part (qk_rope_head_dim). wkv_a(x) gives the
latent (kv_lora_rank, RMS-normalised) and one rotary key; wkv_b expands the latent into every
head's key part and value (v_head_dim). Keys are [nope | rotary]; the scores are scaled by
1/sqrt(qk_nope_head_dim + qk_rope_head_dim) (SDPA's default for that head size).

RoPE turns interleaved pairs of the rotary part, as DeepSeek's checkpoints lay them out
(transformers' `rope_interleave=True`), so weights convert without any reordering. The
module follows Llama's `Attention` interface (`qkv`, `rotate`, `sdpa`, `wo`), so Llama's forward
and the KV-cache decoder run it unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from titan.models.llama3 import Attention, CausalAttention, RMSNorm, _trunc_normal, apply_rope


@dataclass
class MLAArgs:
    kv_lora_rank: int = 512
    q_lora_rank: int = 0  # 0: queries by one full projection
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


class MLAttention(Attention):
    def __init__(self, dim: int, n_heads: int, mla: MLAArgs, norm_eps: float):
        nn.Module.__init__(self)  # Llama's projections do not exist here; its forward is reused
        self.mla = mla
        self.n_heads = self.n_kv_heads = n_heads
        self.head_dim = mla.qk_head_dim
        if mla.q_lora_rank:
            self.wq_a = nn.Linear(dim, mla.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(mla.q_lora_rank, norm_eps)
            self.wq_b = nn.Linear(mla.q_lora_rank, n_heads * mla.qk_head_dim, bias=False)
        else:
            self.wq = nn.Linear(dim, n_heads * mla.qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(dim, mla.kv_lora_rank + mla.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(mla.kv_lora_rank, norm_eps)
        self.wkv_b = nn.Linear(mla.kv_lora_rank, n_heads * (mla.qk_nope_head_dim + mla.v_head_dim), bias=False)
        self.wo = nn.Linear(n_heads * mla.v_head_dim, dim, bias=False)
        self.sdpa = CausalAttention()

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        bsz, seq, _ = x.shape
        m = self.mla
        q = self.wq_b(self.q_norm(self.wq_a(x))) if m.q_lora_rank else self.wq(x)
        q = q.view(bsz, seq, -1, m.qk_head_dim)
        latent, k_rope = self.wkv_a(x).split([m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)
        kv = self.wkv_b(self.kv_norm(latent)).view(bsz, seq, -1, m.qk_nope_head_dim + m.v_head_dim)
        k_nope, v = kv.split([m.qk_nope_head_dim, m.v_head_dim], dim=-1)
        k_rope = k_rope.unsqueeze(2).expand(-1, -1, k_nope.shape[2], -1)  # one rotary key for all heads
        return q, torch.cat([k_nope, k_rope], dim=-1), v

    def rotate(self, q: torch.Tensor, k: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nope = self.mla.qk_nope_head_dim

        def turn(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t[..., :nope], apply_rope(t[..., nope:], rope)], dim=-1)

        return turn(q), turn(k)

    def init_weights(self, std: float, out_std: float, generator: Optional[torch.Generator] = None) -> None:
        projections = (self.wq_a, self.wq_b) if self.mla.q_lora_rank else (self.wq,)
        for lin in (*projections, self.wkv_a, self.wkv_b):
            _trunc_normal(lin.weight, std, generator)
        _trunc_normal(self.wo.weight, out_std, generator)
        for norm in (getattr(self, "q_norm", None), self.kv_norm):
            if norm is not None:
                norm.init_weights()
