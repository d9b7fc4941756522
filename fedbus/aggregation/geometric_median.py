"""Geometric median by the smoothed Weiszfeld algorithm (RFA).

Pillutla, Kakade, Harchaoui 2022, "Robust Aggregation for Federated Learning" (IEEE
Transactions on Signal Processing 70): RFA's robust aggregation oracle, the smoothed
Weiszfeld algorithm:

    minimise  g(z) = sum_i alpha_i ||z − w_i||,      alpha_i = n_i / n

    z^(0)   = sum_i alpha_i w_i
    beta_i  = alpha_i / max(nu, ||z^(r) − w_i||)
    z^(r+1) = sum_i beta_i w_i / sum_i beta_i

The smoothing nu (``eps``) keeps the weights finite when z lands on an update. The paper
runs a fixed number of iterations; here iterations stop after ``max_iter`` or once a step
is small next to the spread of the bulk of the updates:

    ||z^(r+1) − z^(r)|| <= tol · wmed_i ||z^(r+1) − w_i||      (alpha-weighted median)

Not the relative change of the objective g, as RFA's reference code does: g is dominated by
the outliers the rule exists to ignore (one update at 1e6 makes g ~ 1e6/n), so a relative
tolerance on g stops the iteration while z is still O(tol · 1e6 / n) away from the median
of the honest updates. The weighted median distance measures the honest spread instead.
The geometric median is translation equivariant, so the iteration runs on the deltas
w_i = y_i − x_t (float64).

Breakdown point 1/2 *of the weight*: alpha uses the clients' claimed sample counts, as in
the paper; with ``weighted=False`` every update counts once (use it when num_samples is
not trusted). The optional ``f`` is checked as n >= 2f + 1.

Buffered: O(n × model) memory; O(max_iter × n × model) time.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from fedbus.aggregation.base import AggregationRule, State, require
from fedbus.aggregation.cohort import BufferedAggregator, Cohort, Flat


def weighted_median(values: torch.Tensor, weights: torch.Tensor) -> float:
    """The smallest value v with at least half of the total weight on values <= v."""
    order = torch.argsort(values)
    cum = torch.cumsum(weights[order], dim=0)
    return float(values[order][int(torch.searchsorted(cum, cum[-1] / 2))])


def _distance(a: Flat, b: Flat) -> float:
    return float(sum(float(((a[k] - b[k]) ** 2).sum()) for k in a)) ** 0.5


def weiszfeld(cohort: Cohort, alpha: torch.Tensor, eps: float, max_iter: int, tol: float) -> tuple[Flat, int]:
    """The smoothed Weiszfeld iterate and the number of iterations run."""
    alpha = alpha / alpha.sum()
    z = cohort.combine(alpha)
    dist = cohort.distances_to(z)
    for it in range(1, max_iter + 1):
        beta = alpha / dist.clamp_min(eps)
        z_next = cohort.combine(beta / beta.sum())
        dist = cohort.distances_to(z_next)
        step = _distance(z_next, z)
        z = z_next
        if step <= tol * weighted_median(dist, alpha):
            return z, it
    return z, max_iter


class GeometricMedian(AggregationRule):
    name: ClassVar[str] = "geometric_median"
    streaming: ClassVar[bool] = False
    mergeable: ClassVar[bool] = False      # compares contributions with each other
    needs_plaintext: ClassVar[bool] = True

    def __init__(self, eps: float = 1e-6, max_iter: int = 100, tol: float = 1e-5, weighted: bool = True, f: int = 0):
        if not (eps > 0 and max_iter >= 1 and tol >= 0 and f >= 0):
            raise ValueError(f"geometric_median: need eps > 0, max_iter >= 1, tol >= 0, f >= 0; "
                             f"got eps={eps}, max_iter={max_iter}, tol={tol}, f={f}")
        self.eps, self.max_iter, self.tol = float(eps), int(max_iter), float(tol)
        self.weighted, self.f = bool(weighted), int(f)
        self.last_iterations = 0

    def check_cohort(self, min_updates: int) -> None:
        super().check_cohort(min_updates)
        require(min_updates >= 2 * self.f + 1,
                f"geometric_median tolerates f Byzantine updates only with an honest majority, n >= 2f + 1; "
                f"with f={self.f} that is n >= {2 * self.f + 1}, but a round may aggregate only n={min_updates}")

    def begin(self, global_state: State, base_version: int = 0) -> BufferedAggregator:
        return BufferedAggregator(global_state, self._aggregate, self.check_cohort, base_version, self.describe())

    def _aggregate(self, cohort: Cohort) -> State:
        alpha = cohort.weights if self.weighted else torch.ones(cohort.n, dtype=torch.float64)
        z, self.last_iterations = weiszfeld(cohort, alpha, self.eps, self.max_iter, self.tol)
        return cohort.to_state(z)
