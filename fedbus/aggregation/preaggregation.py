"""Pre-aggregation: rewrite a round's updates before a robust rule sees them.

Bucketing (``bucketing.py``) and nearest-neighbour mixing (``nnm.py``) both turn the n
buffered updates into new inputs for a wrapped robust rule; this module holds what they
share:

* ``mean_update``: one update standing for a weighted mean of several (float tensors in
  float64 / complex128, so no rounding happens between the mixing and the rule);
* ``PreAggregator``: buffers the round, hands the rule the rewritten inputs, and carries
  integer/bool buffers over the *original* updates exactly as FedAvg does (an average of
  counters is not a counter, and neither is an average of averages);
* ``PreAggregation``: the AggregationRule wrapper, which is whatever its rule is (name,
  buffered nature, extra tensor groups, server state) and refuses streaming rules, for
  which a mean of means is just the mean.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Sequence

import torch

from fedbus.aggregation.base import (
    AggregationRule,
    ClientUpdate,
    IntegerBufferCarry,
    RoundAggregator,
    State,
    StrategyConfigError,
    is_averageable,
    require,
)
from fedbus.aggregation.cohort import UpdateBuffer

# updates sorted by worker id -> (the inner rule's inputs, the worker ids behind each input)
Rewrite = Callable[[list[ClientUpdate]], tuple[list[ClientUpdate], list[list[str]]]]

ROBUST_RULES = "median, trimmed_mean, geometric_median, krum, multi_krum or bulyan"


def mean_update(global_state: State, updates: Sequence[ClientUpdate], weights: Sequence[float],
                worker_id: str, num_samples: int) -> ClientUpdate:
    """sum_j w_j y_j / sum_j w_j over float tensors (float64 / complex128); integer buffers
    as the FedAvg carry of ``updates``."""
    require(len(updates) == len(weights) and len(updates) > 0, "mean_update: one weight per update, at least one")
    total = float(sum(weights))
    require(total > 0, "mean_update: weights must not sum to zero")
    carry = IntegerBufferCarry(global_state)
    for u in updates:
        carry.add(u)
    state = carry.result()
    for name, base in global_state.items():
        if not is_averageable(base):
            continue
        dtype = torch.complex128 if base.is_complex() else torch.float64
        acc = torch.zeros(base.shape, dtype=dtype)
        for u, w in zip(updates, weights):
            acc.add_(u.state[name].detach().to(dtype), alpha=float(w))
        state[name] = acc / total
    return ClientUpdate(worker_id, int(num_samples), {k: state[k] for k in global_state})


class PreAggregator(UpdateBuffer):
    """Buffers the round's updates; ``result()`` feeds ``rewrite(updates sorted by worker id)``
    to the inner rule's aggregator. ``sources`` then lists, per input of the inner rule, the
    worker ids it was made from (a bucket, a neighbourhood)."""

    def __init__(self, inner: RoundAggregator, global_state: State, rewrite: Rewrite, check: Callable[[int], None]):
        super().__init__(global_state)
        self.inner = inner
        self._rewrite = rewrite
        self._check = check
        self.sources: list[list[str]] = []

    def result(self) -> State:
        require(self.count > 0, "no updates to aggregate")
        self._check(self.count)
        # Sorted by worker id so the result never depends on the order updates arrived in.
        inputs, self.sources = self._rewrite(sorted(self._updates, key=lambda u: u.worker_id))
        for update in inputs:
            self.inner.add(update)
        out = self.inner.result()
        carry = IntegerBufferCarry(self._global)
        for u in self._updates:
            carry.add(u)
        out.update(carry.result())
        return {k: out[k] for k in self._global}


class PreAggregation(AggregationRule):
    """Base for wrappers that rewrite the cohort before ``rule`` aggregates it."""

    label: str = "pre-aggregation"

    def __init__(self, rule: AggregationRule):
        if rule.streaming:
            raise StrategyConfigError(
                f"{self.label} needs the whole cohort before it can rewrite it, and {rule.name} is a streaming rule "
                f"(a mean of means is the plain mean anyway); use it with a robust rule such as {ROBUST_RULES}")
        self.rule = rule
        # Instance attributes shadow the ClassVars: the wrapper is whatever its rule is.
        self.name = rule.name  # type: ignore[misc]
        self.streaming = rule.streaming  # type: ignore[misc]
        self.update_groups = rule.update_groups  # type: ignore[misc]

    @abstractmethod
    def rewrite(self, global_state: State, ordered: list[ClientUpdate],
                round_index: int) -> tuple[list[ClientUpdate], list[list[str]]]:
        """The inner rule's inputs for one round's updates (sorted by worker id), and the worker
        ids behind each input."""

    def inputs_for(self, n: int) -> int:
        """How many inputs the inner rule sees when the round has ``n`` updates."""
        return n

    def check_cohort(self, min_updates: int) -> None:
        require(min_updates >= 1, f"{self.name}: a round needs at least one update (min_updates={min_updates})")
        k = self.inputs_for(min_updates)
        try:
            self.rule.check_cohort(k)
        except StrategyConfigError as exc:
            if k == min_updates:
                raise
            raise StrategyConfigError(f"{exc}; {self.explain_inputs(min_updates)}") from None

    def explain_inputs(self, n: int) -> str:
        """Why a round of n updates gives the rule fewer inputs (for precondition errors)."""
        return f"with {self.describe_filter()} a round of {n} updates leaves only {self.inputs_for(n)} inputs"

    def describe_filter(self) -> str:
        return self.label

    def broadcast(self) -> State:
        return self.rule.broadcast()

    def begin(self, global_state: State) -> PreAggregator:
        round_index = getattr(self, "rounds_begun", 0)
        self.rounds_begun = round_index + 1
        return PreAggregator(self.rule.begin(global_state), global_state,
                             lambda ordered: self.rewrite(global_state, ordered, round_index), self.check_cohort)

    def commit(self, aggregator: RoundAggregator, num_workers_total: int) -> None:
        inner = aggregator.inner if isinstance(aggregator, PreAggregator) else aggregator
        self.rule.commit(inner, num_workers_total)

    def describe(self) -> str:
        return f"{self.rule.describe()}+{self.describe_filter()}"


__all__ = ["PreAggregation", "PreAggregator", "ROBUST_RULES", "mean_update"]
