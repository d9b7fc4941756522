"""Gaussian noise for client-level DP-FedAvg (McMahan, Ramage, Talwar, Zhang 2018, Algorithm 1).

Each update's delta is clipped to L2 norm C (``fedbus.aggregation.norm_bound.clip_contribution``
on the server, ``fedbus.transforms.clip.ClipUpdateNorm`` on a worker), the clipped deltas are
summed with weight 1 each, and the sum carries Gaussian noise of standard deviation z·C:

    S~ = sum_i clip(Δ_i, C) + N(0, z² C² I)                 (central: added once, to the sum)
    S~ = sum_i (clip(Δ_i, C) + N(0, z² C² / q · I))          (distributed: a share per worker)

With k >= q shares the sum's noise has variance k·z²C²/q >= z²C²: never less than the
central mechanism's. The model moves by S~ / m, m the number of summed updates.

Randomness comes from the operating system's CSPRNG: a fresh 64-bit seed from
``os.urandom`` per call seeds torch's generator, never the job's public seed. Known
limits: torch's generator (Mersenne Twister / Philox) is not cryptographic, and floating
point Gaussian samples are open to Mironov's (2012) least-significant-bit attack; neither is
mitigated here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import torch


def central_std(noise_multiplier: float, clip: float) -> float:
    """σ_sum = z · C: the noise on the sum of clipped deltas."""
    return float(noise_multiplier) * float(clip)


def share_std(noise_multiplier: float, clip: float, shares: int) -> float:
    """σ_share = z · C / sqrt(q): q independent shares sum to variance z² C²."""
    if shares < 1:
        raise ValueError(f"shares must be >= 1, got {shares}")
    return central_std(noise_multiplier, clip) / math.sqrt(shares)


def secure_generator() -> torch.Generator:
    """A torch generator seeded from the OS CSPRNG (never from the job's public seed)."""
    g = torch.Generator()
    g.manual_seed(int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1))
    return g


def gaussian_like(tensors: Mapping[str, torch.Tensor], std: float,
                  generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """N(0, std²) per coordinate, float64, shaped like each float tensor (complex: real and imaginary parts)."""
    if not (math.isfinite(std) and std >= 0):
        raise ValueError(f"noise std must be finite and >= 0, got {std}")
    g = generator if generator is not None else secure_generator()
    out = {}
    for name, t in tensors.items():
        if t.is_complex():
            z = torch.randn((*t.shape, 2), dtype=torch.float64, generator=g) * std
            out[name] = torch.view_as_complex(z)
        else:
            out[name] = torch.randn(t.shape, dtype=torch.float64, generator=g) * std
    return out
