"""Coordinate-wise median (Yin et al. 2018): x[k] = med_i y_i[k]; even n -> mean of the two middle values."""

from __future__ import annotations

import pytest
import torch

from fedbus.aggregation.base import ClientUpdate, StrategyConfigError
from fedbus.aggregation.median import CoordinateMedian


def run(rule, g, updates):
    agg = rule.begin(g)
    for u in updates:
        agg.add(u)
    return agg.result()


def test_even_cohort_averages_the_middle_pair():
    # coordinate 0: [1, 7, 3, 100] -> sorted [1, 3, 7, 100] -> (3 + 7)/2 = 5
    # coordinate 1: [-2, 0, 5, 1]  -> sorted [-2, 0, 1, 5]  -> (0 + 1)/2 = 0.5
    vals = [[1.0, -2.0], [7.0, 0.0], [3.0, 5.0], [100.0, 1.0]]
    ups = [ClientUpdate(str(i), 1 + 10 * i, {"w": torch.tensor(v)}) for i, v in enumerate(vals)]
    assert run(CoordinateMedian(), {"w": torch.zeros(2)}, ups)["w"].tolist() == [5.0, 0.5]


def test_odd_cohort_takes_the_middle_value_relative_to_any_base():
    # base x = [10, 10]; y = x + Δ with Δ: [4, 0.5], [-1, 0.25], [2, 10] -> med Δ = [2, 0.5] -> [12, 10.5]
    x = torch.tensor([10.0, 10.0])
    deltas = [[4.0, 0.5], [-1.0, 0.25], [2.0, 10.0]]
    ups = [ClientUpdate(str(i), 1, {"w": x + torch.tensor(d)}) for i, d in enumerate(deltas)]
    assert run(CoordinateMedian(), {"w": x.clone()}, ups)["w"].tolist() == [12.0, 10.5]


def test_complex_and_integer_tensors():
    # complex: real and imaginary parts separately: re [1, 5, 2] -> 2, im [0, -4, 9] -> 0  => 2 + 0j
    # int counter: increments +1, +2, +6 with n = 1, 1, 2: (1 + 2 + 12)/4 = 3.75 -> 4
    g = {"c": torch.zeros(1, dtype=torch.complex64), "k": torch.tensor([0])}
    ups = [ClientUpdate("a", 1, {"c": torch.tensor([1 + 0j], dtype=torch.complex64), "k": torch.tensor([1])}),
           ClientUpdate("b", 1, {"c": torch.tensor([5 - 4j], dtype=torch.complex64), "k": torch.tensor([2])}),
           ClientUpdate("c", 2, {"c": torch.tensor([2 + 9j], dtype=torch.complex64), "k": torch.tensor([6])})]
    out = run(CoordinateMedian(), g, ups)
    assert out["c"].dtype == torch.complex64 and out["c"].tolist() == [2 + 0j]
    assert out["k"].tolist() == [4]


def test_precondition_with_f():
    CoordinateMedian().check_cohort(1)
    CoordinateMedian(f=2).check_cohort(5)
    with pytest.raises(StrategyConfigError, match=r"n >= 2f \+ 1.*n >= 5.*n=4"):
        CoordinateMedian(f=2).check_cohort(4)


def test_chunked_path_matches_the_whole_matrix(monkeypatch):
    # The cohort reads the delta matrix in column blocks; a tiny block size must not change the answer.
    import fedbus.aggregation.cohort as cohort_mod
    torch.manual_seed(0)
    g = {"a": torch.randn(7, 3), "b": torch.randn(5)}
    ups = [ClientUpdate(str(i), 1, {k: v + torch.randn(v.shape) for k, v in g.items()}) for i in range(6)]
    whole = run(CoordinateMedian(), g, ups)
    monkeypatch.setattr(cohort_mod, "CHUNK_BYTES", 8 * 6 * 2)  # 2 columns per block
    monkeypatch.setattr(cohort_mod, "CACHE_BYTES", 0)
    chunked = run(CoordinateMedian(), g, ups)
    assert all(torch.equal(whole[k], chunked[k]) for k in g)
