"""Straggler simulation for evaluating asynchronous federation. NOT a production path.

A worker slows down only when started with the explicit ``--simulate-slowdown FACTOR``
option (tests, ``fedbus demo --stragglers``, ``benchmarks/stragglers.py``); the job spec
cannot turn it on, like ``--simulate-attack``.

The worker stretches its local training wall time by FACTOR: when training a round took
t seconds (measured on this machine, so a slow or busy machine stays proportionally
slow), it waits (FACTOR - 1) * t more before publishing the update. The wait is an
``asyncio.sleep`` in the service, so heartbeats keep flowing (a straggler is alive, only
slow) and no thread is held.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# A factor beyond this is a typo, not a straggler: 1000 x a 0.1 s round is already minutes.
MAX_FACTOR = 1000.0


@dataclass(frozen=True)
class Slowdown:
    factor: float

    def __post_init__(self) -> None:
        if not isinstance(self.factor, (int, float)) or isinstance(self.factor, bool):
            raise ValueError(f"slowdown factor must be a number, not {self.factor!r}")
        if not math.isfinite(self.factor) or not 1.0 <= self.factor <= MAX_FACTOR:
            raise ValueError(f"slowdown factor must lie in [1, {MAX_FACTOR:g}], not {self.factor!r}")

    @classmethod
    def parse(cls, text: str) -> Slowdown:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"slowdown factor must be a number, not {text!r}") from None
        return cls(value)

    def extra_seconds(self, trained_s: float) -> float:
        """How long to wait after training that took ``trained_s`` seconds: (factor - 1) * t.

        A negative or non-finite measurement (a clock oddity) waits nothing rather than
        forever."""
        if not math.isfinite(trained_s) or trained_s <= 0:
            return 0.0
        return (self.factor - 1.0) * trained_s
