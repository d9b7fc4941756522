"""Cohort sampling: which live workers a round asks for updates (pure, seeded)."""

from __future__ import annotations

import random


def sample_cohort(alive: list[str], size: int | None, *, seed: int, round_: int) -> tuple[str, ...]:
    """All of ``alive`` when ``size`` is unset or covers them; else a uniform sample
    without replacement, deterministic for (seed, round)."""
    if size is None or size >= len(alive):
        return tuple(sorted(alive))
    rng = random.Random(seed * 1_000_003 + round_)
    return tuple(sorted(rng.sample(sorted(alive), size)))
