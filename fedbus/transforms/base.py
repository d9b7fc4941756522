"""The worker's update pipeline: ordered transforms between local training and the wire.

    train -> strategy client step -> clip -> DP noise -> (test-only attack) -> compress -> encode

Each transform may adjust the training plan before training (``prepare``: FedProx's
mu, SCAFFOLD's gradient correction), rewrites the update after it (``apply``), and
has a matching ``decode`` that the receiver runs in reverse order before folding
(identity for every transform today except ``Encode`` and ``Compress``, which rebuilds
the weights from a compressed delta and the update's base model). Masking and sealing
can be further transforms; nothing else changes.

Transforms hold no I/O. A transform with per-job state (SCAFFOLD's c_i) exposes it
with ``state_dict``/``load_state_dict``; the worker service persists it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch

from fedbus.protocol.codec import Tensor
from fedbus.protocol.messages import Update
from fedbus.tasks import TrainingContext, TrainSettings

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class UpdateContext:
    """What every transform may read about the round it works on."""

    training: TrainingContext
    settings: TrainSettings  # after every transform's prepare
    global_state: Mapping[str, torch.Tensor]  # x: the round's global model (never modified)
    broadcast: Mapping[str, Mapping[str, torch.Tensor]]  # strategy extras the coordinator sent, by group
    base_version: int


@dataclass
class TrainPlan:
    """How local training will run: settings and extra keyword arguments for Task.train."""

    settings: TrainSettings
    train_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class LocalUpdate:
    """An update on its way through the pipeline (and, decoded, on the receiver's side)."""

    round: int
    base_version: int
    state: dict[str, Tensor]  # y: the locally trained model
    num_samples: int
    num_steps: int
    train_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    eval_samples: int = 0
    extra_scalars: dict[str, float] = field(default_factory=dict)
    extra_groups: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    # Set by Encode, the last transform: exactly what goes on the wire.
    fields: Update | None = None
    tensors: dict[str, Tensor] | None = None
    # Receiver only: the model the update was trained from, for decodes that rebuild the
    # weights from a delta (``compress``); None when the receiver has no such model.
    base_state: Mapping[str, torch.Tensor] | None = None

    def with_(self, **changes: Any) -> LocalUpdate:
        return replace(self, **changes)


class Transform:
    """One pipeline stage; the defaults are the identity."""

    name: ClassVar[str] = "transform"

    def prepare(self, ctx: TrainingContext, broadcast: Mapping[str, Mapping[str, torch.Tensor]],
                model_params: Iterable[tuple[str, torch.Tensor]], plan: TrainPlan) -> TrainPlan:
        return plan

    def apply(self, ctx: UpdateContext, update: LocalUpdate) -> LocalUpdate:
        return update

    def decode(self, update: LocalUpdate) -> LocalUpdate:
        """The receiver's inverse (after Encode.decode has parsed the wire form)."""
        return update

    def state_dict(self) -> dict[str, State]:
        """Per-job worker state to persist (empty for stateless transforms)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        if state:
            raise ValueError(f"{self.name} keeps no state, got {sorted(state)}")


class Pipeline:
    """Transforms in order; ``decode`` runs them in reverse."""

    def __init__(self, transforms: Iterable[Transform]):
        self.transforms: tuple[Transform, ...] = tuple(transforms)
        names = [t.name for t in self.transforms]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate transforms in pipeline: {names}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.transforms)

    def prepare(self, ctx: TrainingContext, broadcast: Mapping[str, Mapping[str, torch.Tensor]],
                model_params: list[tuple[str, torch.Tensor]], plan: TrainPlan) -> TrainPlan:
        for t in self.transforms:
            plan = t.prepare(ctx, broadcast, model_params, plan)
        return plan

    def apply(self, ctx: UpdateContext, update: LocalUpdate) -> LocalUpdate:
        for t in self.transforms:
            update = t.apply(ctx, update)
        return update

    def decode(self, update: LocalUpdate) -> LocalUpdate:
        for t in reversed(self.transforms):
            update = t.decode(update)
        return update

    def state_dict(self) -> dict[str, dict[str, State]]:
        return {t.name: s for t in self.transforms if (s := t.state_dict())}

    def load_state_dict(self, state: Mapping[str, Mapping[str, Mapping[str, torch.Tensor]]]) -> None:
        """Replace every transform's state; a transform missing from ``state`` starts fresh."""
        unknown = sorted(set(state) - set(self.names))
        if unknown:
            raise ValueError(f"state for transforms not in this pipeline: {unknown}")
        for t in self.transforms:
            t.load_state_dict(state.get(t.name, {}))
