"""The accountant: Google's ``dp-accounting`` (RDP and PLD) over the rounds fedbus actually ran.

What is accounted. Each aggregated round releases a model computed from the sum of the
cohort's clipped deltas with Gaussian noise z·C (``noise.py``). fedbus samples a round's
cohort uniformly *without replacement* and with a fixed size m from the pool of live
workers (``fedbus.coordinator.sampling.sample_cohort``), so a round is accounted as

    SampledWithoutReplacementDpEvent(source=pool, sample=m, GaussianDpEvent(z / 2))

under the replace-one neighbouring relation (one worker's data replaced by anything: the
pool size is public). Replacing one clipped delta moves the sum by at most 2C, so the noise
multiplier relative to that sensitivity is z·C / 2C = z / 2 (Wang, Balle, Kasiviswanathan
2019, Theorem 27, as dp-accounting implements it); dp-accounting's PLD takes z itself and
doubles the shift for REPLACE_ONE (see ``RoundEvent.dp_event``). A round with the whole pool in its
cohort (m = pool; cohort.size unset) is ``GaussianDpEvent(z / 2)``. Rounds that failed
released nothing and are not accounted.

RDP (``RdpAccountant(neighboring_relation=REPLACE_ONE)``) supports both events. dp-accounting's
PLD accountant has no sampling-without-replacement event (0.6.0 handles only Poisson
sampling), so ``accountant: pld`` is for jobs without cohort sampling (every round a plain
Gaussian, for which PLD is tighter); job validation refuses it otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import rdp_privacy_accountant

METHODS = ("rdp", "pld")
# Finer than dp-accounting's default orders at the low end, where small-epsilon jobs optimise.
RDP_ORDERS = tuple([1 + x / 20.0 for x in range(1, 100)] + list(range(6, 64)) + [80, 128, 256, 512, 1024])


@dataclass(frozen=True)
class RoundEvent:
    """One aggregated round: the cohort of ``sample`` drawn from ``pool`` live workers, noise z."""

    pool: int
    sample: int
    noise_multiplier: float

    def __post_init__(self) -> None:
        if not (1 <= self.sample <= self.pool):
            raise ValueError(f"a round samples 1..pool workers, got {self.sample} of {self.pool}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(f"noise_multiplier must be finite and > 0, got {self.noise_multiplier}")

    def dp_event(self, method: str = "rdp") -> dp_event.DpEvent:
        # The two accountants read a Gaussian's multiplier differently under REPLACE_ONE: RDP
        # takes it relative to the replace-one sensitivity (2C, so z/2), PLD relative to one
        # element's contribution C and shifts by twice that itself (privacy_loss_mechanism.py,
        # AdjacencyType.REPLACE) - the same mechanism either way.
        gaussian = dp_event.GaussianDpEvent(self.noise_multiplier / 2.0 if method == "rdp" else self.noise_multiplier)
        if self.sample == self.pool:
            return gaussian
        return dp_event.SampledWithoutReplacementDpEvent(self.pool, self.sample, gaussian)


def compose(events: Iterable[tuple[RoundEvent, int]], method: str = "rdp") -> dp_event.DpEvent:
    """(event, how many rounds) pairs as one dp-accounting event."""
    return dp_event.ComposedDpEvent([dp_event.SelfComposedDpEvent(e.dp_event(method), int(n))
                                     for e, n in events if n > 0])


def epsilon(events: Iterable[tuple[RoundEvent, int]], delta: float, method: str = "rdp") -> float:
    """ε at ``delta`` after the given rounds (0.0 before any round)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    event = compose(events, method)
    if not event.events:
        return 0.0
    if method == "rdp":
        acc = rdp_privacy_accountant.RdpAccountant(list(RDP_ORDERS), NeighboringRelation.REPLACE_ONE)
    elif method == "pld":
        acc = pld_privacy_accountant.PLDAccountant(NeighboringRelation.REPLACE_ONE)
    else:
        raise ValueError(f"accountant must be one of {METHODS}, got {method!r}")
    if not acc.supports(event):
        raise ValueError(f"the {method} accountant does not support {event}")
    acc.compose(event)
    return float(acc.get_epsilon(delta))


def noise_multiplier_for(target_epsilon: float, delta: float, rounds: int, pool: int, sample: int,
                         method: str = "rdp", *, tol: float = 1e-3, max_iter: int = 60) -> float:
    """The smallest z (within ``tol`` relative) whose ``rounds`` rounds of (pool, sample) stay at or
    under ``target_epsilon``: bisection on the monotone ε(z), bounded iterations."""
    def eps(z: float) -> float:
        return epsilon([(RoundEvent(pool, sample, z), rounds)], delta, method)

    lo, hi = 1e-2, 1.0
    for _ in range(max_iter):
        if eps(hi) <= target_epsilon:
            break
        lo, hi = hi, hi * 2
    else:
        raise ValueError(f"no noise multiplier up to {hi} reaches epsilon {target_epsilon}")
    for _ in range(max_iter):
        if hi - lo <= tol * hi:
            break
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if eps(mid) <= target_epsilon else (mid, hi)
    return hi
