"""Document masking for packed sequences: attention stays inside each document and RoPE
positions restart at every document's first token.

Documents are packed as `[bos] + tokens + [eos]`, so a window's document ids follow from its
BOS tokens alone (`document_ids`): whatever precedes the first BOS (the tail of a document cut
by the window start) is document 0 of the row. Everything else is recomputed from these ids
wherever it is needed (per-document positions, the attention mask), so the ids are the only
thing that must travel with a micro-batch, e.g. to later pipeline stages.

Two kernels behind one switch: on CPU, SDPA with a dense block-causal boolean mask (flex
attention has no CPU backward); on CUDA, FlexAttention with a block-sparse mask (compiled once).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F


def document_ids(tokens: torch.Tensor, bos_id: int) -> torch.Tensor:
    """(batch, seq) int32 document index of every token: the running count of BOS tokens,
    starting at 0 (a leading BOS opens document 1; the ids only need to differ per document)."""
    return (tokens == bos_id).cumsum(dim=-1, dtype=torch.int32)


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """(batch, seq) position of each token inside its document (0 at each document start)."""
    seq = doc_ids.shape[-1]
    index = torch.arange(seq, device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[..., 1:] = doc_ids[..., 1:] != doc_ids[..., :-1]
    start_index = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=-1).values
    return index - start_index


@dataclass
class DocumentMask:
    """Block-causal attention over (batch, seq) document ids; the kernel-specific mask is
    built on first use and shared by every layer of one forward."""

    doc_ids: torch.Tensor
    _cache: dict = field(default_factory=dict, repr=False)

    def dense(self) -> torch.Tensor:
        """(batch, 1, seq, seq) boolean mask for SDPA: True where attention is allowed."""
        if "dense" not in self._cache:
            ids = self.doc_ids
            seq = ids.shape[-1]
            causal = torch.ones(seq, seq, dtype=torch.bool, device=ids.device).tril()
            same = ids.unsqueeze(-1) == ids.unsqueeze(-2)
            self._cache["dense"] = (same & causal).unsqueeze(1)
        return self._cache["dense"]

    def block_mask(self, heads: int) -> Any:
        """FlexAttention BlockMask (CUDA)."""
        if "block" not in self._cache:
            from torch.nn.attention.flex_attention import create_block_mask

            ids = self.doc_ids

            def mask_mod(b, h, q_idx, kv_idx):
                return (q_idx >= kv_idx) & (ids[b, q_idx] == ids[b, kv_idx])

            bsz, seq = ids.shape
            self._cache["block"] = create_block_mask(mask_mod, bsz, None, seq, seq, device=ids.device)
        return self._cache["block"]


_compiled_flex: Optional[Any] = None


def _flex_attention():
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        # Uncompiled flex attention materialises the full score matrix; compiled, it is a fused kernel.
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: DocumentMask) -> torch.Tensor:
    """Attention over (batch, heads, seq, head_dim) restricted to each query's own document
    (and causal). CUDA: FlexAttention; elsewhere: SDPA with the dense block-causal mask."""
    if q.device.type == "cuda":
        return _flex_attention()(q, k, v, block_mask=mask.block_mask(q.shape[1]))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense())
