"""Partial aggregates: merging partials of one base equals folding every contribution once.

A regional aggregator folds its contributions, exports ``partial()``, ships it as a tensor
dict (through the real codec) plus a JSON dict, and the central accumulator merges it.
For the mergeable rules the merged result must equal one accumulator that saw every
contribution (up to float64 reassociation: sums are added in a different order), integer
buffers exactly, and SCAFFOLD's committed c likewise.
"""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedbus.aggregation.base import Contribution, InvalidUpdate, StrategyConfigError
from fedbus.aggregation.fedavg import FedAvg
from fedbus.aggregation.fednova import FedNova
from fedbus.aggregation.fedprox import FedProx
from fedbus.aggregation.krum import Krum
from fedbus.aggregation.median import CoordinateMedian
from fedbus.aggregation.norm_bound import NormBound
from fedbus.aggregation.partial import PartialAggregate
from fedbus.aggregation.scaffold import Scaffold
from fedbus.aggregation.specs import build_rule
from fedbus.protocol.codec import decode_tensors, encode_tensors

HYP = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

MERGEABLE = {
    "fedavg": FedAvg,
    "fedprox": lambda: FedProx(mu=0.1),
    "fednova": FedNova,
    "scaffold": lambda: Scaffold(eta_g=0.7),
    "norm_bound+fedavg": lambda: NormBound(FedAvg(), 3.0),
}

values = st.floats(-10, 10, allow_nan=False, width=32)
# Float weights, as an async (FedBuff) coordinator produces them after staleness discounting.
weights = st.floats(1e-3, 1e4, allow_nan=False, allow_infinity=False)


def ship(p: PartialAggregate) -> PartialAggregate:
    """Through the wire: tensors by the real codec, scalars by JSON."""
    tensors, meta = p.to_message()
    return PartialAggregate.from_message(decode_tensors(encode_tensors(tensors)), json.loads(json.dumps(meta)))


@st.composite
def rounds(draw):
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 2)))
    size = shape[0] * shape[1]

    def tensor():
        return torch.tensor(draw(st.lists(values, min_size=size, max_size=size)), dtype=torch.float32).reshape(shape)

    base = {"w": tensor(), "b": tensor()[0].clone(), "nbt": torch.tensor(draw(st.integers(0, 100))),
            "flag": torch.tensor([True, False])}
    n = draw(st.integers(1, 8))
    contributions = []
    for i in range(n):
        local = {"w": tensor(), "b": tensor()[0].clone(), "nbt": base["nbt"] + draw(st.integers(0, 50)),
                 "flag": torch.tensor([False, False])}
        extras = {"fednova_a": draw(st.floats(0.5, 20)), "scaffold_delta_c": {"w": tensor(), "b": tensor()[0].clone()}}
        contributions.append(Contribution.from_local_state(f"c{i}", 4, draw(weights), local, base, extras))
    # Split into 1..3 regions (some may be empty) by a drawn assignment.
    regions = draw(st.lists(st.integers(0, 2), min_size=n, max_size=n))
    return base, contributions, regions


def fold_all(rule, base, contributions):
    acc = rule.begin(base, 4)
    for c in contributions:
        acc.fold(c)
    return acc


def assert_same_model(a, b):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(a[k], b[k]), k  # integer carries sum integers exactly in float64


@pytest.mark.parametrize("name", MERGEABLE)
@HYP
@given(data=rounds())
def test_merging_partials_equals_folding_everything(name, data):
    base, contributions, regions = data
    make = MERGEABLE[name]
    single_rule = make()
    single = fold_all(single_rule, base, contributions)

    # Region 0 folds straight into the central accumulator; regions 1 and 2 ship partials.
    central_rule = make()
    central = central_rule.begin(base, 4)
    for c, g in zip(contributions, regions):
        if g == 0:
            central.fold(c)
    for r in (1, 2):
        mine = [c for c, g in zip(contributions, regions) if g == r]
        regional = fold_all(make(), base, mine)
        central.merge(ship(regional.partial()))

    assert central.count == single.count == len(contributions)
    assert central.total_weight == pytest.approx(single.total_weight, rel=1e-12)
    assert sorted(c.worker_id for c in central.partial().contributors) == sorted(c.worker_id for c in contributions)
    assert_same_model(single.finalize(), central.finalize())
    p1, p2 = single.partial(), central.partial()
    assert p1.rule == p2.rule and p1.scalars.keys() == p2.scalars.keys()
    for k in p1.scalars:
        assert p1.scalars[k] == pytest.approx(p2.scalars[k], rel=1e-9, abs=1e-12)
    if name == "scaffold":
        single_rule.commit(single, num_workers_total=20)
        central_rule.commit(central, num_workers_total=20)
        for k, v in single_rule.control.items():
            torch.testing.assert_close(central_rule.control[k], v, rtol=1e-9, atol=1e-12)


