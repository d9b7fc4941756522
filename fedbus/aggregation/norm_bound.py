"""Norm bounding: clip every contribution's delta before any rule sees it.

Sun, Kairouz, Suresh, McMahan 2019, "Can You Really Backdoor Federated Learning?"
(arXiv:1911.07963), Sec. 4 (norm thresholding):

    Δ_i  = y_i − x_t                                  (all float tensors together)
    Δ_i' = Δ_i · min(1, M / ||Δ_i||_2)

||·||_2 is the global L2 norm over every float tensor of the model (one norm per update,
not per tensor, so the update's direction is preserved). Integer/bool buffers and the
contribution's extras pass through unchanged. A pre-filter, not a rule: ``NormBound(rule,
M)`` behaves as ``rule`` on clipped contributions and inherits its streaming/buffered and
mergeable nature, its precondition and its server state.

What the bound buys against inflated weights. FedAvg's step is a convex combination of
the clipped deltas,

    ||sum_i p_i Δ_i'|| <= sum_i p_i ||Δ_i'|| <= M,        p_i = w_i / sum_j w_j >= 0, sum p_i = 1

(triangle inequality, then ||Δ_i'|| <= M), so however large one contribution's weight —
a claimed sample count of 1e15 or 2**63 — the aggregated step moves the model by at most
M: the weight only chooses where inside the M-ball the step lands. The same holds for
every rule whose step is a convex combination of its inputs (FedNova's step is
tau_eff · sum p_i Δ_i'/a_i, bounded by M · max_i tau_eff / a_i instead). Bounding the
claimed weights themselves is the coordinator's job.

Partial aggregates of a norm-bounded rule carry the clipped sums and ``scalars["clipped"]``
and merge only with partials of the same bound (the rule's ``describe()`` names it).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from fedbus.aggregation.base import (Accumulator, AggregationRule, ClientUpdate, Contribution, InvalidUpdate, State,
                                     StateDict, as_contribution, float_keys, from_real64, is_averageable, to_real64)
from fedbus.aggregation.cohort import UpdateBuffer
from fedbus.aggregation.partial import PartialAggregate

CLIPPED = "clipped"


def delta_norm(c: Contribution, keys: list[str]) -> float:
    """||Δ_i||_2 over the given float tensors, accumulated in float64."""
    sq = 0.0
    for name in keys:
        d = to_real64(c.delta[name]).reshape(-1)
        sq += float(torch.dot(d, d))  # no n-sized temporary, unlike (d * d).sum()
    return math.sqrt(sq)


def clip_contribution(c: Contribution, keys: list[str], max_norm: float) -> tuple[Contribution, float]:
    """(the contribution with its delta clipped to max_norm, its original norm).

    The clipped delta keeps each tensor's dtype; the scaling happens in float64.
    """
    norm = delta_norm(c, keys)
    if norm <= max_norm:
        return c, norm
    scale = max_norm / norm
    delta = dict(c.delta)
    for name in keys:
        d = c.delta[name]
        wide = d.to(torch.complex128 if d.is_complex() else torch.float64)
        delta[name] = (wide * scale).to(d.dtype)
    return replace(c, delta=delta), norm


def update_norm(global_state: State, update: ClientUpdate) -> float:
    """Legacy: ||y_i − x_t||_2 over all float tensors of a full-weights update, in float64."""
    sq = 0.0
    for name in float_keys(global_state):
        d = to_real64(update.state[name]) - to_real64(global_state[name])
        sq += float((d * d).sum())
    return math.sqrt(sq)


def clip_update(global_state: State, update: ClientUpdate, max_norm: float) -> tuple[ClientUpdate, float]:
    """Legacy: (the full-weights update with its delta clipped to max_norm, its original norm)."""
    norm = update_norm(global_state, update)
    if norm <= max_norm:
        return update, norm
    scale = max_norm / norm
    state = dict(update.state)
    for name in float_keys(global_state):
        x = to_real64(global_state[name])
        state[name] = from_real64(x + (to_real64(update.state[name]) - x) * scale, global_state[name])
    return replace(update, state=state), norm


class ClippingAccumulator:
    """Clips each contribution, then hands it to the inner rule's accumulator."""

    def __init__(self, inner: Accumulator, global_state: State, base_version: int, max_norm: float, rule: str):
        self.inner = inner
        self._global = {k: v.detach().clone() for k, v in global_state.items()}
        self._keys = [k for k, v in global_state.items() if is_averageable(v)]
        self.base_version = int(base_version)
        self._max_norm = max_norm
        self.rule = rule
        self.clipped = 0

    @property
    def count(self) -> int:
        return self.inner.count

    @property
    def total_weight(self) -> float:
        return getattr(self.inner, "total_weight", 0.0)

    def fold(self, c: Contribution) -> None:
        for name in self._keys:  # a missing or misshapen delta is the inner rule's InvalidUpdate to raise
            d = c.delta.get(name) if isinstance(c, Contribution) else None
            if not isinstance(d, torch.Tensor) or d.shape != self._global[name].shape or not is_averageable(d):
                self.inner.fold(c)
                return
        clipped, norm = clip_contribution(c, self._keys, self._max_norm)
        self.inner.fold(clipped)
        self.clipped += norm > self._max_norm

    def from_local_state(self, worker_id: str, weight: float, local_state: State, extras: dict | None = None,
                         **kwargs) -> Contribution:
        """The inner accumulator's conversion (clipping happens in ``fold``)."""
        return self.inner.from_local_state(worker_id, weight, local_state, extras, **kwargs)

    def partial(self) -> PartialAggregate:
        p = self.inner.partial()  # a buffered inner rule raises StrategyConfigError here
        return replace(p, rule=self.rule, scalars={**p.scalars, CLIPPED: float(self.clipped)})

    def merge(self, partial: PartialAggregate) -> None:
        if isinstance(self.inner, UpdateBuffer):
            self.inner.merge(partial)  # not mergeable: StrategyConfigError
        if not isinstance(partial, PartialAggregate):
            raise InvalidUpdate(f"expected a PartialAggregate, got {type(partial).__name__}")
        if partial.rule != self.rule:
            raise InvalidUpdate(f"partial aggregate of rule {partial.rule!r} cannot merge into {self.rule!r}")
        clipped = partial.scalars.get(CLIPPED)
        if not (isinstance(clipped, float) and clipped.is_integer() and 0 <= clipped <= partial.count):
            raise InvalidUpdate("partial aggregate: a norm-bounded partial needs scalars['clipped'] in [0, count]")
        inner_rule = getattr(self.inner, "rule", partial.rule)
        self.inner.merge(replace(partial, rule=inner_rule,
                                 scalars={k: v for k, v in partial.scalars.items() if k != CLIPPED}))
        self.clipped += int(clipped)

    def finalize(self) -> State:
        return self.inner.finalize()

    # legacy
    def add(self, update: ClientUpdate) -> None:
        self.fold(as_contribution(update, self._global, self.base_version))

    def result(self) -> State:
        return self.finalize()


