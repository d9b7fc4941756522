"""Krum / Multi-Krum (Blanchard et al. 2017).

score(i) = Σ of the n − f − 2 smallest ||V_i − V_j||² (j ≠ i); Krum = argmin, Multi-Krum = mean of the
m lowest. Expected values are worked out by hand and typed in.
"""

from __future__ import annotations

import pytest
import torch

from fedbus.aggregation.base import ClientUpdate, StrategyConfigError
from fedbus.aggregation.krum import Krum, MultiKrum

# n = 5, f = 1 -> each score sums the 5 - 1 - 2 = 2 nearest squared distances.
#   a = (0, 0), b = (1, 0), c = (0, 2), d = (3, 3), e = (10, -10)
# squared distances: ab 1, ac 4, ad 18, ae 200, bc 5, bd 13, be 181, cd 10, ce 244, de 218
#   a: {1, 4, 18, 200}    -> 1 + 4 = 5
#   b: {1, 5, 13, 181}    -> 1 + 5 = 6
#   c: {4, 5, 10, 244}    -> 4 + 5 = 9
#   d: {18, 13, 10, 218}  -> 10 + 13 = 23
#   e: {200, 181, 244, 218} -> 181 + 200 = 381
POINTS = {"a": (0.0, 0.0), "b": (1.0, 0.0), "c": (0.0, 2.0), "d": (3.0, 3.0), "e": (10.0, -10.0)}
X = torch.tensor([1.0, -1.0], dtype=torch.float64)  # the base model; distances do not depend on it


def run(rule, g, updates):
    agg = rule.begin(g)
    for u in updates:
        agg.add(u)
    return agg.result()


def cohort(order="abcde", weights=None):
    weights = weights or {}
    return [ClientUpdate(k, weights.get(k, 1), {"w": X + torch.tensor(POINTS[k], dtype=torch.float64)}) for k in order]


def test_krum_picks_lowest_score():
    # lowest score 5 -> a -> x + (0, 0)
    out = run(Krum(f=1), {"w": X.clone()}, cohort())
    assert out["w"].tolist() == [1.0, -1.0]


def test_multi_krum_averages_m_lowest_unweighted():
    # m = 3: a, b, c -> mean((0,0), (1,0), (0,2)) = (1/3, 2/3); sample counts play no part
    out = run(MultiKrum(f=1, m=3), {"w": X.clone()}, cohort("edcba", weights={"a": 100, "e": 7}))
    assert out["w"].tolist() == pytest.approx([1 + 1 / 3, -1 + 2 / 3], abs=1e-12)
    # m = n - f = 4: a, b, c, d -> ((0+1+0+3)/4, (0+0+2+3)/4) = (1, 1.25)
    out = run(MultiKrum(f=1, m=4), {"w": X.clone()}, cohort())
    assert out["w"].tolist() == pytest.approx([2.0, 0.25], abs=1e-12)


def test_distances_are_stable_far_from_the_origin():
    # 1-D values 1e8 + [0, 1, 3, 5, 100], f = 1 (2 nearest):
    #   a(0): {1, 9, 25, ...} -> 10;  b(1): {1, 4, 16} -> 5;  c(3): {4, 4, 9} -> 8;  d(5): {4, 16, 25} -> 20
    # Krum -> b = 1e8 + 1. ||a||^2 is ~1e16 here, where float64 has a spacing of 2: the expansion
    # ||a||^2 + ||b||^2 - 2ab cannot resolve distances of 1 and 4.
    vals = {"a": 0.0, "b": 1.0, "c": 3.0, "d": 5.0, "e": 100.0}
    ups = [ClientUpdate(k, 1, {"w": torch.tensor([1e8 + v], dtype=torch.float64)}) for k, v in vals.items()]
    out = run(Krum(f=1), {"w": torch.zeros(1, dtype=torch.float64)}, ups)
    assert out["w"].tolist() == [1e8 + 1]


def test_integer_buffers_and_dtypes():
    g = {"w": torch.zeros(2, dtype=torch.float16), "nbt": torch.tensor(0)}
    ups = [ClientUpdate(k, 1, {"w": torch.tensor(POINTS[k], dtype=torch.float16), "nbt": torch.tensor(i)})
           for i, k in enumerate("abcde")]
    out = run(Krum(f=1), g, ups)
    assert out["w"].dtype == torch.float16 and out["w"].tolist() == [0.0, 0.0]
    assert out["nbt"].item() == 2  # increments 0..4, equal weights: mean 2


def test_preconditions():
    Krum(f=1).check_cohort(5)
    with pytest.raises(StrategyConfigError, match=r"n > 2f \+ 2.*f=1.*n >= 5.*n=4"):
        Krum(f=1).check_cohort(4)
    with pytest.raises(StrategyConfigError, match=r"n >= 7"):
        Krum(f=2).check_cohort(6)
    MultiKrum(f=1, m=4).check_cohort(5)
    with pytest.raises(StrategyConfigError, match=r"m <= n - f.*m=5 > 5 - 1 = 4"):
        MultiKrum(f=1, m=5).check_cohort(5)
    # the aggregator re-checks the actual round size
    agg = Krum(f=1).begin({"w": X.clone()})
    for u in cohort("abcd"):
        agg.add(u)
    with pytest.raises(StrategyConfigError):
        agg.result()
