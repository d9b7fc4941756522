"""Bulyan (El Mhamdi et al. 2018): theta = n − 2f recursive Krum picks, then per coordinate the mean of the
beta = theta − 2f values closest to the median."""

from __future__ import annotations

import pytest
import torch

from fedbus.aggregation.base import ClientUpdate, StrategyConfigError
from fedbus.aggregation.bulyan import Bulyan

# n = 7, f = 1: theta = 5, beta = 3. Points (worker: delta):
#   a (0, 2), b (1, 0), c (3, 0.5), d (4, -1), e (9, 0.75), f (20, 0), g (1000, 0)
# Squared distances: ab 5, ac 11.25, ad 25, ae 82.5625, af 404, bc 4.25, bd 10, be 64.5625, bf 361,
#   cd 3.25, ce 36.0625, cf 289.25, de 28.0625, df 257, ef 121.5625, fg 960400 (g is far from all)
# Step 1, R = all, |R| - f - 2 = 4 nearest:
#   a 5+11.25+25+82.5625 = 123.8125   b 4.25+5+10+64.5625 = 83.8125   c 3.25+4.25+11.25+36.0625 = 54.8125
#   d 3.25+10+25+28.0625 = 66.3125    e 28.0625+36.0625+64.5625+82.5625 = 211.25   f 1028.8125   -> c
# Step 2, R = {a,b,d,e,f,g}, 3 nearest: a 5+25+82.5625 = 112.5625  b 5+10+64.5625 = 79.5625
#   d 10+25+28.0625 = 63.0625  e 28.0625+64.5625+82.5625 = 175.1875  f 739.5625                  -> d
# Step 3, R = {a,b,e,f,g}, 2 nearest: a 5+82.5625 = 87.5625  b 5+64.5625 = 69.5625  e 147.125  -> b
# Step 4, R = {a,e,f,g}, 1 nearest: a 82.5625, e 82.5625 (tie: mutual nearest), f 121.5625     -> a (id)
# Step 5, R = {e,f,g}, 3 - 1 - 2 = 0 -> 1 nearest: e 121.5625, f 121.5625 (tie)                -> e (id)
#   (Had step 4 taken e, step 5 would tie a/f at 404 and take a: the same set either way.)
# S = {a, b, c, d, e}
# coordinate 0: sorted [0, 1, 3, 4, 9], median 3, 3 closest: 3, 4, 1 -> 8/3
# coordinate 1: sorted [-1, 0, 0.5, 0.75, 2], median 0.5, 3 closest: 0.5, 0.75, 0 -> 1.25/3 = 5/12
POINTS = {"a": (0.0, 2.0), "b": (1.0, 0.0), "c": (3.0, 0.5), "d": (4.0, -1.0), "e": (9.0, 0.75),
          "f": (20.0, 0.0), "g": (1000.0, 0.0)}
X = torch.tensor([-1.0, 1.0], dtype=torch.float64)


def run(rule, g, updates):
    agg = rule.begin(g)
    for u in updates:
        agg.add(u)
    return agg.result()


def cohort(order):
    return [ClientUpdate(k, 1, {"w": X + torch.tensor(POINTS[k], dtype=torch.float64)}) for k in order]


@pytest.mark.parametrize("order", ["abcdefg", "gfedcba", "dgbface"])
def test_hand_case(order):
    out = run(Bulyan(f=1), {"w": X.clone()}, cohort(order))
    assert out["w"].tolist() == pytest.approx([-1 + 8 / 3, 1 + 5 / 12], abs=1e-12)


def test_selection_order():
    from fedbus.aggregation.cohort import Cohort
    c = Cohort({"w": X.clone()}, cohort("abcdefg"))
    assert [c.ids[i] for i in Bulyan(f=1).select(c)] == ["c", "d", "b", "a", "e"]


def test_preconditions():
    Bulyan(f=1).check_cohort(7)
    Bulyan(f=0).check_cohort(3)
    with pytest.raises(StrategyConfigError, match=r"n >= 4f \+ 3.*f=1.*n >= 7.*n=6"):
        Bulyan(f=1).check_cohort(6)
    with pytest.raises(StrategyConfigError, match=r"n >= 11"):
        Bulyan(f=2).check_cohort(10)