_ClippingAggregator = ClippingAccumulator  # older name


class NormBound(AggregationRule):
    """``rule`` applied to contributions whose deltas were clipped to ``max_norm``."""

    def __init__(self, rule: AggregationRule, max_norm: float):
        if not (max_norm > 0 and math.isfinite(max_norm)):
            raise ValueError(f"norm_bound: max_norm must be a positive finite number, got {max_norm}")
        self.rule = rule
        self.max_norm = float(max_norm)
        # Instance attributes shadow the ClassVars: the wrapper is whatever its rule is.
        self.name = rule.name  # type: ignore[misc]
        self.streaming = rule.streaming  # type: ignore[misc]
        self.mergeable = rule.mergeable  # type: ignore[misc]
        self.needs_plaintext = rule.needs_plaintext  # type: ignore[misc]
        self.update_groups = rule.update_groups  # type: ignore[misc]

    def check_cohort(self, min_updates: int) -> None:
        self.rule.check_cohort(min_updates)

    def configure(self, worker_id: str | None = None, version: int | None = None) -> dict:
        return self.rule.configure(worker_id, version)

    def broadcast(self) -> State:
        return self.rule.broadcast()

    def begin(self, global_state: State, base_version: int = 0) -> ClippingAccumulator:
        return ClippingAccumulator(self.rule.begin(global_state, base_version), global_state, base_version,
                                   self.max_norm, f"{self.rule.describe()}+norm_bound({self.max_norm!r})")

    def commit(self, aggregator: Accumulator, num_workers_total: int) -> None:
        inner = aggregator.inner if isinstance(aggregator, ClippingAccumulator) else aggregator
        self.rule.commit(inner, num_workers_total)

    def state_dict(self) -> StateDict:
        return self.rule.state_dict()

    def load_state_dict(self, state: StateDict) -> None:
        self.rule.load_state_dict(state)

    def describe(self) -> str:
        return f"{self.rule.describe()}+norm_bound({self.max_norm:g})"


def wrap_norm_bound(rule: AggregationRule, max_norm: float | None) -> AggregationRule:
    """``rule`` behind a NormBound pre-filter; ``rule`` itself when max_norm is None."""
    return rule if max_norm is None else NormBound(rule, max_norm)