def test_hand_computed_merge_of_two_regions():
    # base x = 1. Region A: (w=1, Δ=+2), (w=3, Δ=-2).  Region B: (w=4, Δ=+1), nbt +2 / +6 / +1.
    # A: S = 1*2 + 3*(-2) = -4, W = 4;  B: S = 4, W = 4;  merged S = 0, W = 8 -> x' = 1 + 0/8 = 1
    # nbt: (1*2 + 3*6 + 4*1) / 8 = 24/8 = 3 -> 10 + 3 = 13
    base = {"x": torch.tensor([1.0]), "nbt": torch.tensor(10)}

    def c(wid, w, d, inc):
        return Contribution(wid, 0, w, {"x": torch.tensor([d], dtype=torch.float64), "nbt": torch.tensor(inc)})

    a = FedAvg().begin(base)
    a.fold(c("a1", 1.0, 2.0, 2))
    a.fold(c("a2", 3.0, -2.0, 6))
    b = FedAvg().begin(base)
    b.fold(c("b1", 4.0, 1.0, 1))
    pa = ship(a.partial())
    assert pa.sums["x"].tolist() == [-4.0] and pa.total_weight == 4.0 and pa.count == 2
    assert pa.carry["nbt"].item() == 20.0  # 1*2 + 3*6
    central = FedAvg().begin(base)
    central.merge(pa)
    central.merge(ship(b.partial()))
    out = central.finalize()
    assert out["x"].tolist() == [1.0] and out["nbt"].item() == 13
    assert [(k.worker_id, k.weight) for k in central.contributors] == [("a1", 1.0), ("a2", 3.0), ("b1", 4.0)]


def test_partial_is_a_snapshot():
    base = {"x": torch.zeros(1)}
    acc = FedAvg().begin(base)
    acc.fold(Contribution("a", 0, 1.0, {"x": torch.ones(1)}))
    p = acc.partial()
    acc.fold(Contribution("b", 0, 1.0, {"x": torch.ones(1)}))
    assert p.count == 1 and p.sums["x"].item() == 1.0


def test_norm_bounded_partial_counts_clips_and_refuses_other_bounds():
    base = {"x": torch.zeros(2)}
    rule = NormBound(FedAvg(), 1.0)
    acc = rule.begin(base)
    acc.fold(Contribution("a", 0, 1.0, {"x": torch.tensor([3.0, 4.0])}))  # norm 5 -> clipped to (0.6, 0.8)
    p = ship(acc.partial())
    assert p.scalars["clipped"] == 1.0 and p.sums["x"].tolist() == pytest.approx([0.6, 0.8])
    central = rule.begin(base)
    central.merge(p)
    assert central.clipped == 1
    with pytest.raises(InvalidUpdate, match="rule"):
        NormBound(FedAvg(), 2.0).begin(base).merge(p)  # a different bound
    with pytest.raises(InvalidUpdate, match="rule"):
        FedAvg().begin(base).merge(p)  # unclipped fedavg


@pytest.mark.parametrize("rule", [CoordinateMedian(), Krum(f=1), build_rule({"name": "median", "bucketing": {"s": 2}}),
                                  build_rule({"name": "median", "nnm": {"f": 1}, "norm_bound": {"max_norm": 1.0}})])
def test_buffered_rules_are_not_mergeable(rule):
    assert rule.mergeable is False and rule.needs_plaintext is True
    acc = rule.begin({"x": torch.zeros(1)})
    with pytest.raises(StrategyConfigError, match="not mergeable"):
        acc.partial()
    with pytest.raises(StrategyConfigError, match="not mergeable"):
        acc.merge(FedAvg().begin({"x": torch.zeros(1)}).partial())


