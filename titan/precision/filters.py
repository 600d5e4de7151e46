"""Which nn.Linear layers may run in a low-precision format."""

from __future__ import annotations

from typing import Callable

from torch import nn

# Block size of MX formats; float8 `_scaled_mm` needs both matrix dims divisible by 16.
FLOAT8_MULTIPLE = 16
MX_BLOCK = 32

LinearFilter = Callable[[nn.Module, str], bool]


def is_output_projection(fqn: str) -> bool:
    # The final projection stays in high precision: its logits feed the loss directly, and its
    # vocab-sized dim is rarely a multiple of 16 (torchtitan makes the same choice).
    return fqn == "output" or fqn.endswith(".output")


def linear_filter(min_dim: int, multiple: int, allow_bias: bool = True) -> LinearFilter:
    """A `(module, fqn) -> bool` filter in the form torchao's converters take."""

    def keep(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear) or is_output_projection(fqn):
            return False
        if not allow_bias and module.bias is not None:
            return False
        dims = (module.in_features, module.out_features)
        return all(d >= min_dim and d % multiple == 0 for d in dims)

    return keep
