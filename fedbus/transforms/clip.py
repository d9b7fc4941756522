"""Client-side norm clipping of the update's delta (all float tensors, one L2 norm).

The coordinator's ``norm_bound`` clips again on receipt (a worker cannot be trusted to
clip); clipping on the worker is what client-level differential privacy needs before
noise is added, so it runs before any noise transform.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from fedbus.transforms.base import LocalUpdate, Transform, UpdateContext


class ClipUpdateNorm(Transform):
    name: ClassVar[str] = "clip"

    def __init__(self, max_norm: float):
        if not (math.isfinite(max_norm) and max_norm > 0):
            raise ValueError(f"max_norm must be finite and > 0, got {max_norm}")
        self.max_norm = float(max_norm)

    def apply(self, ctx: UpdateContext, update: LocalUpdate) -> LocalUpdate:
        deltas = {}
        for name, y in update.state.items():
            if isinstance(y, torch.Tensor) and y.is_floating_point():
                deltas[name] = y.to(torch.float64) - torch.as_tensor(ctx.global_state[name]).to(torch.float64)
        norm = math.sqrt(sum(float(d.pow(2).sum()) for d in deltas.values()))
        if norm <= self.max_norm:
            return update
        scale = self.max_norm / norm
        state = dict(update.state)
        for name, d in deltas.items():
            x = torch.as_tensor(ctx.global_state[name]).to(torch.float64)
            state[name] = (x + d * scale).to(update.state[name].dtype)
        return update.with_(state=state)