@pytest.mark.parametrize("name", MERGEABLE)
def test_mergeable_rules_declare_it(name):
    rule = MERGEABLE[name]()
    assert rule.mergeable is True and rule.needs_plaintext is False and rule.streaming is True


def _one(base_version=0):
    acc = FedAvg().begin({"x": torch.zeros(2), "nbt": torch.tensor(0)}, base_version)
    acc.fold(Contribution("a", base_version, 2.0, {"x": torch.ones(2), "nbt": torch.tensor(1)}))
    return acc


@pytest.mark.parametrize("tamper, match", [
    (lambda p: p.__setattr__("base_version", 1), "base version"),
    (lambda p: p.__setattr__("rule", "fednova"), "rule"),
    (lambda p: p.sums.__setitem__("x", torch.ones(3, dtype=torch.float64)), "sums"),
    (lambda p: p.sums.__setitem__("x", torch.ones(2, dtype=torch.float32)), "sums"),
    (lambda p: p.sums.__setitem__("x", torch.tensor([1.0, float("nan")], dtype=torch.float64)), "non-finite"),
    (lambda p: p.sums.pop("x"), "keys"),
    (lambda p: p.carry.pop("nbt"), "carry"),
    (lambda p: p.__setattr__("total_weight", 5.0), "total_weight"),
    (lambda p: p.__setattr__("count", 2), "count"),
    (lambda p: p.scalars.__setitem__("weighted_a", 1.0), "scalars"),
])
def test_bad_partials_are_refused_without_changing_the_accumulator(tamper, match):
    p = _one().partial()
    tamper(p)
    central = _one()
    before = central.partial()
    with pytest.raises(InvalidUpdate, match=match):
        central.merge(p)
    after = central.partial()
    assert after.count == before.count and after.total_weight == before.total_weight
    assert torch.equal(after.sums["x"], before.sums["x"]) and torch.equal(after.carry["nbt"], before.carry["nbt"])


@pytest.mark.parametrize("meta_patch", [
    {"format": 99}, {"rule": 3}, {"base_version": -1}, {"base_version": True}, {"total_weight": float("inf")},
    {"contributors": [["a", 0.0, 0]]}, {"contributors": "a"}, {"count": 5}, {"scalars": {"k": float("nan")}},
    {"groups": ["a/b"]},
])
def test_malformed_messages_are_refused(meta_patch):
    tensors, meta = _one().partial().to_message()
    with pytest.raises(InvalidUpdate):
        PartialAggregate.from_message(tensors, {**meta, **meta_patch})


def test_unknown_tensor_names_are_refused():
    tensors, meta = _one().partial().to_message()
    with pytest.raises(InvalidUpdate, match="unexpected tensor"):
        PartialAggregate.from_message({**tensors, "model/x": torch.zeros(2)}, meta)
    with pytest.raises(InvalidUpdate, match="undeclared group"):
        PartialAggregate.from_message({**tensors, "groups/g/x": torch.zeros(2)}, meta)


def test_scaffold_partial_carries_delta_c_sums():
    base = {"w": torch.tensor([1.0, 2.0])}
    acc = Scaffold().begin(base)
    acc.fold(Contribution("a", 0, 5.0, {"w": torch.tensor([2.0, 0.0])},
                          {"scaffold_delta_c": {"w": torch.tensor([0.5, -1.0])}}))
    acc.fold(Contribution("b", 0, 1.0, {"w": torch.tensor([0.0, -4.0])},
                          {"scaffold_delta_c": {"w": torch.tensor([1.5, 1.0])}}))
    p = ship(acc.partial())
    # uniform sums (weights ignored): Δy sum = [2, -4], Δc sum = [2, 0]
    assert p.sums["w"].tolist() == [2.0, -4.0] and p.groups["scaffold_delta_c"]["w"].tolist() == [2.0, 0.0]


def test_contribution_from_a_newer_version_is_refused():
    acc = FedAvg().begin({"x": torch.zeros(1)}, base_version=3)
    acc.fold(Contribution("stale", 1, 1.0, {"x": torch.ones(1)}))  # older: allowed (async)
    with pytest.raises(InvalidUpdate, match="newer"):
        acc.fold(Contribution("future", 4, 1.0, {"x": torch.ones(1)}))
    assert acc.count == 1
