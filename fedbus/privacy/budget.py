"""The privacy budget the coordinator's round machine consults: pure, committed with the job.

Before a round opens, ``allows(pool, sample)`` asks the accountant what ε would be after one
more round of that shape; the machine finishes the job (``privacy_budget_exhausted``) instead
of opening a round that would take ε past ``max_epsilon``. The round's shape is noted when it
opens (``opened``) and accounted when it aggregates (``aggregated``, which returns the new ε);
a failed round released nothing and is dropped (``failed``). ``state_dict`` holds the rounds
accounted and the open round's shape, so it is committed with every record and a resumed
coordinator continues the same budget.
"""

from __future__ import annotations

from collections import Counter
from functools import lru_cache

import torch

from fedbus.privacy.accountant import RoundEvent, epsilon


@lru_cache(maxsize=256)
def _epsilon(shapes: tuple[tuple[int, int, int], ...], z: float, delta: float, method: str) -> float:
    return epsilon([(RoundEvent(pool, sample, z), n) for pool, sample, n in shapes], delta, method)


class PrivacyBudget:
    def __init__(self, noise_multiplier: float, target_delta: float, max_epsilon: float, method: str = "rdp"):
        self.noise_multiplier = float(noise_multiplier)
        self.target_delta = float(target_delta)
        self.max_epsilon = float(max_epsilon)
        self.method = method
        self.rounds: Counter[tuple[int, int]] = Counter()  # (pool, sample) -> rounds accounted
        self.pending: tuple[int, int] | None = None

    def _eps(self, rounds: Counter) -> float:
        shapes = tuple(sorted((p, s, n) for (p, s), n in rounds.items() if n > 0))
        return _epsilon(shapes, self.noise_multiplier, self.target_delta, self.method)

    @property
    def epsilon(self) -> float:
        """ε at target_delta over the rounds accounted so far."""
        return self._eps(self.rounds)

    @property
    def rounds_accounted(self) -> int:
        return sum(self.rounds.values())

    def epsilon_after(self, pool: int, sample: int) -> float:
        return self._eps(self.rounds + Counter({(pool, sample): 1}))

    def allows(self, pool: int, sample: int) -> bool:
        return self.epsilon_after(pool, sample) <= self.max_epsilon

    def opened(self, pool: int, sample: int) -> None:
        self.pending = (int(pool), int(sample))

    def aggregated(self) -> float:
        if self.pending is not None:
            self.rounds[self.pending] += 1
            self.pending = None
        return self.epsilon

    def failed(self) -> None:
        self.pending = None

    def state_dict(self) -> dict:
        shapes = [[p, s, n] for (p, s), n in sorted(self.rounds.items())]
        out: dict = {"epsilon": self.epsilon}
        if shapes:
            out["rounds"] = torch.tensor(shapes, dtype=torch.int64)
        if self.pending is not None:
            out["pending_pool"], out["pending_sample"] = self.pending
        return out

    def load_state_dict(self, state: dict) -> None:
        rows = state.get("rounds")
        self.rounds = Counter()
        if rows is not None:
            for p, s, n in torch.as_tensor(rows).reshape(-1, 3).tolist():
                RoundEvent(int(p), int(s), self.noise_multiplier)  # bounds: 1 <= sample <= pool
                self.rounds[(int(p), int(s))] += int(n)
        self.pending = ((int(state["pending_pool"]), int(state["pending_sample"]))
                        if "pending_pool" in state else None)


def privacy_summary(job, budget: PrivacyBudget) -> dict:
    """summary.json's ``privacy`` section: the client-level guarantee and how it was computed."""
    dp = job.privacy.dp
    return {"client_level": {
        "epsilon": budget.epsilon, "target_delta": budget.target_delta, "max_epsilon": budget.max_epsilon,
        "rounds_accounted": budget.rounds_accounted, "noise_multiplier": budget.noise_multiplier,
        "mode": dp.mode, "clip": dp.clip.model_dump(exclude_none=True), "accountant": budget.method,
        "neighbouring": "replace_one",
        "sampling": "fixed-size cohort without replacement from the live workers (full cohort: no sampling)"}}
