"""Bulyan: recursive Krum selection, then a coordinate-wise trimmed mean around the median.

El Mhamdi, Guerraoui, Rouault 2018, "The Hidden Vulnerability of Distributed Learning in
Byzantium" (ICML 2018), Sec. 4, with Krum (Blanchard et al. 2017) as the selection rule.

With n updates of which at most f are Byzantine:

1. Selection. theta = n − 2f times: apply Krum to the remaining set R (scores over the
   |R| − f − 2 nearest neighbours within R), move the winner from R to the selection S.
2. Aggregation. beta = theta − 2f. For every coordinate k, take the beta values of
   {V[k] : V in S} closest to their median and average them:

       x_{t+1}[k] = x_t[k] + (1/beta) sum_{v in B_k} v,   B_k = argmin_{|B| = beta} sum_{v in B} |v − med_k|

Precondition: n >= 4f + 3 (so beta = n − 4f >= 3 and every selection step keeps an honest
majority).

Two details the paper leaves open, fixed here so the rule is deterministic and does not
depend on arrival order:

* The last selections run Krum on |R| = 2f + 2 and 2f + 1 updates, where |R| − f − 2 is f
  and f − 1; for f <= 1 that is 0 neighbours, which scores every candidate 0. There the
  score uses at least 1 neighbour (the nearest), the closest meaningful reading of Krum.
* Equal scores (with one neighbour the two mutually nearest updates always tie) go to the
  smaller worker id; equal distances to the median go to the smaller value.

Buffered: O(n × model) memory, O(n² × model) time for the distances (computed once).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from fedbus.aggregation.base import AggregationRule, State, require
from fedbus.aggregation.cohort import BufferedAggregator, Cohort, median_of_sorted, sorted_columns
from fedbus.aggregation.krum import krum_scores, lowest


def closest_to_median_mean(m: torch.Tensor, beta: int) -> torch.Tensor:
    """Per column: the mean of the beta values closest to the column's median."""
    s = sorted_columns(m)
    dist = (s - median_of_sorted(s)).abs()
    # Stable sort on the value-sorted block: ties in distance keep the smaller value first.
    # (numpy for the same reason as in sorted_columns.)
    idx = np.argsort(dist.numpy(), axis=0, kind="stable")[:beta]
    return torch.from_numpy(np.take_along_axis(s.numpy(), idx, axis=0)).mean(dim=0)


class Bulyan(AggregationRule):
    name: ClassVar[str] = "bulyan"
    streaming: ClassVar[bool] = False
    mergeable: ClassVar[bool] = False      # compares contributions with each other
    needs_plaintext: ClassVar[bool] = True

    def __init__(self, f: int):
        self.f = int(f)
        if self.f < 0:
            raise ValueError(f"bulyan: f must be >= 0, got {f}")

    def check_cohort(self, min_updates: int) -> None:
        super().check_cohort(min_updates)
        require(min_updates >= 4 * self.f + 3,
                f"bulyan needs n >= 4f + 3 updates (it selects theta = n - 2f by Krum and averages the "
                f"beta = theta - 2f values closest to the median, beta >= 3); with f={self.f} that is "
                f"n >= {4 * self.f + 3}, but a round may aggregate only n={min_updates}")

    def begin(self, global_state: State, base_version: int = 0) -> BufferedAggregator:
        return BufferedAggregator(global_state, self._aggregate, self.check_cohort, base_version, self.describe())

    def select(self, cohort: Cohort) -> list[int]:
        """The theta updates chosen by recursive Krum, in selection order."""
        theta = cohort.n - 2 * self.f
        dist = cohort.pairwise_sq_distances()  # once; each step uses the sub-matrix of R
        remaining = list(range(cohort.n))
        selected: list[int] = []
        while len(selected) < theta:
            r = torch.tensor(remaining, dtype=torch.long)
            scores = krum_scores(dist[r][:, r], self.f, min_neighbours=1)
            pick = lowest(scores, [cohort.ids[i] for i in remaining], 1)[0]
            selected.append(remaining.pop(pick))
        return selected

    def _aggregate(self, cohort: Cohort) -> State:
        selected = self.select(cohort)
        beta = len(selected) - 2 * self.f
        return cohort.to_state(cohort.coordinatewise(lambda m: closest_to_median_mean(m, beta), rows=sorted(selected)))
