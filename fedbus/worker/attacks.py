"""Attack simulation for evaluating robust aggregation. NOT a production path.

A worker applies an attack only when started with the explicit ``--simulate-attack``
option (tests and benchmarks); the job spec cannot turn one on, so a federation's
configuration can never make honest workers misbehave.

Model-poisoning attacks act on the update's delta d = y - x (x: the round's global
model, y: the locally trained one) and send x + f(d):
- ``sign_flip:k``: f(d) = -k d
- ``scale:k``: f(d) = k d
- ``gaussian:s``: f(d) = d + N(0, s^2) per coordinate
Data poisoning:
- ``label_flip``: labels y -> C - 1 - y before training (C classes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KINDS = ("sign_flip", "scale", "gaussian", "label_flip")


@dataclass(frozen=True)
class Attack:
    kind: str
    param: float = 1.0
    seed: int = 0

    @classmethod
    def parse(cls, text: str, seed: int = 0) -> Attack:
        kind, _, param = text.partition(":")
        if kind not in KINDS:
            raise ValueError(f"unknown attack {kind!r}; one of {KINDS}")
        defaults = {"sign_flip": 1.0, "scale": 10.0, "gaussian": 0.1, "label_flip": 0.0}
        return cls(kind, float(param) if param else defaults[kind], seed)

    @property
    def poisons_data(self) -> bool:
        return self.kind == "label_flip"

    def poison_update(self, global_state: dict[str, torch.Tensor], local_state: dict[str, torch.Tensor],
                      round_: int) -> dict[str, torch.Tensor]:
        if self.poisons_data:
            return local_state
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + round_)
        out = {}
        for name, y in local_state.items():
            if not (y.is_floating_point() or y.is_complex()):
                out[name] = y
                continue
            x = global_state[name].to(y.dtype)
            d = y - x
            if self.kind == "sign_flip":
                d = -self.param * d
            elif self.kind == "scale":
                d = self.param * d
            elif self.kind == "gaussian":
                d = d + self.param * torch.randn(d.shape, generator=gen, dtype=torch.float32).to(d.dtype)
            out[name] = x + d
        return out

    def poison_labels(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        return (num_classes - 1 - labels) if self.poisons_data else labels
