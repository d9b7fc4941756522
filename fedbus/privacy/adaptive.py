"""Adaptive clipping: Andrew, Thakkar, McMahan, Ramaswamy 2021, "Differentially Private
Learning with Adaptive Clipping" (NeurIPS), Algorithm 1 with the geometric update.

Each round, with C the current clip and m the number of summed updates:

    b_i  = 1[ ||Δ_i|| <= C ]                               (the update was not clipped)
    b~   = ( sum_i b_i + N(0, σ_b²) ) / m                  (noised fraction unclipped)
    C   <- C · exp( −η_C · (b~ − γ) )                      (geometric step toward quantile γ)

If more than a fraction γ of the norms lie under C, b~ > γ and C shrinks; if fewer, it
grows: C tracks the γ-quantile of the update norms (Flower's adaptive clipping was reported
to step the other way; ``tests/test_privacy_adaptive.py`` checks the direction from both sides).

Budget share (the paper's Theorem 1). The count and the clipped sum are released together;
with the job's noise multiplier z, the sum gets

    z_Δ = ( z^(−2) − (2σ_b)^(−2) )^(−1/2)

so that the pair costs exactly what one Gaussian of multiplier z does and the accountant
(``accountant.py``) keeps accounting z. Requires 2σ_b > z. The paper's defaults: γ = 0.5,
η_C = 0.2, σ_b = m / 20.
"""

from __future__ import annotations

import math

import torch


def update_noise_multiplier(noise_multiplier: float, count_noise: float) -> float:
    """z_Δ = (z^-2 − (2σ_b)^-2)^-1/2: what is left of z for the sum once the count took its share."""
    z, s = float(noise_multiplier), float(count_noise)
    if not (z > 0 and s > 0 and 2 * s > z):
        raise ValueError(f"adaptive clipping needs 2 * count_noise > noise_multiplier, got {s} and {z}")
    return (z ** -2 - (2 * s) ** -2) ** -0.5


def noised_fraction(unclipped: float, count: int, count_noise: float, generator: torch.Generator) -> float:
    """b~ = (sum_i b_i + N(0, σ_b²)) / m."""
    if count < 1:
        raise ValueError("the fraction of unclipped updates needs at least one update")
    noise = float(torch.randn((), dtype=torch.float64, generator=generator)) * float(count_noise)
    return (float(unclipped) + noise) / count


def next_clip(clip: float, fraction: float, target_quantile: float, learning_rate: float) -> float:
    """C · exp(−η_C (b~ − γ))."""
    out = float(clip) * math.exp(-float(learning_rate) * (float(fraction) - float(target_quantile)))
    if not (math.isfinite(out) and out > 0):
        raise ValueError(f"the adaptive clip left (0, inf): {out}")
    return out
