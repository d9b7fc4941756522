"""Krum and Multi-Krum: keep the updates whose neighbourhoods are tightest.

Blanchard, El Mhamdi, Guerraoui, Stainer 2017, "Machine Learning with Adversaries:
Byzantine Tolerant Gradient Descent" (NeurIPS 2017), Sec. 4.

With n updates of which at most f are Byzantine, each update V_i gets the score

    s(i) = sum_{j in N_i} ||V_i − V_j||²,    N_i = the n − f − 2 updates closest to V_i (j ≠ i)

Krum returns the update with the lowest score; Multi-Krum returns the plain (unweighted)
mean of the m lowest-scoring updates. Precondition: n > 2f + 2 (so the n − f − 2
neighbours of an honest update can be honest ones), and for Multi-Krum 1 <= m <= n − f.

Distances use the deltas V_i = y_i − x_t (the same as distances between the y_i) summed as
squared coordinate differences in float64 — see ``Cohort.pairwise_sq_distances`` for why
not ||a||² + ||b||² − 2<a, b>. Ties in the score are broken by worker id, so the result
does not depend on the order updates arrived in.

Buffered: O(n × model) memory for the updates, O(n²) for the distances, O(n² × model) time.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from fedbus.aggregation.base import AggregationRule, State, require
from fedbus.aggregation.cohort import BufferedAggregator, Cohort


def krum_scores(sq_dist: torch.Tensor, f: int, min_neighbours: int = 0) -> torch.Tensor:
    """s(i) = sum of the n − f − 2 smallest ||V_i − V_j||² over j ≠ i.

    ``min_neighbours`` lets Bulyan's last selections (where n − f − 2 drops below 1) still
    compare candidates by their nearest neighbour.
    """
    n = sq_dist.shape[0]
    k = max(n - f - 2, min_neighbours)
    k = min(k, n - 1)
    if k <= 0:
        return torch.zeros(n, dtype=torch.float64)
    # The diagonal (distance to itself, 0) is not a neighbour: push it to the end.
    off = sq_dist + torch.diag(torch.full((n,), float("inf"), dtype=torch.float64))
    return torch.sort(off, dim=1).values[:, :k].sum(dim=1)


def lowest(scores: torch.Tensor, ids: list[str], m: int) -> list[int]:
    """Indices of the m lowest scores; equal scores go to the smaller worker id."""
    order = sorted(range(len(ids)), key=lambda i: (scores[i].item(), ids[i]))
    return order[:m]


def check_krum(name: str, n: int, f: int) -> None:
    require(f >= 0, f"{name}: f must be >= 0, got f={f}")
    require(n > 2 * f + 2,
            f"{name} needs n > 2f + 2 updates so that each honest update's n - f - 2 nearest neighbours "
            f"can all be honest; with f={f} that is n >= {2 * f + 3}, but a round may aggregate only n={n}")


class MultiKrum(AggregationRule):
    """Mean of the m updates with the lowest Krum scores (m = 1: Krum)."""

    name: ClassVar[str] = "multi_krum"
    streaming: ClassVar[bool] = False
    mergeable: ClassVar[bool] = False      # compares contributions with each other
    needs_plaintext: ClassVar[bool] = True

    def __init__(self, f: int, m: int = 1):
        self.f = int(f)
        self.m = int(m)
        if self.f < 0 or self.m < 1:
            raise ValueError(f"{self.name}: need f >= 0 and m >= 1, got f={f}, m={m}")

    def check_cohort(self, min_updates: int) -> None:
        super().check_cohort(min_updates)
        check_krum(self.name, min_updates, self.f)
        require(self.m <= min_updates - self.f,
                f"{self.name} averages m updates that must all be able to come from honest clients: "
                f"m <= n - f, but m={self.m} > {min_updates} - {self.f} = {min_updates - self.f} "
                f"(n={min_updates} is the smallest round the job may aggregate)")

    def begin(self, global_state: State, base_version: int = 0) -> BufferedAggregator:
        return BufferedAggregator(global_state, self._aggregate, self.check_cohort, base_version, self.describe())

    def select(self, cohort: Cohort) -> list[int]:
        scores = krum_scores(cohort.pairwise_sq_distances(), self.f)
        return lowest(scores, cohort.ids, self.m)

    def _aggregate(self, cohort: Cohort) -> State:
        chosen = self.select(cohort)
        coeffs = torch.zeros(cohort.n, dtype=torch.float64)
        coeffs[chosen] = 1.0 / len(chosen)
        return cohort.to_state(cohort.combine(coeffs))


class Krum(MultiKrum):
    """The single update with the lowest Krum score."""

    name: ClassVar[str] = "krum"

    def __init__(self, f: int):
        super().__init__(f, m=1)
