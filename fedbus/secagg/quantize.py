"""Fixed-point quantization modulo 2^bits, with bits chosen so the sum cannot wrap.

An update is clipped to L2 norm C before it gets here, so every coordinate satisfies
|x_i| <= C (a coordinate is at most the whole norm); ``bound`` is that per-coordinate
range (C; C·w when a worker pre-weights its update by w).

    q_i = round(clamp(x_i, -B, B) · s)          |q_i| <= R = ceil(B · s)
    sum over n workers:                           |Σ q_i| <= n · R
    bits = ceil(log2(2 · n · R + 1))              so [-nR, nR] fits modulo 2^bits

The field element is q_i mod 2^bits (two's complement); the decoded sum is the unique
representative in [-2^(bits-1), 2^(bits-1)). Example: B = 1, s = 2^16, n = 100 ->
R = 65536, 2nR + 1 = 13,107,201 -> 24 bits (3 bytes of information per coordinate;
sent as uint32).

Error: round-to-nearest moves each coordinate by at most 1/(2s), so the dequantized sum
differs from the float sum of the (clamped) inputs by at most n/(2s) per coordinate.
With distributed DP, noise is added before quantization: the sum then carries the
Gaussian noise plus at most n/(2s) of deterministic rounding per coordinate, which is
post-processing of each worker's noised value (its privacy is unchanged) and is small
against σ·C whenever s >> n / (σ·C).

Clamping is for honest workers (it keeps the bound true after noise). A malicious worker
can still send any value modulo 2^bits: masking hides inputs, it does not prove their
range (that would need zero-knowledge range proofs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MIN_BITS = 8
MAX_BITS = 62  # uint64 arithmetic with wraparound stays exact modulo 2^bits


class QuantizationError(ValueError):
    pass


@dataclass(frozen=True)
class Quantizer:
    bound: float  # per-coordinate range B
    scale: float  # s: quantization steps per unit
    max_summands: int  # n: how many inputs are summed

    def __post_init__(self):
        if not (math.isfinite(self.bound) and self.bound > 0 and math.isfinite(self.scale) and self.scale > 0):
            raise QuantizationError("bound and scale must be finite and > 0")
        if self.max_summands < 1:
            raise QuantizationError("max_summands must be >= 1")
        if self.bits > MAX_BITS:
            raise QuantizationError(f"bound·scale·n needs {self.bits} bits, more than {MAX_BITS}")

    @property
    def step_range(self) -> int:
        return math.ceil(self.bound * self.scale)

    @property
    def bits(self) -> int:
        return max(MIN_BITS, math.ceil(math.log2(2 * self.max_summands * self.step_range + 1)))

    @property
    def sum_error_bound(self) -> float:
        """Largest per-coordinate gap between the dequantized sum and the float sum."""
        return self.max_summands / (2 * self.scale)

    def quantize(self, values: np.ndarray) -> np.ndarray:
        x = np.clip(np.asarray(values, dtype=np.float64), -self.bound, self.bound)
        q = np.rint(x * self.scale).astype(np.int64)
        return q.view(np.uint64) & np.uint64((1 << self.bits) - 1)

    def decode_sum(self, total: np.ndarray) -> np.ndarray:
        """The signed integer sum from its residue modulo 2^bits (int64)."""
        modulus = 1 << self.bits
        t = np.asarray(total, dtype=np.uint64).astype(np.int64)
        return np.where(t >= modulus // 2, t - modulus, t)

    def dequantize_sum(self, total: np.ndarray) -> np.ndarray:
        return self.decode_sum(total).astype(np.float64) / self.scale


def wire_dtype(bits: int) -> np.dtype:
    """The narrowest unsigned type a residue modulo 2^bits travels as."""
    return np.dtype("<u4") if bits <= 32 else np.dtype("<u8")
