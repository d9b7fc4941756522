"""Coordinate-wise median.

Yin, Chen, Ramchandran, Bartlett 2018, "Byzantine-Robust Distributed Learning: Towards
Optimal Statistical Rates" (ICML 2018), Option I (median-based GD):

    x_{t+1}[k] = med{ y_1[k], ..., y_n[k] }    for every coordinate k

with the usual median: the middle value for odd n, the mean of the two middle values for
even n. Unweighted (the paper's rule; sample counts are unverified claims a Byzantine
client would inflate). Tolerates f < n/2 Byzantine updates per coordinate; the optional
``f`` is only checked (n >= 2f + 1) so a job states the honest majority it relies on.

Buffered: O(n × model) memory; each coordinate block is sorted in float64.
"""

from __future__ import annotations

from typing import ClassVar

from fedbus.aggregation.base import AggregationRule, State, require
from fedbus.aggregation.cohort import BufferedAggregator, Cohort, median_of_sorted, sorted_columns


class CoordinateMedian(AggregationRule):
    name: ClassVar[str] = "median"
    streaming: ClassVar[bool] = False
    mergeable: ClassVar[bool] = False      # compares contributions with each other
    needs_plaintext: ClassVar[bool] = True

    def __init__(self, f: int = 0):
        self.f = int(f)
        if self.f < 0:
            raise ValueError(f"median: f must be >= 0, got {f}")

    def check_cohort(self, min_updates: int) -> None:
        super().check_cohort(min_updates)
        require(min_updates >= 2 * self.f + 1,
                f"median tolerates f Byzantine updates only with an honest majority, n >= 2f + 1; "
                f"with f={self.f} that is n >= {2 * self.f + 1}, but a round may aggregate only n={min_updates}")

    def begin(self, global_state: State, base_version: int = 0) -> BufferedAggregator:
        return BufferedAggregator(global_state, self._aggregate, self.check_cohort, base_version, self.describe())

    def _aggregate(self, cohort: Cohort) -> State:
        return cohort.to_state(cohort.coordinatewise(lambda m: median_of_sorted(sorted_columns(m))))
