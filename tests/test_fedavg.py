"""FedAvg (McMahan et al. 2017):  w = sum_k (n_k / n) w_k,  n = sum_k n_k.

Expected values below are worked out by hand from that formula and typed in; none of
them is computed by the code under test.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedbus.aggregation.base import ClientUpdate, is_averageable
from fedbus.aggregation.fedavg import WeightedMeanAccumulator

HYP = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def fedavg(global_state, updates):
    acc = WeightedMeanAccumulator(global_state)
    for u in updates:
        acc.add(u)
    return acc.result()


def upd(wid: str, n: int, **state) -> ClientUpdate:
    return ClientUpdate(wid, n, state)


# ---- hand-computed cases -----------------------------------------------------------

def test_two_clients_n1_n3():
    # w = (1*wA + 3*wB) / 4
    #   w[0,0] = (1*1 + 3*5) / 4 = 16/4 = 4      w[0,1] = (1*2 + 3*6) / 4 = 20/4 = 5
    #   w[1,0] = (1*3 + 3*7) / 4 = 24/4 = 6      w[1,1] = (1*4 + 3*8) / 4 = 28/4 = 7
    #   b[0]   = (1*0.5 + 3*(-0.5)) / 4 = -1/4 = -0.25
    #   b[1]   = (1*2 + 3*0) / 4 = 0.5
    g = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}
    a = upd("a", 1, w=torch.tensor([[1.0, 2.0], [3.0, 4.0]]), b=torch.tensor([0.5, 2.0]))
    b = upd("b", 3, w=torch.tensor([[5.0, 6.0], [7.0, 8.0]]), b=torch.tensor([-0.5, 0.0]))
    out = fedavg(g, [a, b])
    assert torch.equal(out["w"], torch.tensor([[4.0, 5.0], [6.0, 7.0]]))
    assert torch.equal(out["b"], torch.tensor([-0.25, 0.5]))
    assert out["w"].dtype == torch.float32


def test_three_clients_n2_n1_n1():
    # x = (2*[0, 1] + 1*[4, -2] + 1*[8, 3]) / 4 = ([0, 2] + [4, -2] + [8, 3]) / 4 = [12, 3] / 4 = [3, 0.75]
    g = {"x": torch.full((2,), 100.0, dtype=torch.float64)}  # the global value plays no part
    out = fedavg(g, [upd("a", 2, x=torch.tensor([0.0, 1.0], dtype=torch.float64)),
                     upd("b", 1, x=torch.tensor([4.0, -2.0], dtype=torch.float64)),
                     upd("c", 1, x=torch.tensor([8.0, 3.0], dtype=torch.float64))])
    assert out["x"].tolist() == [3.0, 0.75]
    assert out["x"].dtype == torch.float64


def test_uneven_weights_non_dyadic():
    # n = 1 + 2 = 3:  y = (1*1 + 2*4) / 3 = 9/3 = 3 ;  z = (1*0 + 2*1) / 3 = 2/3 = 0.6666...
    out = fedavg({"y": torch.zeros(()), "z": torch.zeros(())},
                 [upd("a", 1, y=torch.tensor(1.0), z=torch.tensor(0.0)),
                  upd("b", 2, y=torch.tensor(4.0), z=torch.tensor(1.0))])
    assert out["y"].item() == 3.0
    assert out["z"].item() == pytest.approx(0.6666667, abs=1e-7)
    assert out["y"].shape == ()


def test_single_client_is_its_own_average():
    w = torch.tensor([1.5, -2.25, 1e-3])
    assert torch.equal(fedavg({"w": torch.zeros(3)}, [upd("a", 17, w=w)])["w"], w)


def test_complex_tensors_are_averaged():
    # (1*(1+1j) + 3*(1-3j)) / 4 = (1 + 1j + 3 - 9j) / 4 = (4 - 8j) / 4 = 1 - 2j
    out = fedavg({"c": torch.zeros(1, dtype=torch.complex64)},
                 [upd("a", 1, c=torch.tensor([1 + 1j], dtype=torch.complex64)),
                  upd("b", 3, c=torch.tensor([1 - 3j], dtype=torch.complex64))])
    assert out["c"].dtype == torch.complex64
    assert out["c"].tolist() == [1 - 2j]


# ---- integer and bool buffers -------------------------------------------------------

def test_num_batches_tracked_advances_by_weighted_mean_increment():
    # global 10; client a (n=1) reports 12 (+2), client b (n=3) reports 16 (+6)
    # increment = (1*2 + 3*6) / 4 = 20/4 = 5  ->  10 + 5 = 15  (averaging raw counters would also
    # give (12 + 48)/4 = 15 here, so see the next test for where they differ)
    g = {"num_batches_tracked": torch.tensor(10, dtype=torch.int64)}
    out = fedavg(g, [upd("a", 1, num_batches_tracked=torch.tensor(12)),
                     upd("b", 3, num_batches_tracked=torch.tensor(16))])
    assert out["num_batches_tracked"].dtype == torch.int64
    assert out["num_batches_tracked"].shape == ()
    assert out["num_batches_tracked"].item() == 15


def test_integer_buffer_rounds_the_mean_increment():
    # global 100; increments +1 (n=1) and +2 (n=2): (1*1 + 2*2) / 3 = 5/3 = 1.67 -> rounds to 2 -> 102
    # increments +1 (n=3) and +2 (n=1): (3*1 + 1*2) / 4 = 5/4 = 1.25 -> rounds to 1 -> 101
    g = {"steps": torch.tensor([100, 0], dtype=torch.int64)}
    out = fedavg(g, [upd("a", 1, steps=torch.tensor([101, 3])), upd("b", 2, steps=torch.tensor([102, 0]))])
    # second element: increments +3 (n=1) and 0 (n=2): 3/3 = 1 -> 1
    assert out["steps"].tolist() == [102, 1]
    out = fedavg(g, [upd("a", 3, steps=torch.tensor([101, 0])), upd("b", 1, steps=torch.tensor([102, 0]))])
    assert out["steps"].tolist() == [101, 0]
    assert out["steps"].dtype == torch.int64


def test_int32_buffer_keeps_dtype():
    g = {"k": torch.tensor([7], dtype=torch.int32)}
    out = fedavg(g, [upd("a", 2, k=torch.tensor([9], dtype=torch.int32)),
                     upd("b", 2, k=torch.tensor([11], dtype=torch.int32))])
    # increments +2, +4 with equal weights -> +3 -> 10
    assert out["k"].dtype == torch.int32 and out["k"].tolist() == [10]


def test_bool_buffers_keep_the_global_value():
    g = {"mask": torch.tensor([True, False, True])}
    out = fedavg(g, [upd("a", 5, mask=torch.tensor([False, False, False])),
                     upd("b", 1, mask=torch.tensor([False, True, False]))])
    assert out["mask"].dtype == torch.bool
    assert out["mask"].tolist() == [True, False, True]
    g["mask"][0] = False  # the result does not alias the caller's global state
    assert out["mask"].tolist() == [True, False, True]


def test_real_module_state_dict():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    g = {k: v.clone() for k, v in net.state_dict().items()}
    states = []
    for steps in (3, 5):
        s = {k: v.clone() for k, v in g.items()}
        s["0.weight"] += steps
        s["1.num_batches_tracked"] += steps
        states.append(s)
    out = fedavg(g, [ClientUpdate("a", 1, states[0]), ClientUpdate("b", 1, states[1])])
    assert set(out) == set(g)
    assert all(out[k].dtype == g[k].dtype and out[k].shape == g[k].shape for k in g)
    assert torch.allclose(out["0.weight"], g["0.weight"] + 4)  # (3 + 5) / 2
    assert out["1.num_batches_tracked"].item() == 4
    net.load_state_dict(out)


# ---- reduced precision ----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_keeps_dtype(dtype):
    # (1*1 + 3*3) / 4 = 10/4 = 2.5 ;  (1*(-2) + 3*0.5) / 4 = -0.5/4 = -0.125   (exact in both formats)
    g = {"h": torch.zeros(2, dtype=dtype)}
    out = fedavg(g, [upd("a", 1, h=torch.tensor([1.0, -2.0], dtype=dtype)),
                     upd("b", 3, h=torch.tensor([3.0, 0.5], dtype=dtype))])
    assert out["h"].dtype == dtype
    assert out["h"].tolist() == [2.5, -0.125]


def test_half_precision_accumulates_in_high_precision():
    # 1000 clients with weight 1 and value 1/3 rounded to float16 (0.333251953125):
    # summing in float16 would stall far below 333; the mean must still be 0.333251953125.
    v = torch.tensor([1 / 3], dtype=torch.float16)
    acc = WeightedMeanAccumulator({"h": torch.zeros(1, dtype=torch.float16)})
    for i in range(1000):
        acc.add(upd(str(i), 1, h=v))
    assert acc.result()["h"].tolist() == [0.333251953125]


# ---- algebraic properties -----------------------------------------------------------

finite32 = st.floats(-1e4, 1e4, allow_nan=False, width=32)


@st.composite
def cohorts(draw):
    shape = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    size = 1
    for d in shape:
        size *= d
    k = draw(st.integers(1, 6))
    updates = []
    for i in range(k):
        w = torch.tensor(draw(st.lists(finite32, min_size=size, max_size=size)), dtype=torch.float32).reshape(shape)
        steps = torch.tensor(draw(st.integers(0, 1000)), dtype=torch.int64)
        updates.append(ClientUpdate(f"c{i}", draw(st.integers(1, 10_000)), {"w": w, "nbt": steps}))
    global_state = {"w": torch.zeros(shape), "nbt": torch.tensor(0, dtype=torch.int64)}
    return global_state, updates


@HYP
@given(cohorts(), st.randoms(use_true_random=False))
def test_permutation_invariance(cohort, rnd):
    g, updates = cohort
    shuffled = list(updates)
    rnd.shuffle(shuffled)
    a, b = fedavg(g, updates), fedavg(g, shuffled)
    assert torch.allclose(a["w"], b["w"], rtol=1e-6, atol=1e-6)
    assert torch.equal(a["nbt"], b["nbt"])  # integer increments sum exactly in float64


@HYP
@given(cohorts())
def test_identical_updates_give_that_update(cohort):
    g, updates = cohort
    same = [ClientUpdate(u.worker_id, u.num_samples, updates[0].state) for u in updates]
    out = fedavg(g, same)
    assert torch.equal(out["w"], updates[0].state["w"])
    assert torch.equal(out["nbt"], updates[0].state["nbt"])


@HYP
@given(cohorts(), st.sampled_from([2, 3, 7, 1000]))
def test_scaling_all_weights_changes_nothing(cohort, c):
    g, updates = cohort
    scaled = [ClientUpdate(u.worker_id, u.num_samples * c, u.state) for u in updates]
    a, b = fedavg(g, updates), fedavg(g, scaled)
    assert torch.allclose(a["w"], b["w"], rtol=1e-6, atol=1e-6)
    assert torch.equal(a["nbt"], b["nbt"])


@HYP
@given(cohorts())
def test_result_lies_within_the_clients_range(cohort):
    g, updates = cohort
    out = fedavg(g, updates)["w"]
    stacked = torch.stack([u.state["w"] for u in updates])
    assert torch.all(out >= stacked.min(0).values - 1e-3) and torch.all(out <= stacked.max(0).values + 1e-3)


# ---- accumulator bookkeeping --------------------------------------------------------

def test_count_and_total_weight():
    acc = WeightedMeanAccumulator({"w": torch.zeros(1)})
    assert acc.count == 0 and acc.total_weight == 0
    acc.add(upd("a", 3, w=torch.ones(1)))
    acc.add(upd("b", 4, w=torch.ones(1)))
    assert acc.count == 2 and acc.total_weight == 7.0


def test_no_updates_is_an_error():
    with pytest.raises(ValueError):
        WeightedMeanAccumulator({"w": torch.zeros(1)}).result()


@pytest.mark.parametrize("n", [0, -1])
def test_non_positive_sample_count_is_an_error(n):
    acc = WeightedMeanAccumulator({"w": torch.zeros(1)})
    with pytest.raises(ValueError):
        acc.add(upd("a", n, w=torch.ones(1)))
    assert acc.count == 0


def test_global_state_is_not_modified():
    g = {"w": torch.ones(2), "steps": torch.tensor(1)}
    fedavg(g, [upd("a", 1, w=torch.zeros(2), steps=torch.tensor(5))])
    assert g["w"].tolist() == [1.0, 1.0] and g["steps"].item() == 1


def test_is_averageable():
    assert is_averageable(torch.zeros(1)) and is_averageable(torch.zeros(1, dtype=torch.bfloat16))
    assert is_averageable(torch.zeros(1, dtype=torch.complex64))
    assert not is_averageable(torch.zeros(1, dtype=torch.int64))
    assert not is_averageable(torch.zeros(1, dtype=torch.bool))
