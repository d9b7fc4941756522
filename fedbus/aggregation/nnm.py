"""Nearest-neighbour mixing (NNM): replace each update by the mean of its n − f nearest.

Allouah, Farhadkhani, Guerraoui, Gupta, Pinot, Stephan 2023, "Fixing by Mixing: A Recipe
for Optimal Byzantine ML under Heterogeneity" (AISTATS 2023), Algorithm 1:

    for i = 1 .. n:
        N_i  = the n − f updates closest to y_i in L2 distance (y_i itself included: distance 0)
        ỹ_i  = (1 / (n − f)) · sum_{j in N_i} y_j
    x_{t+1} = Rule(ỹ_1, ..., ỹ_n)

Why: under label skew the honest updates disagree, and a robust rule cannot tell a
client whose data is unusual from an attacker, so coordinate-wise median, trimmed mean,
geometric median and Krum discard honest signal (digits at Dirichlet(0.1): clean median
~0.84 against FedAvg's 0.96). After mixing, every honest ỹ_i averages n − f updates, most
of them honest ones shared with the other honest ỹ_j, so the honest inputs nearly agree
(their spread shrinks) while an attacker far from the honest updates stays an outlier.
The paper proves that NNM in front of Krum, geometric median, coordinate-wise median or
trimmed mean reaches the optimal error order under heterogeneity.

Precondition: n > 2f (a majority of each neighbourhood can be honest); the wrapped rule
keeps its own f and precondition over the same n inputs. The mean is unweighted, as in the
paper: a client's claimed sample count would otherwise let an attacker weigh more in
every neighbourhood it joins. Each ỹ_i keeps client i's sample count for the rule that
follows. Distances are direct float64 sums of squared differences (``Cohort``); ties go to
the smaller worker id, so the neighbourhoods never depend on arrival order. Integer and
bool buffers are carried over the original updates as in FedAvg.

Memory: n mixed updates in the model's dtype on top of the buffered cohort, so twice the
cohort (O(n × model)); time O(n² × model) for the distances and the mixing product.
"""

from __future__ import annotations

import torch

from fedbus.aggregation.base import AggregationRule, StrategyConfigError, require
from fedbus.aggregation.cohort import Cohort
from fedbus.aggregation.preaggregation import Mixing, PreAggregation, normalised_row


def check_nnm(n: int, f: int) -> None:
    require(n > 2 * f,
            f"nearest-neighbour mixing averages each update with its n - f nearest, which needs n > 2f so that "
            f"most of every neighbourhood can be honest; with f={f} that is n >= {2 * f + 1}, but a round may "
            f"aggregate only n={n}")


def neighbourhoods(sq_dist, ids: list[str], f: int) -> list[list[int]]:
    """For each i, the indices of its n − f nearest (itself first; equal distances go to the smaller id)."""
    n = len(ids)
    out = []
    for i, row in enumerate(sq_dist.tolist()):
        order = sorted(range(n), key=lambda j: (j != i, row[j], ids[j]))
        out.append(order[:n - f])
    return out


class NearestNeighbourMixing(PreAggregation):
    """``rule`` applied to each update's mean with its n − f − 1 nearest neighbours."""

    label = "nnm"

    def __init__(self, rule: AggregationRule, f: int):
        super().__init__(rule)
        if isinstance(f, bool) or not isinstance(f, int) or f < 0:
            raise StrategyConfigError(f"nnm: f must be a non-negative integer, got {f!r}")
        self.f = f

    def check_cohort(self, min_updates: int) -> None:
        super().check_cohort(min_updates)
        check_nnm(min_updates, self.f)

    def describe_filter(self) -> str:
        return f"nnm(f={self.f})"

    def rewrite(self, cohort: Cohort, round_index: int) -> Mixing:
        hoods = neighbourhoods(cohort.pairwise_sq_distances(), cohort.ids, self.f)
        rows = [normalised_row(cohort.n, hood, [1.0] * len(hood)) for hood in hoods]
        return Mixing(torch.stack(rows), list(cohort.ids), [float(u.weight) for u in cohort.updates],
                      [[cohort.ids[j] for j in hood] for hood in hoods])


def wrap_nnm(rule: AggregationRule, f: int | None) -> AggregationRule:
    """``rule`` behind nearest-neighbour mixing; ``rule`` itself when f is None."""
    return rule if f is None else NearestNeighbourMixing(rule, f)


__all__ = ["NearestNeighbourMixing", "check_nnm", "neighbourhoods", "wrap_nnm"]
