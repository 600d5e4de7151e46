"""Stochastic rounding of float32 to bfloat16.

bf16 keeps 8 mantissa bits. An optimizer state such as exp_avg_sq moves by (1 - beta2) = 5% of
the gap per step; round-to-nearest drops updates smaller than half a bf16 ulp every time, so
the state stalls. Rounding up with probability equal to the dropped fraction makes the stored
value unbiased: the updates survive on average.
"""

from __future__ import annotations

from typing import Optional

import torch

_LOW16 = (1 << 16) - 1


def copy_stochastic_(dst: torch.Tensor, src: torch.Tensor, generator: Optional[torch.Generator] = None) -> None:
    """dst (bf16) <- src (fp32), rounded away from zero with probability (dropped bits) / 2^16."""
    bits = src.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, src.shape, dtype=torch.int32, device=src.device, generator=generator)
    # fp32 is sign-magnitude: adding to the low bits grows the magnitude for either sign, and a
    # carry into bit 16 is exactly "round away from zero". Clearing the low 16 bits then leaves
    # a value bf16 holds exactly.
    rounded = (bits + noise) & ~_LOW16
    dst.copy_(rounded.view(torch.float32))
