"""Geometric median by smoothed Weiszfeld (RFA, Pillutla et al. 2022): argmin_z Σ α_i ||z − w_i||, α_i = n_i/n."""

from __future__ import annotations

import math

import pytest
import torch

from fedbus.aggregation.base import ClientUpdate, StrategyConfigError
from fedbus.aggregation.geometric_median import GeometricMedian

# Isosceles triangle A = (-1, 0), B = (1, 0), C = (0, 3). By symmetry the median is P = (0, y), and the
# first-order condition Σ α_i (P − w_i)/||P − w_i|| = 0 reads, along the axis (for 0 < y < 3):
#   α_A·y/√(1+y²) + α_B·y/√(1+y²) − α_C = 0.
# Equal weights:        2y/√(1+y²) = 1       -> 4y² = 1 + y²      -> y = 1/√3   (the 120° Fermat point)
# Weights 2, 2, 3:      4y/√(1+y²) = 3       -> 16y² = 9 + 9y²    -> y = 3/√7
# Weights 1, 1, 2: at C the others pull with ||(−1,−3)/√10 + (1,−3)/√10|| = 6/√10 ≈ 1.897 <= α_C = 2,
#   so C itself is the median: (0, 3).
TRIANGLE = [(-1.0, 0.0), (1.0, 0.0), (0.0, 3.0)]


def run(rule, g, updates):
    agg = rule.begin(g)
    for u in updates:
        agg.add(u)
    return agg.result()


def cohort(weights, base=(0.0, 0.0)):
    x = torch.tensor(base, dtype=torch.float64)
    return [ClientUpdate(str(i), n, {"w": x + torch.tensor(p, dtype=torch.float64)})
            for i, (p, n) in enumerate(zip(TRIANGLE, weights))]


@pytest.mark.parametrize("weights, y", [((1, 1, 1), 1 / math.sqrt(3)), ((5, 5, 5), 1 / math.sqrt(3)),
                                        ((2, 2, 3), 3 / math.sqrt(7))])
def test_triangle_fermat_point(weights, y):
    out = run(GeometricMedian(tol=1e-12, max_iter=1000), {"w": torch.zeros(2, dtype=torch.float64)}, cohort(weights))
    assert out["w"].tolist() == pytest.approx([0.0, y], abs=1e-9)


def test_heavy_vertex_is_the_median():
    out = run(GeometricMedian(tol=1e-12, max_iter=1000), {"w": torch.zeros(2, dtype=torch.float64)}, cohort((1, 1, 2)))
    assert out["w"].tolist() == pytest.approx([0.0, 3.0], abs=1e-5)


def test_unweighted_ignores_sample_counts():
    out = run(GeometricMedian(tol=1e-12, max_iter=1000, weighted=False), {"w": torch.zeros(2, dtype=torch.float64)},
              cohort((1, 1, 2)))
    assert out["w"].tolist() == pytest.approx([0.0, 1 / math.sqrt(3)], abs=1e-9)


def test_translation_by_the_base_model():
    # deltas are what the median is taken of: base (5, -5) shifts the answer by (5, -5)
    out = run(GeometricMedian(tol=1e-12, max_iter=1000), {"w": torch.tensor([5.0, -5.0], dtype=torch.float64)},
              cohort((1, 1, 1), base=(5.0, -5.0)))
    assert out["w"].tolist() == pytest.approx([5.0, -5.0 + 1 / math.sqrt(3)], abs=1e-9)


def test_default_tolerance_is_not_fooled_by_a_huge_outlier():
    # Four honest points around the origin and one at 1e6: the median is the honest cluster's (up to a bounded
    # shift). A tolerance relative to the objective (~1e6/5) would stop O(1) away from it.
    torch.manual_seed(0)
    honest = [torch.randn(5, dtype=torch.float64) for _ in range(4)]
    ups = [ClientUpdate(str(i), 1, {"w": h}) for i, h in enumerate(honest + [honest[0] * 1e6])]
    g = {"w": torch.zeros(5, dtype=torch.float64)}
    precise = run(GeometricMedian(tol=0.0, max_iter=3000), g, ups)["w"]
    default = run(GeometricMedian(), g, ups)["w"]
    assert (default - precise).norm().item() < 1e-3


def test_precondition_with_f():
    GeometricMedian(f=1).check_cohort(3)
    with pytest.raises(StrategyConfigError, match=r"n >= 3.*n=2"):
        GeometricMedian(f=1).check_cohort(2)
