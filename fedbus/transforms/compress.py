"""Update compression as a pipeline stage: the worker sends a compressed delta, the receiver
rebuilds the weights from it before anything folds them.

    worker:   Δ = y - x (+ e, the error kept from earlier rounds)  ->  codec parts
    receiver: parts  ->  Δ^ (every claim checked against the model)  ->  y^ = x + Δ^

Compression needs the delta, not the weights (a 16-bit, 8-bit or sparse copy of the
weights would lose what training changed), so the receiver needs the model the update was
trained from: ``decode_update`` passes it as ``LocalUpdate.base_state``. Only real float
tensors are compressed; integer and bool buffers and strategy extras (SCAFFOLD's Δc)
travel as before.

Error feedback (``topk`` with ``error_feedback: true``, Stich et al. 2018 / Karimireddy et
al. 2019): e <- (Δ + e) - decode(encode(Δ + e)), kept per tensor on the worker. It is the
stage's state (``state_dict``), persisted per run with SCAFFOLD's c_i, so a restarted
worker keeps what it has yet to send.

Stochastic rounding (int8) draws from a generator seeded with the round's public training
seed: rounding protects nothing, and a seeded draw keeps reruns reproducible.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch

from fedbus.compression.codecs import CompressionError, DeltaCodec
from fedbus.crypto.envelopes import Rejection
from fedbus.transforms.base import LocalUpdate, State, Transform, UpdateContext


def _compressible(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()


class Compress(Transform):
    name: ClassVar[str] = "compress"

    def __init__(self, codec: DeltaCodec, *, error_feedback: bool = False):
        self.codec = codec
        self.error_feedback = error_feedback
        self.residual: State = {}  # e, flat float32 per tensor; empty means 0

    def apply(self, ctx: UpdateContext, update: LocalUpdate) -> LocalUpdate:
        state = dict(update.state)
        groups = {g: dict(v) for g, v in update.extra_groups.items()}
        generator = torch.Generator().manual_seed(ctx.training.seed)
        for name, y in update.state.items():
            if not _compressible(y):
                continue
            x = torch.as_tensor(ctx.global_state[name])
            delta = y.detach().to(torch.float32).sub(x.to(torch.float32)).reshape(-1)
            kept = self.residual.get(name) if self.error_feedback else None
            if kept is not None and kept.numel() == delta.numel():  # (a state file of another model: dropped)
                delta += kept
            parts = self.codec.encode(delta, generator)
            if self.error_feedback:
                self.residual[name] = delta - self.codec.decode(parts, delta.numel(), name)
            del state[name]
            for part, tensor in parts.items():
                if part:
                    groups.setdefault(part, {})[name] = tensor
                else:
                    state[name] = tensor
        return update.with_(state=state, extra_groups=groups)

    def decode(self, update: LocalUpdate) -> LocalUpdate:
        base = update.base_state
        if base is None:
            raise Rejection("wrong_round", f"no model of version {update.base_version} to rebuild the update from")
        state = dict(update.state)
        groups = {g: dict(v) for g, v in update.extra_groups.items()}
        mine = {part: groups.pop(part, {}) for part in self.codec.parts if part}
        for name, x in base.items():
            if not _compressible(x):
                continue
            parts = {part: got.pop(name) for part, got in mine.items() if name in got}
            if name in state:
                parts[""] = state.pop(name)
            if unexpected := sorted(set(parts) - set(self.codec.parts)):
                raise Rejection("tensor_mismatch", f"{name}: parts {unexpected} of another compression")
            try:
                delta = self.codec.decode(parts, x.numel(), name)
            except CompressionError as exc:
                raise Rejection(exc.reason, exc.detail) from None
            state[name] = x.to(torch.float32).add(delta.view(x.shape)).to(x.dtype)
        if leftover := sorted(f"{part}/{name}" for part, got in mine.items() for name in got):
            raise Rejection("tensor_mismatch", f"compressed parts of no model tensor: {leftover[:3]}")
        return update.with_(state=state, extra_groups=groups)

    def state_dict(self) -> dict[str, State]:
        return {"residual": dict(self.residual)} if self.residual else {}

    def load_state_dict(self, state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        self.residual = {k: v.detach().to(torch.float32).clone().reshape(-1)
                         for k, v in (state.get("residual") or {}).items()}
