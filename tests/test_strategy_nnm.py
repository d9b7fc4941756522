"""Nearest-neighbour mixing (Allouah et al. 2023, Algorithm 1): mean of the n - f nearest, then the rule."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from fedbus.aggregation.base import ClientUpdate, StrategyConfigError
from fedbus.aggregation.bucketing import Bucketing
from fedbus.aggregation.fedavg import FedAvg
from fedbus.aggregation.geometric_median import GeometricMedian
from fedbus.aggregation.krum import Krum
from fedbus.aggregation.median import CoordinateMedian
from fedbus.aggregation.nnm import NearestNeighbourMixing, wrap_nnm
from fedbus.aggregation.norm_bound import NormBound
from fedbus.aggregation.specs import build_rule, validate_strategy
from fedbus.aggregation.trimmed_mean import TrimmedMean
from fedbus.jobspec import JobSpec


def run(rule, g, updates):
    agg = rule.begin(g)
    for u in updates:
        agg.add(u)
    return agg.result(), agg


def one_d(values, samples=None):
    samples = samples or [1] * len(values)
    return [ClientUpdate(chr(ord("a") + i), n, {"w": torch.tensor([v])})
            for i, (v, n) in enumerate(zip(values, samples))]


def test_hand_computed_trimmed_mean_of_mixed_updates():
    # n = 5, f = 1: every neighbourhood holds n - f = 4 updates, the update itself included.
    # values a=0, b=2, c=3, d=9, e=10
    #   a: |b|=2 |c|=3 |d|=9 |e|=10 -> {a, b, c, d}  mean 14/4 = 3.5
    #   b: |a|=2 |c|=1 |d|=7 |e|=8  -> {b, c, a, d}  3.5
    #   c: |a|=3 |b|=1 |d|=6 |e|=7  -> {c, b, a, d}  3.5
    #   d: |a|=9 |b|=7 |c|=6 |e|=1  -> {d, e, c, b}  (9 + 10 + 3 + 2)/4 = 6
    #   e: |a|=10 |b|=8 |c|=7 |d|=1 -> {e, d, c, b}  6
    # trimmed mean beta = 0.2 drops one value at each end of [3.5, 3.5, 3.5, 6, 6]: (3.5 + 3.5 + 6)/3 = 13/3
    out, agg = run(NearestNeighbourMixing(TrimmedMean(0.2), 1), {"w": torch.zeros(1)}, one_d([0, 2, 3, 9, 10]))
    assert out["w"].item() == pytest.approx(13 / 3, abs=1e-6)
    assert agg.sources == [["a", "b", "c", "d"], ["b", "c", "a", "d"], ["c", "b", "a", "d"],
                           ["d", "e", "c", "b"], ["e", "d", "c", "b"]]


def test_mixing_is_unweighted_and_inputs_keep_their_clients_samples():
    # Same cohort, samples 1, 1, 1, 100, 100. Mixed values are unchanged (3.5 x3, 6 x2): an attacker
    # claiming many samples gains nothing inside a neighbourhood. The median then sees weights only
    # through the rule itself (coordinate-wise median is unweighted): median of the five = 3.5.
    out, agg = run(NearestNeighbourMixing(CoordinateMedian(), 1), {"w": torch.zeros(1)},
                   one_d([0, 2, 3, 9, 10], [1, 1, 1, 100, 100]))
    assert out["w"].item() == pytest.approx(3.5, abs=1e-9)
    assert agg.inner.total_weight == 203.0  # each mixed input kept its own client's sample count


def test_equal_distances_go_to_the_smaller_worker_id():
    # n = 3, f = 1, neighbourhoods of 2. a=0 is at distance 1 from both b=1 and c=-1: b (smaller id) wins.
    #   a -> {a, b} 0.5;  b -> {b, a} 0.5;  c -> {c, a} -0.5;  median 0.5
    for order in ([0, 1, 2], [2, 1, 0], [1, 2, 0]):
        ups = one_d([0.0, 1.0, -1.0])
        out, agg = run(NearestNeighbourMixing(CoordinateMedian(), 1), {"w": torch.zeros(1)}, [ups[i] for i in order])
        assert out["w"].item() == 0.5
        assert agg.sources == [["a", "b"], ["b", "a"], ["c", "a"]]


def test_integer_buffers_carried_over_the_original_updates():
    # nbt increments 4, 0, 0 weighted 1, 3, 3 -> round(4/7) = 1 over the global 3 -> 4
    g = {"w": torch.zeros(1), "nbt": torch.tensor(3)}
    ups = [ClientUpdate(i, n, {"w": torch.tensor([v]), "nbt": torch.tensor(c)})
           for i, n, v, c in [("a", 1, 1.0, 7), ("b", 3, 2.0, 3), ("c", 3, 4.0, 3)]]
    out, _ = run(NearestNeighbourMixing(CoordinateMedian(), 1), g, ups)
    assert out["nbt"].item() == 4 and out["nbt"].dtype == torch.int64
    assert out["w"].dtype == torch.float32 and list(out) == ["w", "nbt"]


def test_arrival_order_never_matters():
    ups = [ClientUpdate(f"w{i}", 1 + i % 3, {"w": torch.tensor([float(i * i % 7), float(-i)])}) for i in range(9)]
    results = []
    for shuffle_seed in range(5):
        order = ups[:]
        random.Random(shuffle_seed).shuffle(order)
        out, agg = run(NearestNeighbourMixing(Krum(f=2), 2), {"w": torch.zeros(2)}, order)
        results.append((out["w"].tolist(), agg.sources))
    assert all(r == results[0] for r in results)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_far_attackers_leave_every_rule_the_exact_honest_mean(data):
    """With the f attackers farther from every honest update than any two honest ones are from each
    other, every honest neighbourhood is exactly the honest set, so each honest input is the honest
    mean and a rule that keeps a majority returns it: the heterogeneity among honest updates is gone."""
    f = data.draw(st.integers(1, 2))
    h = data.draw(st.integers(2 * f + 3, 2 * f + 6))
    dim = data.draw(st.integers(1, 4))
    unit = st.floats(-1, 1, allow_nan=False, width=32)
    honest = [torch.tensor(data.draw(st.lists(unit, min_size=dim, max_size=dim))) for _ in range(h)]
    sign = torch.tensor(data.draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=dim, max_size=dim)))
    attackers = [sign * data.draw(st.floats(50, 1e6)) for _ in range(f)]
    ids = [f"c{i:02d}" for i in range(h + f)]
    ups = [ClientUpdate(i, data.draw(st.integers(1, 50)), {"w": v}) for i, v in zip(ids, honest + attackers)]
    random.Random(data.draw(st.integers(0, 9))).shuffle(ups)
    mean = torch.stack([v.to(torch.float64) for v in honest]).mean(0)
    for inner in (CoordinateMedian(f=f), TrimmedMean(f / (h + f) + 1e-9), Krum(f=f),
                  GeometricMedian(weighted=False, eps=1e-12, tol=0.0, max_iter=200)):
        out, _ = run(NearestNeighbourMixing(inner, f), {"w": torch.zeros(dim)}, ups)
        assert torch.allclose(out["w"].to(torch.float64), mean, atol=1e-5), inner.name


def test_preconditions():
    NearestNeighbourMixing(CoordinateMedian(), 2).check_cohort(5)
    with pytest.raises(StrategyConfigError, match=r"n > 2f.*f=2 that is n >= 5.*only n=4"):
        NearestNeighbourMixing(CoordinateMedian(), 2).check_cohort(4)
    with pytest.raises(StrategyConfigError, match="n >= 7"):  # the inner rule's own precondition
        NearestNeighbourMixing(Krum(f=2), 2).check_cohort(6)
    with pytest.raises(StrategyConfigError, match="fedavg is a streaming rule"):
        NearestNeighbourMixing(FedAvg(), 1)
    with pytest.raises(StrategyConfigError, match="non-negative integer"):
        NearestNeighbourMixing(CoordinateMedian(), -1)
    # a round smaller than the quorum still fails at result(), not with a wrong answer
    with pytest.raises(StrategyConfigError, match="n > 2f"):
        run(NearestNeighbourMixing(CoordinateMedian(), 2), {"w": torch.zeros(1)}, one_d([1.0, 2.0, 3.0]))
    assert wrap_nnm(FedAvg(), None).__class__ is FedAvg


def test_specs_build_validate_and_order_with_norm_bound():
    rule = build_rule({"name": "median", "nnm": {"f": 2}, "norm_bound": {"max_norm": 1.0}})
    assert isinstance(rule, NormBound) and isinstance(rule.rule, NearestNeighbourMixing)
    assert rule.rule.f == 2 and isinstance(rule.rule.rule, CoordinateMedian)
    assert rule.describe() == "median+nnm(f=2)+norm_bound(1)"
    for spec in ({"name": "krum", "f": 2}, {"name": "multi_krum", "f": 2, "m": 6}, {"name": "median"},
                 {"name": "trimmed_mean", "beta": 0.2}, {"name": "geometric_median"}, {"name": "bulyan", "f": 2}):
        rule = validate_strategy({**spec, "nnm": {"f": 2}}, 11)
        assert isinstance(rule, NearestNeighbourMixing) and rule.name == spec["name"]
    with pytest.raises(StrategyConfigError, match="choose one pre-aggregation"):
        build_rule({"name": "median", "nnm": {"f": 1}, "bucketing": {"s": 2}})
    with pytest.raises(StrategyConfigError, match="scaffold is a streaming rule"):
        build_rule({"name": "scaffold", "nnm": {"f": 1}})
    with pytest.raises(StrategyConfigError, match="nnm.f"):
        build_rule({"name": "median", "nnm": {"f": -1}})
    assert not isinstance(build_rule({"name": "median", "bucketing": {"s": 2}}), NearestNeighbourMixing)
    assert isinstance(build_rule({"name": "median", "bucketing": {"s": 2}}), Bucketing)


def test_jobspec_checks_nnm_against_the_quorum_at_load():
    with pytest.raises(ValidationError, match=r"n > 2f"):
        JobSpec(job="x", task="t", rounds=1, cohort={"min_workers": 4, "min_updates": 4},
                strategy={"name": "median", "nnm": {"f": 2}})
    job = JobSpec(job="x", task="t", rounds=1, cohort={"min_workers": 10, "min_updates": 10},
                  strategy={"name": "krum", "f": 2, "nnm": {"f": 2}})
    assert job.strategy.nnm.f == 2
    assert JobSpec.model_validate(job.model_dump(mode="json")) == job


@pytest.mark.parametrize("chunk_bytes", [8, 1 << 20])  # 8 bytes: one coordinate per chunk
def test_cohort_mix_keeps_dtypes_and_handles_complex_and_strided_tensors(chunk_bytes):
    from fedbus.aggregation.cohort import Cohort

    base_w = torch.arange(6, dtype=torch.float32).reshape(2, 3).t()  # non-contiguous (3, 2)
    g = {"w": base_w, "z": torch.tensor([1 + 1j], dtype=torch.complex64),
         "h": torch.zeros(2, dtype=torch.bfloat16), "nbt": torch.tensor(5)}
    ups = [ClientUpdate("a", 1, {"w": base_w + 1, "z": g["z"] + 2j, "h": torch.tensor([1.0, 2.0], dtype=torch.bfloat16),
                                 "nbt": torch.tensor(7)}),
           ClientUpdate("b", 3, {"w": base_w + 3, "z": g["z"] + 4, "h": torch.tensor([3.0, 4.0], dtype=torch.bfloat16),
                                 "nbt": torch.tensor(5)})]
    cohort = Cohort(g, ups, chunk_bytes=chunk_bytes)
    # rows: a alone; 0.25 a + 0.75 b
    first, mixed = cohort.mix(torch.tensor([[1.0, 0.0], [0.25, 0.75]]))
    assert torch.equal(first["w"], base_w + 1) and first["z"].item() == 1 + 3j
    # w: x + 0.25*1 + 0.75*3 = x + 2.5;  z: (1+1j) + 0.25*2j + 0.75*4 = 4 + 1.5j;  h: (2.5, 3.5)
    assert torch.equal(mixed["w"], base_w + 2.5) and mixed["w"].dtype == torch.float32
    assert mixed["z"].item() == 4 + 1.5j and mixed["z"].dtype == torch.complex64
    assert mixed["h"].tolist() == [2.5, 3.5] and mixed["h"].dtype == torch.bfloat16
    # nbt: increments 2 and 0 weighted 1 and 3 -> round(0.5) = 0 (half to even) -> 5, carried over both updates
    assert mixed["nbt"].item() == 5 and list(mixed) == list(g)
    with pytest.raises(StrategyConfigError, match="k x 2"):
        cohort.mix(torch.ones(2, 3))
