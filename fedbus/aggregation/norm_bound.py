"""Norm bounding: clip every update's delta before any rule sees it.

Sun, Kairouz, Suresh, McMahan 2019, "Can You Really Backdoor Federated Learning?"
(arXiv:1911.07963), Sec. 4 (norm thresholding):

    Δ_i  = y_i − x_t                                  (all float tensors together)
    Δ_i' = Δ_i · min(1, M / ||Δ_i||_2)
    y_i' = x_t + Δ_i'

||·||_2 is the global L2 norm over every float tensor of the model (one norm per update,
not per tensor, so the update's direction is preserved). Integer/bool buffers and
``update.extra`` pass through unchanged. A pre-filter, not a rule: ``NormBound(rule, M)``
behaves as ``rule`` on clipped updates and inherits its streaming/buffered nature and
precondition.
"""

from __future__ import annotations

import math
from dataclasses import replace


from fedbus.aggregation.base import (AggregationRule, ClientUpdate, RoundAggregator, State, float_keys,
                                     from_real64, to_real64)


def update_norm(global_state: State, update: ClientUpdate) -> float:
    """||y_i − x_t||_2 over all float tensors, accumulated in float64."""
    sq = 0.0
    for name in float_keys(global_state):
        d = to_real64(update.state[name]) - to_real64(global_state[name])
        sq += float((d * d).sum())
    return math.sqrt(sq)


def clip_update(global_state: State, update: ClientUpdate, max_norm: float) -> tuple[ClientUpdate, float]:
    """(the update with its delta clipped to max_norm, its original norm)."""
    norm = update_norm(global_state, update)
    if norm <= max_norm:
        return update, norm
    scale = max_norm / norm
    state = dict(update.state)
    for name in float_keys(global_state):
        x = to_real64(global_state[name])
        state[name] = from_real64(x + (to_real64(update.state[name]) - x) * scale, global_state[name])
    return replace(update, state=state), norm


class _ClippingAggregator:
    def __init__(self, inner: RoundAggregator, global_state: State, max_norm: float):
        self.inner = inner
        self._global = {k: global_state[k].detach().clone() for k in float_keys(global_state)}
        self._max_norm = max_norm
        self.clipped = 0

    @property
    def count(self) -> int:
        return self.inner.count

    @property
    def total_weight(self) -> float:
        return getattr(self.inner, "total_weight", 0.0)

    def add(self, update: ClientUpdate) -> None:
        for name in self._global:  # a missing tensor is the inner rule's InvalidUpdate to raise
            if name not in update.state or update.state[name].shape != self._global[name].shape:
                self.inner.add(update)
                return
        clipped, norm = clip_update(self._global, update, self._max_norm)
        self.inner.add(clipped)
        self.clipped += norm > self._max_norm

    def result(self) -> State:
        return self.inner.result()


class NormBound(AggregationRule):
    """``rule`` applied to updates whose deltas were clipped to ``max_norm``."""

    def __init__(self, rule: AggregationRule, max_norm: float):
        if not (max_norm > 0 and math.isfinite(max_norm)):
            raise ValueError(f"norm_bound: max_norm must be a positive finite number, got {max_norm}")
        self.rule = rule
        self.max_norm = float(max_norm)
        # Instance attributes shadow the ClassVars: the wrapper is whatever its rule is.
        self.name = rule.name  # type: ignore[misc]
        self.streaming = rule.streaming  # type: ignore[misc]
        self.update_groups = rule.update_groups  # type: ignore[misc]

    def check_cohort(self, min_updates: int) -> None:
        self.rule.check_cohort(min_updates)

    def broadcast(self) -> State:
        return self.rule.broadcast()

    def begin(self, global_state: State) -> _ClippingAggregator:
        return _ClippingAggregator(self.rule.begin(global_state), global_state, self.max_norm)

    def commit(self, aggregator: RoundAggregator, num_workers_total: int) -> None:
        inner = aggregator.inner if isinstance(aggregator, _ClippingAggregator) else aggregator
        self.rule.commit(inner, num_workers_total)

    def describe(self) -> str:
        return f"{self.rule.describe()}+norm_bound({self.max_norm:g})"


def wrap_norm_bound(rule: AggregationRule, max_norm: float | None) -> AggregationRule:
    """``rule`` behind a NormBound pre-filter; ``rule`` itself when max_norm is None."""
    return rule if max_norm is None else NormBound(rule, max_norm)
