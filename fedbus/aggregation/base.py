"""What every aggregation rule sees: plain tensors, no network."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ClientUpdate:
    """One verified update: a worker's full local weights for the round's base model."""

    worker_id: str
    num_samples: int
    state: State
    num_steps: int = 0
    extra: dict = field(default_factory=dict)


class StreamingRule(Protocol):
    """Folds updates one at a time into O(model) memory."""

    def add(self, update: ClientUpdate) -> None: ...

    def result(self) -> State: ...

    @property
    def count(self) -> int: ...


def is_averageable(t: torch.Tensor) -> bool:
    """Float tensors are averaged; integer and bool buffers are not (see fedavg)."""
    return t.is_floating_point() or t.is_complex()
