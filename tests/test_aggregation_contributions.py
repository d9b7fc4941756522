"""Contributions: deltas against a base version, float weights, and what the rules do with them.

Expected values are worked out by hand and typed in.
"""

from __future__ import annotations

import math

import pytest
import torch

from fedbus.aggregation.base import ClientUpdate, Contribution, InvalidUpdate
from fedbus.aggregation.fedavg import FedAvg
from fedbus.aggregation.fednova import FedNova
from fedbus.aggregation.fedprox import FedProx
from fedbus.aggregation.median import CoordinateMedian
from fedbus.aggregation.norm_bound import NormBound
from fedbus.aggregation.scaffold import Scaffold
from fedbus.aggregation.specs import build_rule
from fedbus.aggregation.staleness import staleness_discount, staleness_weight


def fold(rule, base, contributions, version=0):
    acc = rule.begin(base, version)
    for c in contributions:
        acc.fold(c)
    return acc.finalize()


# ---- building contributions ------------------------------------------------------------

def test_from_local_state_is_the_exact_delta():
    # float32 values far apart: y - x is exact in float64, so x + Δ gives y back bit for bit.
    x = torch.tensor([1e-3, 1e8, -2.5], dtype=torch.float32)
    y = torch.tensor([-1e-9, 1.0, 3.75], dtype=torch.float32)
    base = {"w": x, "nbt": torch.tensor(7), "flag": torch.tensor([True])}
    c = Contribution.from_local_state("a", 3, 2.0, {"w": y, "nbt": torch.tensor(12), "flag": torch.tensor([False])},
                                      base, {"fednova_a": 4.0}, num_steps=4)
    assert c.delta["w"].dtype == torch.float64
    assert torch.equal((x.double() + c.delta["w"]).float(), y)
    assert c.delta["nbt"].dtype == torch.int64 and c.delta["nbt"].item() == 5
    assert "flag" not in c.delta and c.base_version == 3 and c.weight == 2.0 and c.num_steps == 4
    out = fold(FedAvg(), base, [c], version=3)
    assert torch.equal(out["w"], y) and out["nbt"].item() == 12 and out["flag"].tolist() == [True]
    assert list(out) == ["w", "nbt", "flag"]


def test_delta_dtype_halves_memory_at_one_rounding():
    base = {"w": torch.zeros(2), "z": torch.zeros(1, dtype=torch.complex64)}
    c = Contribution.from_local_state("a", 0, 1.0, {"w": torch.tensor([1.5, -2.0]),
                                                    "z": torch.tensor([1 + 2j], dtype=torch.complex64)},
                                      base, delta_dtype=torch.float32)
    assert c.delta["w"].dtype == torch.float32 and c.delta["z"].dtype == torch.complex64
    out = fold(FedAvg(), base, [c])
    assert out["w"].tolist() == [1.5, -2.0] and out["z"].tolist() == [1 + 2j]


def test_equal_infinities_give_a_zero_delta():
    # An attention-mask buffer of -inf that nobody trains: -inf - -inf would be NaN.
    base = {"mask": torch.tensor([0.0, float("-inf")]), "w": torch.zeros(1)}
    c = Contribution.from_local_state("a", 0, 1.0, {"mask": base["mask"].clone(), "w": torch.ones(1)}, base)
    assert c.delta["mask"].tolist() == [0.0, 0.0]
    out = fold(FedAvg(), base, [c])
    assert out["mask"].tolist() == [0.0, float("-inf")] and out["w"].tolist() == [1.0]
    with pytest.raises(InvalidUpdate, match="non-finite"):
        Contribution.from_local_state("b", 0, 1.0, {"mask": torch.tensor([float("inf"), 0.0]), "w": torch.ones(1)},
                                      base)


@pytest.mark.parametrize("weight", [0, 0.0, -1.0, float("nan"), float("inf"), float("-inf"), True, "3", None,
                                    2.0 ** 64 * 2, 2 ** 1100])
