"""Coordinate-wise trimmed mean.

Yin, Chen, Ramchandran, Bartlett 2018, "Byzantine-Robust Distributed Learning: Towards
Optimal Statistical Rates" (ICML 2018), Option II (trimmed-mean-based GD), Definition 2:

    x_{t+1}[k] = 1 / (n − 2b) * sum_{v in U_k} v,    b = floor(beta · n)

where U_k is {y_1[k], ..., y_n[k]} without its b largest and b smallest values. Unweighted,
as in the paper. Precondition: 0 <= beta < 1/2 and 2b < n (something must remain); the
paper's guarantee needs beta >= f/n for f Byzantine updates.

beta · n is floored exactly (beta as the decimal the job spec wrote): in binary floating
point 0.29 * 100 = 28.999999999999996, which a plain floor would turn into 28.

Buffered: O(n × model) memory; each coordinate block is sorted in float64.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import ClassVar

from fedbus.aggregation.base import AggregationRule, State, require
from fedbus.aggregation.cohort import BufferedAggregator, Cohort, sorted_columns


def trim_count(beta: float, n: int) -> int:
    """b = floor(beta · n), with beta read as the decimal it was written as."""
    return math.floor(Fraction(repr(float(beta))) * n)


class TrimmedMean(AggregationRule):
    name: ClassVar[str] = "trimmed_mean"
    streaming: ClassVar[bool] = False
    mergeable: ClassVar[bool] = False      # compares contributions with each other
    needs_plaintext: ClassVar[bool] = True

    def __init__(self, beta: float):
        self.beta = float(beta)
        if not 0.0 <= self.beta < 0.5:
            raise ValueError(f"trimmed_mean: beta must be in [0, 0.5), got {beta}")

    def check_cohort(self, min_updates: int) -> None:
        super().check_cohort(min_updates)
        b = trim_count(self.beta, min_updates)
        require(2 * b < min_updates,
                f"trimmed_mean removes b = floor(beta*n) = floor({self.beta}*{min_updates}) = {b} values from each "
                f"end of every coordinate and needs 2b < n, but 2*{b} >= {min_updates}")

    def begin(self, global_state: State, base_version: int = 0) -> BufferedAggregator:
        return BufferedAggregator(global_state, self._aggregate, self.check_cohort, base_version, self.describe())

    def _aggregate(self, cohort: Cohort) -> State:
        n = cohort.n
        b = trim_count(self.beta, n)
        return cohort.to_state(cohort.coordinatewise(lambda m: sorted_columns(m)[b:n - b].mean(dim=0)))
