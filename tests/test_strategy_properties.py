"""Properties every rule must have (hypothesis; kept small so the file runs in seconds).

* permutation invariance: the order updates arrive in does not matter;
* weight scaling: multiplying every n_i by c changes nothing;
* identical updates aggregate to that update;
* a robust rule with f >= 1 ignores one update scaled by 1e6;
* preconditions are monotone in the cohort size (checking the quorum covers every larger round).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedbus.aggregation.base import ClientUpdate, StrategyConfigError
from fedbus.aggregation.bulyan import Bulyan
from fedbus.aggregation.fedavg import FedAvg
from fedbus.aggregation.fednova import FedNova
from fedbus.aggregation.geometric_median import GeometricMedian
from fedbus.aggregation.krum import Krum, MultiKrum
from fedbus.aggregation.median import CoordinateMedian
from fedbus.aggregation.nnm import NearestNeighbourMixing
from fedbus.aggregation.norm_bound import NormBound
from fedbus.aggregation.scaffold import Scaffold
from fedbus.aggregation.trimmed_mean import TrimmedMean

HYP = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# name -> (factory, smallest cohort it accepts, absolute tolerance for order/weight-scaling effects)
RULES = {
    "fedavg": (FedAvg, 1, 1e-4),
    "fednova": (FedNova, 1, 1e-4),
    "scaffold": (Scaffold, 1, 1e-4),
    "median": (CoordinateMedian, 1, 0.0),
    "trimmed_mean": (lambda: TrimmedMean(0.2), 1, 1e-4),
    "geometric_median": (GeometricMedian, 1, 1e-2),
    "krum": (lambda: Krum(f=1), 5, 0.0),
    "multi_krum": (lambda: MultiKrum(f=1, m=2), 5, 1e-4),
    "bulyan": (lambda: Bulyan(f=1), 7, 1e-4),
    "norm_bound+fedavg": (lambda: NormBound(FedAvg(), 50.0), 1, 1e-4),
    "norm_bound+krum": (lambda: NormBound(Krum(f=1), 50.0), 5, 1e-4),
    "nnm+median": (lambda: NearestNeighbourMixing(CoordinateMedian(), 1), 3, 1e-4),
    "nnm+krum": (lambda: NearestNeighbourMixing(Krum(f=1), 1), 5, 1e-4),
}
ROBUST = {
    "median": lambda: CoordinateMedian(f=1),
    "trimmed_mean": lambda: TrimmedMean(0.2),
    "geometric_median": lambda: GeometricMedian(f=1),
    "krum": lambda: Krum(f=1),
    "multi_krum": lambda: MultiKrum(f=1, m=2),
    "bulyan": lambda: Bulyan(f=1),
    "nnm+median": lambda: NearestNeighbourMixing(CoordinateMedian(f=1), 1),
    "nnm+trimmed_mean": lambda: NearestNeighbourMixing(TrimmedMean(0.2), 1),
    "nnm+krum": lambda: NearestNeighbourMixing(Krum(f=1), 1),
}

values = st.floats(-100, 100, allow_nan=False, width=32)


def run(rule, g, updates):
    agg = rule.begin(g)
    for u in updates:
        agg.add(u)
    return agg.result()


def make_update(i, n, w, steps, nbt, dc):
    return ClientUpdate(f"c{i}", n, {"w": w, "nbt": nbt}, num_steps=steps, extra={"scaffold_delta_c": {"w": dc}})


@st.composite
def cohorts(draw, min_n):
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 2)))
    size = shape[0] * shape[1]

    def tensor():
        return torch.tensor(draw(st.lists(values, min_size=size, max_size=size)), dtype=torch.float32).reshape(shape)

    g = {"w": tensor(), "nbt": torch.tensor(draw(st.integers(0, 100)))}
    n = draw(st.integers(min_n, min_n + 3))
    updates = [make_update(i, draw(st.integers(1, 1000)), tensor(), draw(st.integers(1, 5)),
                           torch.tensor(draw(st.integers(0, 200))), tensor()) for i in range(n)]
    return g, updates


def close(a, b, atol):
    return torch.allclose(a["w"], b["w"], rtol=1e-5, atol=atol) and torch.equal(a["nbt"], b["nbt"])


@pytest.mark.parametrize("name", RULES)
@HYP
@given(data=st.data())
def test_permutation_invariance(name, data):
    make, min_n, atol = RULES[name]
    g, updates = data.draw(cohorts(min_n))
    shuffled = data.draw(st.permutations(updates))
    assert close(run(make(), g, updates), run(make(), g, shuffled), atol)


@pytest.mark.parametrize("name", RULES)
@HYP
@given(data=st.data())
def test_scaling_all_weights_changes_nothing(name, data):
    make, min_n, atol = RULES[name]
    g, updates = data.draw(cohorts(min_n))
    c = data.draw(st.sampled_from([2, 3, 7, 1000]))
    scaled = [ClientUpdate(u.worker_id, u.num_samples * c, u.state, u.num_steps, u.extra) for u in updates]
    assert close(run(make(), g, updates), run(make(), g, scaled), atol)


@pytest.mark.parametrize("name", RULES)
@HYP
@given(data=st.data())
def test_identical_updates_give_that_update(name, data):
    make, min_n, _ = RULES[name]
    g, updates = data.draw(cohorts(min_n))
    first = updates[0]
    if name.startswith("norm_bound"):
        g = {"w": first.state["w"] + 1.0, "nbt": g["nbt"]}  # ||Δ|| <= sqrt(6) < 50: nothing is clipped
    same = [ClientUpdate(u.worker_id, u.num_samples, first.state, first.num_steps, first.extra) for u in updates]
    out = run(make(), g, same)
    # y = x + (y - x) in float64 and back: exact up to float32 rounding of x + Δ
    assert torch.allclose(out["w"], first.state["w"], rtol=1e-6, atol=1e-5)
    assert torch.equal(out["nbt"], first.state["nbt"])


@pytest.mark.parametrize("name", ROBUST)
@HYP
@given(data=st.data())
def test_one_update_scaled_by_1e6_is_ignored(name, data):
    make = ROBUST[name]
    honest_n = data.draw(st.integers(6 if name == "bulyan" else 4, 8))
    dim = data.draw(st.integers(1, 4))
    unit = st.floats(-1, 1, allow_nan=False)
    x = torch.tensor(data.draw(st.lists(st.floats(-10, 10), min_size=dim, max_size=dim)), dtype=torch.float64)
    honest = [torch.tensor(data.draw(st.lists(unit, min_size=dim, max_size=dim)), dtype=torch.float64)
              for _ in range(honest_n)]
    direction = torch.tensor(data.draw(st.lists(st.floats(0.1, 1), min_size=dim, max_size=dim)), dtype=torch.float64)
    attack = direction * torch.tensor(data.draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=dim, max_size=dim)),
                                      dtype=torch.float64) * 1e6
    deltas = honest + [attack]
    order = data.draw(st.permutations(range(len(deltas))))
    ups = [ClientUpdate(f"c{i}", 10, {"w": x + deltas[i]}) for i in order]
    out = run(make(), {"w": x.clone()}, ups)["w"] - x
    stacked = torch.stack(honest)
    if name == "geometric_median":
        # With weight fraction eps = 1/(h+1) <= 1/5 outside the ball B(c, r) around the honest mean c,
        # g(z) <= g(c) gives (1 - 2 eps)||z - c|| <= 2 (1 - eps) r, i.e. ||z - c|| <= (8/3) r here.
        c = stacked.mean(0)
        r = (stacked - c).norm(dim=1).max()
        assert (out - c).norm() <= 8 / 3 * r + 1e-4
    else:
        assert torch.all(out >= stacked.min(0).values - 1e-9) and torch.all(out <= stacked.max(0).values + 1e-9)


@pytest.mark.parametrize("name", RULES)
def test_preconditions_are_monotone_in_the_cohort_size(name):
    make, min_n, _ = RULES[name]
    rule = make()
    for n in range(1, 20):
        if n < min_n:
            with pytest.raises(StrategyConfigError):
                rule.check_cohort(n)
        else:
            rule.check_cohort(n)