def test_weights_must_be_finite_positive_numbers(weight):
    base = {"w": torch.zeros(1)}
    with pytest.raises(InvalidUpdate, match="weight"):
        Contribution.from_local_state("a", 0, weight, {"w": torch.ones(1)}, base)
    acc = FedAvg().begin(base)
    with pytest.raises(InvalidUpdate, match="weight"):
        acc.fold(Contribution("a", 0, weight, {"w": torch.ones(1, dtype=torch.float64)}))
    assert acc.count == 0


@pytest.mark.parametrize("local, match", [
    ({}, "lacks"),
    ({"w": torch.ones(3)}, "shape"),
    ({"w": torch.ones(2, dtype=torch.complex64)}, "complex"),
])
def test_bad_local_states_are_refused(local, match):
    with pytest.raises(InvalidUpdate, match=match):
        Contribution.from_local_state("a", 0, 1.0, local, {"w": torch.zeros(2)})


@pytest.mark.parametrize("delta, match", [
    ({}, "lacks delta"),
    ({"w": torch.ones(3)}, "shape"),
    ({"w": torch.ones(2, dtype=torch.int64)}, "delta 'w'"),
    ({"w": torch.ones(2), "nbt": torch.ones(())}, "integer increment"),
])
def test_bad_deltas_are_refused_before_anything_changes(delta, match):
    base = {"w": torch.zeros(2), "nbt": torch.tensor(0)}
    delta = {"nbt": torch.tensor(1), **delta} if "nbt" not in delta and delta else delta
    acc = FedAvg().begin(base)
    with pytest.raises(InvalidUpdate, match=match):
        acc.fold(Contribution("a", 0, 1.0, delta))
    assert acc.count == 0 and acc.total_weight == 0.0


def test_legacy_client_update_still_folds():
    # ClientUpdate keeps its integer num_samples contract.
    acc = FedAvg().begin({"w": torch.zeros(1)})
    acc.add(ClientUpdate("a", 1, {"w": torch.tensor([2.0])}))
    acc.fold(Contribution("b", 0, 3.0, {"w": torch.tensor([6.0], dtype=torch.float64)}))
    assert acc.result()["w"].tolist() == [5.0]  # (1*2 + 3*6) / 4 = 20/4
    with pytest.raises(InvalidUpdate, match="positive integer"):
        acc.add(ClientUpdate("c", 1.5, {"w": torch.tensor([2.0])}))  # type: ignore[arg-type]


# ---- float weights and staleness (FedBuff) -------------------------------------------------

def test_float_weights_hand_case():
    # x = 1; Δ = +3 (w = 0.5), Δ = -1 (w = 1.5): x' = 1 + (1.5 - 1.5) / 2 = 1
    # Δ = +4 (w = 0.25), Δ = 0 (w = 0.75): x' = 1 + 1/1 = 2
    base = {"x": torch.tensor([1.0])}

    def two(w1, d1, w2, d2):
        cs = [Contribution(wid, 0, w, {"x": torch.tensor([d], dtype=torch.float64)})
              for wid, w, d in (("a", w1, d1), ("b", w2, d2))]
        return fold(FedAvg(), base, cs)["x"].tolist()

    assert two(0.5, 3.0, 1.5, -1.0) == [1.0]
    assert two(0.25, 4.0, 0.75, 0.0) == [2.0]


def test_staleness_weights_fedbuff():
    # s(τ) = 1/sqrt(1 + τ): server at 5; fresh (v=5) -> 1; v=2 (τ=3) -> 1/2; v=-3 ... (τ=8) -> 1/3
    assert staleness_discount(5, 5) == 1.0 and staleness_discount(5, 2) == 0.5
    assert staleness_discount(7, -1) == pytest.approx(1 / 3)
    assert staleness_weight(10, 5, 2) == 5.0 and staleness_weight(10, 5, 2, exponent=1.0) == 2.5
    with pytest.raises(InvalidUpdate):
        staleness_discount(5, 6)
    # Server at version 5, x = 0: fresh Δ = 2 (n=10, weight 10), stale Δ = -4 from v=2 (n=10, weight 5):
    # x' = (10*2 + 5*(-4)) / 15 = 0
    base = {"x": torch.zeros(1)}
    fresh = Contribution("a", 5, staleness_weight(10, 5, 5), {"x": torch.tensor([2.0])})
    stale = Contribution("b", 2, staleness_weight(10, 5, 2), {"x": torch.tensor([-4.0])})
    assert fold(FedAvg(), base, [fresh, stale], version=5)["x"].tolist() == [0.0]


