"""Distributed DP: the worker adds its share of DP-FedAvg's noise to its clipped delta.

    y_i' = x + clip(Δ_i, C) + N(0, z² C² / q · I)          (``fedbus.privacy.noise.share_std``)

It runs right after ``ClipUpdateNorm`` and before anything that quantizes or masks the
update (secure aggregation's fixed-point encoding comes later in the pipeline, so the noise
is discretized with the update: its effect is one rounding step per coordinate, far below
the noise's own standard deviation for any useful scale).

q is the job's quorum ``cohort.min_updates``, a count in distributed mode (job validation):
the fewest updates any round aggregates. Every round sums k >= q shares, so the sum carries
variance k z² C² / q >= z² C² and the accounted z is never undercut; a round with k > q is
over-noised by sqrt(k / q).
The guarantee assumes honest workers: one that skips its share lowers the sum's noise, and
the coordinator, which cannot tell noise from signal, cannot check it.

The receiving decode is the identity: the noise is part of the update, and the server's
rule (``fedbus.privacy.central.DpFedAvg`` in distributed mode) only takes the uniform mean.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from fedbus.privacy.noise import gaussian_like, share_std
from fedbus.transforms.base import LocalUpdate, Transform, UpdateContext


class GaussianNoiseShare(Transform):
    name: ClassVar[str] = "dp_noise"

    def __init__(self, noise_multiplier: float, clip: float, shares: int, generator: torch.Generator | None = None):
        self.std = share_std(noise_multiplier, clip, shares)
        self.generator = generator  # tests only; None: a fresh seed from the OS CSPRNG per update

    def apply(self, ctx: UpdateContext, update: LocalUpdate) -> LocalUpdate:
        floats = {k: v for k, v in update.state.items()
                  if isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex())}
        noise = gaussian_like(floats, self.std, self.generator)
        state = dict(update.state)
        for name, y in floats.items():
            wide = y.to(torch.complex128 if y.is_complex() else torch.float64)
            state[name] = (wide + noise[name]).to(y.dtype)
        return update.with_(state=state)
