"""Staleness functions (Xie, Koyejo, Gupta 2019, section 5.2), by hand, and the discount."""

from __future__ import annotations

import pytest
import torch

from fedbus.aggregation.base import Contribution, InvalidUpdate
from fedbus.aggregation.staleness import constant, discounted, from_spec, hinge, polynomial
from fedbus.jobspec import HingeStaleness, PolynomialStaleness


def test_constant_is_one_for_any_staleness():
    s = constant()
    assert [s(t) for t in (0, 1, 7, 1000)] == [1.0, 1.0, 1.0, 1.0]


def test_polynomial_by_hand():
    # (1 + τ)^-a: a = 0.5 (FedBuff): 1, 1/sqrt(2), 1/2, 1/3 at τ = 0, 1, 3, 8
    s = polynomial(0.5)
    assert s(0) == 1.0 and s(1) == pytest.approx(2 ** -0.5) and s(3) == 0.5 and s(8) == pytest.approx(1 / 3)
    # a = 2: (1 + 4)^-2 = 1/25
    assert polynomial(2.0)(4) == pytest.approx(0.04)
    assert polynomial(0.0)(99) == 1.0


def test_hinge_by_hand():
    # a = 10, b = 4: 1 up to τ = 4, then 1 / (10 (τ - 4) + 1): τ = 5 -> 1/11, τ = 6 -> 1/21
    s = hinge(10.0, 4)
    assert [s(t) for t in (0, 3, 4)] == [1.0, 1.0, 1.0]
    assert s(5) == pytest.approx(1 / 11) and s(6) == pytest.approx(1 / 21)
    # a = 0.5, b = 0: τ = 2 -> 1 / (0.5 * 2 + 1) = 1/2
    assert hinge(0.5, 0)(2) == 0.5


@pytest.mark.parametrize("s", [constant(), polynomial(0.5), hinge(1.0, 0)])
def test_negative_staleness_is_an_invalid_update(s):
    with pytest.raises(InvalidUpdate):
        s(-1)


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError):
        polynomial(float("nan"))
    with pytest.raises(ValueError):
        hinge(-1.0, 2)


def test_the_job_spec_names_the_function():
    assert from_spec(HingeStaleness(name="hinge", a=10, b=4))(5) == pytest.approx(1 / 11)
    assert from_spec(PolynomialStaleness(name="polynomial", a=1.0))(1) == 0.5


def test_discount_scales_float_deltas_not_integer_increments_nor_the_weight():
    c = Contribution("w", 3, 10.0, {"x": torch.tensor([2.0, -4.0], dtype=torch.float64),
                                    "n": torch.tensor(6, dtype=torch.int64)})
    d = discounted(c, 0.25)
    assert torch.equal(d.delta["x"], torch.tensor([0.5, -1.0], dtype=torch.float64))
    assert torch.equal(d.delta["n"], torch.tensor(6)) and d.weight == 10.0 and d.base_version == 3
    assert discounted(c, 1.0) is c
    with pytest.raises(InvalidUpdate):
        discounted(c, float("inf"))
