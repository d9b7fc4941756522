"""Bucketing (Karimireddy, He, Jaggi 2022, Algorithm 1): permute, average buckets of s, then the robust rule."""

from __future__ import annotations

import random

import pytest
import torch
from pydantic import ValidationError

from fedbus.aggregation.base import ClientUpdate, InvalidUpdate, StrategyConfigError
from fedbus.aggregation.bucketing import Bucketing, bucket_count, seeded_permutation, wrap_bucketing
from fedbus.aggregation.fedavg import FedAvg
from fedbus.aggregation.geometric_median import GeometricMedian
from fedbus.aggregation.krum import Krum
from fedbus.aggregation.median import CoordinateMedian
from fedbus.aggregation.norm_bound import NormBound
from fedbus.aggregation.specs import build_rule, validate_strategy
from fedbus.aggregation.trimmed_mean import TrimmedMean
from fedbus.jobspec import JobSpec


def run(rule, g, updates):
    agg = rule.begin(g)
    for u in updates:
        agg.add(u)
    return agg.result(), agg


def fixed(perm):
    return lambda n, r: perm


G = {"w": torch.tensor([0.0, 0.0]), "nbt": torch.tensor(3)}


def four():
    # (id, samples, w, nbt)
    rows = [("a", 1, [1.0, 0.0], 7), ("b", 3, [2.0, 1.0], 3), ("c", 3, [4.0, 2.0], 3), ("d", 1, [10.0, -4.0], 7)]
    return [ClientUpdate(i, n, {"w": torch.tensor(w), "nbt": torch.tensor(c)}) for i, n, w, c in rows]


def test_hand_computed_median_of_bucket_means():
    # sorted by id: [a, b, c, d]; permutation [2, 0, 3, 1] -> [c, a, d, b]; s = 2 -> buckets {c, a}, {d, b}
    # bucket 0: (3*(4, 2) + 1*(1, 0)) / 4 = (13/4, 6/4) = (3.25, 1.5)
    # bucket 1: (1*(10, -4) + 3*(2, 1)) / 4 = (16/4, -1/4) = (4.0, -0.25)
    # median of two = their mean: ((3.25 + 4) / 2, (1.5 - 0.25) / 2) = (3.625, 0.625)
    # nbt carried over all four updates as FedAvg: increments 4, 0, 0, 4 weighted 1, 3, 3, 1 -> 8/8 = 1 -> 4
    rule = Bucketing(CoordinateMedian(), 2, permuter=fixed([2, 0, 3, 1]))
    out, agg = run(rule, G, four())
    assert out["w"].tolist() == [3.625, 0.625]
    assert out["w"].dtype == torch.float32 and out["nbt"].item() == 4 and out["nbt"].dtype == torch.int64
    assert list(out) == list(G)
    assert agg.sources == [["c", "a"], ["d", "b"]] and agg.count == 4 and agg.total_weight == 8.0


def test_last_bucket_may_be_smaller_and_weights_are_bucket_samples():
    # 5 updates, s = 2: ceil(5/2) = 3 buckets of 2, 2, 1. Identity permutation over ids 0..4.
    # w: 0 (n=1), 2 (n=1) -> 1 (weight 2); 4 (n=1), 6 (n=3) -> 5.5 (weight 4); 100 (n=2) -> 100 (weight 2)
    # weighted geometric median in 1-D is the weighted median: weights 2, 4, 2 -> 5.5
    ups = [ClientUpdate(str(i), n, {"w": torch.tensor([v])}) for i, (n, v) in enumerate(
        [(1, 0.0), (1, 2.0), (1, 4.0), (3, 6.0), (2, 100.0)])]
    rule = Bucketing(GeometricMedian(eps=1e-12, tol=0.0, max_iter=500), 2, permuter=fixed([0, 1, 2, 3, 4]))
    out, agg = run(rule, {"w": torch.zeros(1)}, ups)
    assert agg.sources == [["0", "1"], ["2", "3"], ["4"]]
    assert out["w"].item() == pytest.approx(5.5, abs=1e-4)
    assert bucket_count(5, 2) == 3 and bucket_count(4, 2) == 2 and bucket_count(10, 3) == 4