# ---- huge weights: the rules stay finite and the norm bound holds ------------------------------

def test_fedavg_is_finite_for_weights_up_to_2_pow_53():
    # weights 2**53, 2**53, 1 and Δ = 1, 3, 100 around x = 0:
    # (2**53 + 3*2**53 + 100) / (2**54 + 1) = (2**55 + 100) / (2**54 + 1) = 2 + 98/(2**54 + 1) ~ 2 + 5.4e-15
    base = {"x": torch.zeros(1, dtype=torch.float64), "nbt": torch.tensor(0)}
    cs = [Contribution(f"c{i}", 0, w, {"x": torch.tensor([d], dtype=torch.float64), "nbt": torch.tensor(inc)})
          for i, (w, d, inc) in enumerate([(2.0 ** 53, 1.0, 1), (2 ** 53, 3.0, 3), (1.0, 100.0, 1000)])]
    out = fold(FedAvg(), base, cs)
    assert math.isfinite(out["x"].item()) and out["x"].item() == pytest.approx(2 + 98 / (2 ** 54 + 1), rel=1e-15)
    assert out["nbt"].item() == 2  # round((2**53 + 3*2**53 + 1000) / (2**54 + 1)) = round(2.0000...) = 2
    # FedNova too: coefficients w / a stay finite.
    cs_a = [Contribution(c.worker_id, 0, c.weight, c.delta, {"fednova_a": 2.0}) for c in cs]
    assert math.isfinite(fold(FedNova(), base, cs_a)["x"].item())


def test_the_2_pow_63_claim_moves_a_norm_bounded_model_by_at_most_m():
    # M = 1. Attacker: weight 2**63 (the claim that used to replace the model), Δ = (300, 400), ||Δ|| = 500
    #   -> clipped to (0.6, 0.8).  Honest: weight 1e3, Δ = (0, -0.5), norm 0.5 (not clipped).
    # FedAvg of clipped deltas: (2**63 (0.6, 0.8) + 1e3 (0, -0.5)) / (2**63 + 1e3) ~ (0.6, 0.8):
    # by convexity its norm is <= max ||Δ_i'|| = 1 = M.
    base = {"x": torch.zeros(2, dtype=torch.float64)}
    evil = {"x": torch.tensor([300.0, 400.0], dtype=torch.float64)}
    attacker = Contribution.from_local_state("evil", 0, 2 ** 63, evil, base)
    honest = Contribution.from_local_state("ok", 0, 1e3, {"x": torch.tensor([0.0, -0.5], dtype=torch.float64)}, base)
    plain = fold(FedAvg(), base, [attacker, honest])["x"]
    assert plain.tolist() == pytest.approx([300.0, 400.0], rel=1e-12)  # without the bound the claim wins
    bounded = fold(NormBound(FedAvg(), 1.0), base, [attacker, honest])["x"]
    assert bounded.tolist() == pytest.approx([0.6, 0.8], rel=1e-12)
    assert float(bounded.norm()) <= 1.0 + 1e-12


@pytest.mark.parametrize("spec", [{"name": "fedavg"}, {"name": "fedprox", "mu": 0.1}, {"name": "median"},
                                  {"name": "trimmed_mean", "beta": 0.2}, {"name": "geometric_median"}])
def test_one_weight_of_1e15_moves_the_model_by_at_most_m(spec):
    # Every rule whose step is a convex combination of its (clipped) inputs stays inside the M-ball,
    # however the weights are claimed. Five contributions, one with weight 1e15 and a huge delta.
    torch.manual_seed(0)
    m = 0.5
    rule = build_rule({**spec, "norm_bound": {"max_norm": m}})
    base = {"w": torch.randn(4, 3), "b": torch.randn(3), "nbt": torch.tensor(0)}
    cs = [Contribution.from_local_state(f"h{i}", 0, 10.0, {"w": base["w"] + 0.1 * torch.randn(4, 3),
                                                           "b": base["b"] + 0.1 * torch.randn(3),
                                                           "nbt": torch.tensor(3)}, base) for i in range(4)]
    cs.append(Contribution.from_local_state("evil", 0, 1e15, {"w": base["w"] + 1e6, "b": base["b"] - 1e6,
                                                              "nbt": torch.tensor(3)}, base))
    out = fold(rule, base, cs)
    step = torch.cat([(out[k].double() - base[k].double()).reshape(-1) for k in ("w", "b")])
    assert float(step.norm()) <= m * (1 + 1e-6)  # float32 rounding of x + Δ


