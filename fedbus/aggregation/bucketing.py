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
on the order the updates arrived in. The counter is part of the rule's ``state_dict``, so
a coordinator resumed from it draws the same permutations. Integer and bool buffers are carried over
all n original updates exactly as FedAvg does, not over bucket means.

Memory: on top of the buffered updates, ceil(n/s) bucket means in the model's dtype
(computed in float64), which the inner rule reads as its cohort.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

import torch

from fedbus.aggregation.base import AggregationRule, StrategyConfigError
from fedbus.aggregation.cohort import Cohort
from fedbus.aggregation.preaggregation import Mixing, PreAggregation, normalised_row

# (n, round) -> a permutation of range(n); the default draws it from (seed, round).
Permuter = Callable[[int, int], Sequence[int]]


def bucket_count(n: int, s: int) -> int:
    return -(-n // s)


def seeded_permutation(seed: int, round_index: int, n: int) -> list[int]:
    """A permutation of range(n) fixed by (seed, round_index), the same on every platform."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, round_index]))
    return [int(i) for i in rng.permutation(n)]


class Bucketing(PreAggregation):
    """``rule`` applied to the sample-weighted means of random buckets of ``s`` updates."""

    label = "bucketing"

    def __init__(self, rule: AggregationRule, s: int, seed: int = 0, permuter: Permuter | None = None):
        super().__init__(rule)
        if isinstance(s, bool) or not isinstance(s, int) or s < 2:
            raise StrategyConfigError(f"bucketing: s must be an integer >= 2, got {s!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise StrategyConfigError(f"bucketing: seed must be a non-negative integer, got {seed!r}")
        self.s = s
        self.seed = seed
        self._permuter: Permuter = permuter or (lambda n, r: seeded_permutation(self.seed, r, n))

    def inputs_for(self, n: int) -> int:
        return bucket_count(n, self.s)

    def describe_filter(self) -> str:
        return f"bucketing(s={self.s})"

    def explain_inputs(self, n: int) -> str:
        return (f"with bucketing s={self.s} a round of {n} updates leaves only "
                f"ceil({n}/{self.s})={bucket_count(n, self.s)} buckets as the rule's inputs")

    def rewrite(self, cohort: Cohort, round_index: int) -> Mixing:
        n = cohort.n
        perm = [int(i) for i in self._permuter(n, round_index)]
        if sorted(perm) != list(range(n)):
            raise ValueError(f"bucketing: permutation {perm} is not a permutation of range({n})")
        groups = [perm[j:j + self.s] for j in range(0, n, self.s)]
        samples = [[float(cohort.updates[i].weight) for i in g] for g in groups]
        # Each bucket is its updates' sample-weighted mean and counts their samples together.
        rows = [normalised_row(n, g, ws) for g, ws in zip(groups, samples)]
        return Mixing(torch.stack(rows), [f"bucket{j}" for j in range(len(groups))], [sum(ws) for ws in samples],
                      [[cohort.ids[i] for i in g] for g in groups])


def wrap_bucketing(rule: AggregationRule, s: int | None, seed: int = 0) -> AggregationRule:
    """``rule`` behind bucketing; ``rule`` itself when s is None."""
    return rule if s is None else Bucketing(rule, s, seed)


__all__ = ["Bucketing", "bucket_count", "seeded_permutation", "wrap_bucketing"]