def test_seeded_permutation_is_deterministic_and_advances_per_round():
    def rounds(seed, k=6):
        rule = Bucketing(CoordinateMedian(), 2, seed=seed)
        ups = [ClientUpdate(f"w{i}", 1, {"w": torch.tensor([float(i)])}) for i in range(6)]
        return [(run(rule, {"w": torch.zeros(1)}, ups)[1].sources) for _ in range(k)]

    assert rounds(7) == rounds(7)
    assert len({str(b) for b in rounds(7)}) > 1  # the round counter changes the permutation
    assert rounds(7) != rounds(8)
    assert seeded_permutation(3, 1, 10) == seeded_permutation(3, 1, 10)
    assert sorted(seeded_permutation(3, 1, 10)) == list(range(10))


def test_arrival_order_never_matters_for_a_fixed_seed():
    ups = [ClientUpdate(f"w{i}", 1 + i % 3, {"w": torch.tensor([float(i * i), float(-i)])}) for i in range(9)]
    results = []
    for shuffle_seed in range(5):
        order = ups[:]
        random.Random(shuffle_seed).shuffle(order)
        rule = Bucketing(TrimmedMean(beta=0.2), 3, seed=11)
        out, agg = run(rule, {"w": torch.zeros(2)}, order)
        results.append((out["w"].tolist(), agg.sources))
    assert all(r == results[0] for r in results)


def test_scaled_attacker_is_ignored_by_median_with_bucketing():
    # n = 6, s = 2 -> 3 buckets; f = 1 attacker contaminates one bucket, the median of 3 ignores it.
    torch.manual_seed(0)
    honest = [torch.ones(5) + 0.1 * torch.randn(5) for _ in range(5)]
    lo = torch.stack(honest).min(dim=0).values
    hi = torch.stack(honest).max(dim=0).values
    rule = build_rule({"name": "median", "f": 1, "bucketing": {"s": 2, "seed": 3}})
    for _ in range(10):  # several rounds: every placement of the attacker
        ups = [ClientUpdate(f"h{i}", 10, {"w": h}) for i, h in enumerate(honest)]
        ups.append(ClientUpdate("evil", 10, {"w": -1e6 * torch.ones(5)}))
        out, _ = run(rule, {"w": torch.zeros(5)}, ups)
        assert torch.all(out["w"] >= lo - 1e-6) and torch.all(out["w"] <= hi + 1e-6)


def test_clip_first_then_bucket():
    # max_norm 1: 10 -> 1; ids 0..3 identity: buckets {1, 0.5} -> 0.75, {-0.25, 0.25} -> 0; median 0.375
    # (bucketing first would give {10, 0.5} -> 5.25 and {-0.25, 0.25} -> 0, median 2.625, before any clipping)
    rule = NormBound(Bucketing(CoordinateMedian(), 2, permuter=fixed([0, 1, 2, 3])), 1.0)
    ups = [ClientUpdate(str(i), 1, {"w": torch.tensor([v])}) for i, v in enumerate([10.0, 0.5, -0.25, 0.25])]
    out, agg = run(rule, {"w": torch.zeros(1)}, ups)
    assert out["w"].tolist() == [0.375] and agg.clipped == 1
    built = build_rule({"name": "median", "norm_bound": {"max_norm": 1.0}, "bucketing": {"s": 2}})
    assert isinstance(built, NormBound) and isinstance(built.rule, Bucketing)
    assert isinstance(built.rule.rule, CoordinateMedian)
    assert built.describe() == "median+bucketing(s=2)+norm_bound(1)"


def test_wrapper_looks_like_its_rule():
    class Grouped(CoordinateMedian):
        update_groups = ("g",)

    rule = Bucketing(Grouped(), 3)
    assert rule.name == "median" and not rule.streaming and rule.update_groups == ("g",)
    assert rule.broadcast() == {}
    assert wrap_bucketing(FedAvg(), None).__class__ is FedAvg
    out, agg = run(rule, {"w": torch.zeros(1)}, [ClientUpdate("a", 1, {"w": torch.ones(1)})])
    rule.commit(agg, num_workers_total=1)
    assert out["w"].tolist() == [1.0]


def test_invalid_update_is_refused_before_buffering():
    agg = Bucketing(CoordinateMedian(), 2).begin({"w": torch.zeros(2)})
    with pytest.raises(InvalidUpdate):
        agg.add(ClientUpdate("a", 1, {"w": torch.zeros(3)}))
    with pytest.raises(InvalidUpdate):
        agg.add(ClientUpdate("a", 0, {"w": torch.zeros(2)}))
    assert agg.count == 0


