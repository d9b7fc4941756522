"""Bucketing: average random groups of s updates before a robust rule sees them.

Karimireddy, He, Jaggi 2022, "Byzantine-Robust Learning on Heterogeneous Datasets via
Bucketing" (ICLR 2022), Algorithm 1:

    π      = a random permutation of the round's n updates
    bucket j = { y_π(k) : k in [(j−1)s, js) }          j = 1 .. ceil(n / s)  (the last may be smaller)
    ȳ_j    = sum_{i in bucket j} n_i y_i / sum_{i in bucket j} n_i     (float tensors)
    x_{t+1} = Rule(ȳ_1, ..., ȳ_ceil(n/s))                each ȳ_j weighted by its bucket's samples

Averaging s random updates shrinks the spread between honest inputs (by about 1/sqrt(s)
for independent heterogeneity) while f attackers can contaminate at most f buckets, so
a robust rule that tolerated f bad inputs among n still tolerates them among ceil(n/s).
The wrapped rule keeps its own parameters: its ``f`` (or ``beta``) counts contaminated
*inputs*, i.e. buckets, and its precondition must hold for ceil(min_updates / s) inputs.

Only meaningful in front of a robust (buffered) rule: a streaming mean of bucket means is
the plain mean, and bucketing needs the whole cohort, so ``Bucketing`` refuses streaming
rules.

Determinism: the permutation comes from ``seed`` and a round counter that advances on
every ``begin()``; the updates are sorted by worker_id first, so the result never depends
on the order the updates arrived in. (The counter restarts with the process: a resumed
coordinator draws its permutations afresh.) Integer and bool buffers are carried over
all n original updates exactly as FedAvg does, not over bucket means.

Memory: on top of the buffered updates, ceil(n/s) bucket means in float64 (complex128),
which the inner rule reads as its cohort.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
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

# (n, round) -> a permutation of range(n); the default draws it from (seed, round).
Permuter = Callable[[int, int], Sequence[int]]


def bucket_count(n: int, s: int) -> int:
    return -(-n // s)


def seeded_permutation(seed: int, round_index: int, n: int) -> list[int]:
    """A permutation of range(n) fixed by (seed, round_index), the same on every platform."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, round_index]))
    return [int(i) for i in rng.permutation(n)]


def bucket_mean(global_state: State, updates: list[ClientUpdate], worker_id: str) -> ClientUpdate:
    """One update standing for ``updates``: float tensors their sample-weighted mean (float64 /
    complex128), integer buffers their FedAvg carry, num_samples their total."""
    total = sum(int(u.num_samples) for u in updates)
    carry = IntegerBufferCarry(global_state)
    for u in updates:
        carry.add(u)
    state = carry.result()
    for name, base in global_state.items():
        if not is_averageable(base):
            continue
        dtype = torch.complex128 if base.is_complex() else torch.float64
        acc = torch.zeros(base.shape, dtype=dtype)
        for u in updates:
            acc.add_(u.state[name].detach().to(dtype), alpha=float(u.num_samples))
        state[name] = acc / float(total)
    return ClientUpdate(worker_id, total, {k: state[k] for k in global_state})


class _BucketingAggregator(UpdateBuffer):
    """Buffers the round's updates; ``result()`` buckets them and runs the inner rule on the means."""

    def __init__(self, inner: RoundAggregator, global_state: State, s: int, round_index: int,
                 permuter: Permuter, check: Callable[[int], None]):
        super().__init__(global_state)
        self.inner = inner
        self._s = s
        self.round_index = round_index
        self._permuter = permuter
        self._check = check
        self.buckets: list[list[str]] = []  # worker ids per bucket, after result()

    def result(self) -> State:
        require(self.count > 0, "no updates to aggregate")
        self._check(self.count)
        ordered = sorted(self._updates, key=lambda u: u.worker_id)  # stable: arrival order never matters
        n = len(ordered)
        perm = [int(i) for i in self._permuter(n, self.round_index)]
        if sorted(perm) != list(range(n)):
            raise ValueError(f"bucketing: permutation {perm} is not a permutation of range({n})")
        shuffled = [ordered[i] for i in perm]
        groups = [shuffled[j:j + self._s] for j in range(0, n, self._s)]
        self.buckets = [[u.worker_id for u in g] for g in groups]
        for j, group in enumerate(groups):
            self.inner.add(bucket_mean(self._global, group, f"bucket{j}"))
        out = self.inner.result()
        # Integer/bool buffers advance as FedAvg over all n updates, not over rounded bucket means.
        carry = IntegerBufferCarry(self._global)
        for u in self._updates:
            carry.add(u)
        out.update(carry.result())
        return {k: out[k] for k in self._global}


class Bucketing(AggregationRule):
    """``rule`` applied to the sample-weighted means of random buckets of ``s`` updates."""

    def __init__(self, rule: AggregationRule, s: int, seed: int = 0, permuter: Permuter | None = None):
        if rule.streaming:
            raise StrategyConfigError(
                f"bucketing needs the whole cohort before it can group it, and {rule.name} is a streaming rule "
                f"(the mean of bucket means is the plain mean anyway); use it with a robust rule such as "
                f"median, trimmed_mean, geometric_median, krum, multi_krum or bulyan")
        if isinstance(s, bool) or not isinstance(s, int) or s < 2:
            raise StrategyConfigError(f"bucketing: s must be an integer >= 2, got {s!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise StrategyConfigError(f"bucketing: seed must be a non-negative integer, got {seed!r}")
        self.rule = rule
        self.s = s
        self.seed = seed
        self._permuter: Permuter = permuter or (lambda n, r: seeded_permutation(self.seed, r, n))
        self.rounds_begun = 0
        # Instance attributes shadow the ClassVars: the wrapper is whatever its rule is.
        self.name = rule.name  # type: ignore[misc]
        self.streaming = rule.streaming  # type: ignore[misc]
        self.update_groups = rule.update_groups  # type: ignore[misc]

    def check_cohort(self, min_updates: int) -> None:
        require(min_updates >= 1, f"{self.name}: a round needs at least one update (min_updates={min_updates})")
        k = bucket_count(min_updates, self.s)
        try:
            self.rule.check_cohort(k)
        except StrategyConfigError as exc:
            raise StrategyConfigError(
                f"{exc}; with bucketing s={self.s} a round of {min_updates} updates leaves only "
                f"ceil({min_updates}/{self.s})={k} buckets as the rule's inputs") from None

    def broadcast(self) -> State:
        return self.rule.broadcast()

    def begin(self, global_state: State) -> _BucketingAggregator:
        round_index = self.rounds_begun
        self.rounds_begun += 1
        return _BucketingAggregator(self.rule.begin(global_state), global_state, self.s, round_index,
                                    self._permuter, self.check_cohort)

    def commit(self, aggregator: RoundAggregator, num_workers_total: int) -> None:
        inner = aggregator.inner if isinstance(aggregator, _BucketingAggregator) else aggregator
        self.rule.commit(inner, num_workers_total)

    def describe(self) -> str:
        return f"{self.rule.describe()}+bucketing(s={self.s})"


def wrap_bucketing(rule: AggregationRule, s: int | None, seed: int = 0) -> AggregationRule:
    """``rule`` behind bucketing; ``rule`` itself when s is None."""
    return rule if s is None else Bucketing(rule, s, seed)


__all__ = ["Bucketing", "bucket_count", "bucket_mean", "seeded_permutation", "wrap_bucketing"]
