"""A partial aggregate's tensors on the wire: the sums in the model's precision.

Accumulators keep float64 (complex128) sums so that folding thousands of updates loses
nothing; on the wire a region's sums travel as float32 (complex64): one model's worth of
bytes per region and round, where its workers' updates cost one model each. The
receiver widens them back before merging (exactly). Rounding a sum to float32 costs at
most half an ulp of the sum, below the precision of the float32 model it updates.
Integer-buffer carries stay float64 (small, and their increments must stay exact).
"""

from __future__ import annotations

import torch

from fedbus.aggregation.partial import PartialAggregate

_NARROW = {torch.float64: torch.float32, torch.complex128: torch.complex64}
_WIDE = {torch.float32: torch.float64, torch.complex64: torch.complex128}


def wire_partial(partial: PartialAggregate) -> tuple[dict[str, torch.Tensor], dict]:
    """``partial.to_message()`` with the delta sums narrowed for the wire."""
    tensors, meta = partial.to_message()
    return {k: (v.to(_NARROW.get(v.dtype, v.dtype)) if not k.startswith("carry/") else v)
            for k, v in tensors.items()}, meta


def widened_partial(tensors) -> dict[str, torch.Tensor]:
    """The received tensors widened back to the accumulator's float64 / complex128."""
    return {k: (v.to(_WIDE.get(v.dtype, v.dtype)) if isinstance(v, torch.Tensor) else v) for k, v in tensors.items()}


__all__ = ["wire_partial", "widened_partial"]