def test_preconditions():
    with pytest.raises(StrategyConfigError, match=r"n >= 7.*bucketing s=2.*ceil\(10/2\)=5"):
        Bucketing(Krum(f=2), 2).check_cohort(10)
    Bucketing(Krum(f=2), 2).check_cohort(13)  # 7 buckets > 2f + 2
    with pytest.raises(StrategyConfigError, match="streaming"):
        Bucketing(FedAvg(), 2)
    with pytest.raises(StrategyConfigError, match="s must be an integer >= 2"):
        Bucketing(CoordinateMedian(), 1)
    with pytest.raises(StrategyConfigError, match="seed"):
        Bucketing(CoordinateMedian(), 2, seed=-1)
    # a round smaller than the quorum still fails at result(), with the bucket count
    rule = Bucketing(CoordinateMedian(f=1), 2)
    with pytest.raises(StrategyConfigError, match=r"ceil\(4/2\)=2"):
        run(rule, {"w": torch.zeros(1)}, [ClientUpdate(str(i), 1, {"w": torch.ones(1)}) for i in range(4)])
    with pytest.raises(StrategyConfigError, match="no updates"):
        rule.begin({"w": torch.zeros(1)}).result()
    with pytest.raises(ValueError, match="not a permutation"):
        run(Bucketing(CoordinateMedian(), 2, permuter=fixed([0, 0])), {"w": torch.zeros(1)},
            [ClientUpdate(str(i), 1, {"w": torch.ones(1)}) for i in range(2)])


@pytest.mark.parametrize("name, params", [("fedavg", {}), ("fedprox", {"mu": 0.1}), ("fednova", {}),
                                          ("scaffold", {})])
def test_streaming_rules_reject_bucketing(name, params):
    with pytest.raises(StrategyConfigError, match=f"{name} is a streaming rule"):
        build_rule({"name": name, **params, "bucketing": {"s": 2}})


@pytest.mark.parametrize("bucketing, fragment", [
    ({"s": 2, "k": 1}, "bucketing.k: Extra inputs are not permitted"),
    ({"s": 1}, "greater than or equal to 2"),
    ({"seed": 1}, "bucketing.s: Field required"),
    ({"s": 2, "seed": -1}, "greater than or equal to 0"),
])
def test_bad_bucketing_specs(bucketing, fragment):
    with pytest.raises(StrategyConfigError, match="invalid strategy") as exc:
        build_rule({"name": "median", "bucketing": bucketing})
    assert fragment in str(exc.value)


@pytest.mark.parametrize("spec", [
    {"name": "median", "bucketing": {"s": 2}},
    {"name": "trimmed_mean", "beta": 0.4, "bucketing": {"s": 2, "seed": 5}},
    {"name": "geometric_median", "bucketing": {"s": 3}},
    {"name": "krum", "f": 1, "bucketing": {"s": 2}},
    {"name": "multi_krum", "f": 1, "m": 2, "bucketing": {"s": 2}},
    {"name": "bulyan", "f": 1, "bucketing": {"s": 2}},
])
def test_every_robust_rule_accepts_bucketing(spec):
    rule = validate_strategy(spec, 14)
    assert isinstance(rule, Bucketing) and rule.name == spec["name"] and rule.s == spec["bucketing"]["s"]
    assert rule.seed == spec["bucketing"].get("seed", 0)
    out, _ = run(rule, {"w": torch.zeros(2)}, [ClientUpdate(f"{i:02d}", 1, {"w": torch.full((2,), float(i))})
                                               for i in range(14)])
    assert torch.isfinite(out["w"]).all()


def test_jobspec_rejects_too_few_buckets_at_load():
    with pytest.raises(ValidationError, match=r"ceil\(10/2\)=5") as exc:
        JobSpec(job="x", task="t", rounds=1, cohort={"min_workers": 10, "min_updates": 10},
                strategy={"name": "krum", "f": 2, "bucketing": {"s": 2}})
    assert "strategy krum" in str(exc.value) and "n >= 7" in str(exc.value)
    job = JobSpec(job="x", task="t", rounds=1, cohort={"min_workers": 10, "min_updates": 10},
                  strategy={"name": "median", "f": 2, "bucketing": {"s": 2}})
    assert job.strategy.bucketing.s == 2 and job.strategy.bucketing.seed == 0
    assert JobSpec.model_validate(job.model_dump(mode="json")) == job
    with pytest.raises(ValidationError, match="fedavg is a streaming rule"):
        JobSpec(job="x", task="t", rounds=1, strategy={"name": "fedavg", "bucketing": {"s": 2}})