def test_a_non_finite_aggregate_fails_instead_of_committing():
    # Two float64 deltas of 1e308 with weights 2**64 overflow the float64 sum: refuse to finalize.
    base = {"x": torch.zeros(1, dtype=torch.float64)}
    acc = FedAvg().begin(base)
    for i in range(2):
        acc.fold(Contribution(f"c{i}", 0, 2.0 ** 64, {"x": torch.tensor([1e308], dtype=torch.float64)}))
    with pytest.raises(ValueError, match="not finite"):
        acc.finalize()


# ---- configure: what each worker is told ------------------------------------------------------

def test_configure_is_the_worker_half():
    assert FedAvg().configure("w1", 0) == {} and FedNova().configure("w1", 0) == {}
    assert FedProx(mu=0.25).configure("w1", 3) == {"proximal_mu": 0.25}
    assert build_rule({"name": "fedprox", "mu": 0.5, "norm_bound": {"max_norm": 1}}).configure("w", 0) == \
        {"proximal_mu": 0.5}
    sc = Scaffold()
    sc.begin({"w": torch.zeros(2, dtype=torch.float16), "nbt": torch.tensor(0)})
    told = sc.configure("w1", 0)
    assert list(told) == ["scaffold"] and told["scaffold"]["w"].dtype == torch.float16
    assert torch.equal(told["scaffold"]["w"], sc.broadcast()["w"])  # broadcast() is the legacy spelling
    assert CoordinateMedian().configure("w1", 0) == {}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_direct_contributions_with_non_finite_deltas_are_refused(bad):
    base = {"w": torch.zeros(3), "z": torch.zeros(1, dtype=torch.complex64)}
    acc = FedAvg().begin(base)
    ok = {"w": torch.zeros(3, dtype=torch.float64), "z": torch.zeros(1, dtype=torch.complex128)}
    with pytest.raises(InvalidUpdate, match="non-finite"):
        acc.fold(Contribution("a", 0, 1.0, {**ok, "w": torch.tensor([0.0, bad, 1.0], dtype=torch.float64)}))
    with pytest.raises(InvalidUpdate, match="non-finite"):
        acc.fold(Contribution("a", 0, 1.0, {**ok, "z": torch.tensor([complex(0.0, bad)], dtype=torch.complex128)}))
    # finite values whose float64 sum overflows are still finite: accepted
    acc.fold(Contribution("b", 0, 1.0, {**ok, "w": torch.tensor([1e308, 1e308, 0.0], dtype=torch.float64)}))
    assert acc.count == 1


def test_the_accumulator_converts_against_its_own_base_and_version():
    base = {"w": torch.tensor([1.0, 2.0]), "mask": torch.tensor([float("-inf")]), "nbt": torch.tensor(4)}
    for rule in (FedAvg(), CoordinateMedian(), NormBound(FedAvg(), 10.0)):
        acc = rule.begin(base, 9)
        c = acc.from_local_state("a", 2.0, {"w": torch.tensor([3.0, 2.5]), "mask": torch.tensor([float("-inf")]),
                                            "nbt": torch.tensor(6)}, num_steps=3)
        assert c.base_version == 9 and c.num_steps == 3
        assert c.delta["w"].tolist() == [2.0, 0.5] and c.delta["mask"].tolist() == [0.0] and c.delta["nbt"].item() == 2
        acc.fold(c)
        out = acc.finalize()
        assert out["w"].tolist() == [3.0, 2.5] and out["mask"].tolist() == [float("-inf")] and out["nbt"].item() == 6
        assert out["w"].dtype == torch.float32
