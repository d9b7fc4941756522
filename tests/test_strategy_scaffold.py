"""SCAFFOLD option II (Karimireddy et al. 2020, Algorithm 1).

    server:  x <- x + eta_g · mean_S(y_i − x),   c <- c + (|S|/N) · mean_S(Δc_i)
    client:  c_i+ = c_i − c + (x − y_i)/(K·eta_l),   Δc_i = c_i+ − c_i

Expected values are worked out by hand and typed in.
"""

from __future__ import annotations

import pytest
import torch

from fedbus.aggregation.base import ClientUpdate, InvalidUpdate
from fedbus.aggregation.scaffold import Scaffold, scaffold_client_update


def upd(wid, n, w, dc, **extra_state):
    return ClientUpdate(wid, n, {"w": torch.tensor(w), **extra_state},
                        extra={"scaffold_delta_c": {"w": torch.tensor(dc)}})


def test_round_hand_case():
    # x = [1, 2], c = 0 (first round), 2 of N = 4 workers report; eta_g = 0.5.
    # A (n=1): y = [3, 2]  -> Δy = [2, 0],   Δc = [0.5, -1]
    # B (n=3): y = [1, -2] -> Δy = [0, -4],  Δc = [1.5, 1]
    # uniform (n_i ignored): mean Δy = [1, -2];  x+ = [1, 2] + 0.5 * [1, -2] = [1.5, 1]
    # commit: c = 0 + (2/4) * mean Δc = 0.5 * [1, 0] = [0.5, 0]
    rule = Scaffold(eta_g=0.5)
    g = {"w": torch.tensor([1.0, 2.0])}
    agg = rule.begin(g)
    assert rule.broadcast()["w"].tolist() == [0.0, 0.0]
    agg.add(upd("a", 1, [3.0, 2.0], [0.5, -1.0]))
    agg.add(upd("b", 3, [1.0, -2.0], [1.5, 1.0]))
    assert agg.result()["w"].tolist() == [1.5, 1.0]
    assert rule.broadcast()["w"].tolist() == [0.0, 0.0]  # c changes only at commit
    rule.commit(agg, num_workers_total=4)
    c = rule.broadcast()["w"]
    assert c.tolist() == [0.5, 0.0] and c.dtype == torch.float32
    # second round, one of 4 reports Δc = [2, 4]:  c = [0.5, 0] + (1/4) * [2, 4] = [1, 1]
    agg = rule.begin({"w": torch.tensor([1.5, 1.0])})
    agg.add(upd("a", 7, [1.5, 1.0], [2.0, 4.0]))
    assert agg.result()["w"].tolist() == [1.5, 1.0]  # Δy = 0
    rule.commit(agg, num_workers_total=4)
    assert rule.broadcast()["w"].tolist() == [1.0, 1.0]


def test_client_update_option_ii():
    # c = [0.5, 0], c_i = [0.25, 1], x = [1, 2], y_i = [0.5, 2.5], K = 5, eta_l = 0.1 -> K eta_l = 0.5
    # (x - y_i)/(K eta_l) = [0.5, -0.5]/0.5 = [1, -1]
    # c_i+ = c_i - c + [1, -1] = [0.25 - 0.5 + 1, 1 - 0 - 1] = [0.75, 0]
    # Δc_i = c_i+ - c_i = [0.5, -1]
    c_new, dc = scaffold_client_update({"w": torch.tensor([0.5, 0.0])}, {"w": torch.tensor([0.25, 1.0])},
                                       {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([0.5, 2.5])},
                                       num_steps=5, lr=0.1)
    assert c_new["w"].tolist() == pytest.approx([0.75, 0.0])
    assert dc["w"].tolist() == pytest.approx([0.5, -1.0])


def test_client_update_with_local_momentum_divides_by_the_effective_steps():
    # momentum 0.5, K = 3: ||a||_1 = (0.5 + 0.75 + 0.875)/0.5 = 4.25 (fednova.py derivation)
    # c = [0], c_i = [0], x = [0], y = [-0.85], eta_l = 0.1: (0 + 0.85)/(0.1*4.25) = 0.85/0.425 = 2
    c_new, dc = scaffold_client_update({"w": torch.tensor([0.0], dtype=torch.float64)}, {},
                                       {"w": torch.tensor([0.0], dtype=torch.float64)},
                                       {"w": torch.tensor([-0.85], dtype=torch.float64)}, num_steps=3, lr=0.1,
                                       momentum=0.5)
    assert c_new["w"].tolist() == pytest.approx([2.0], abs=1e-12) and dc["w"].tolist() == pytest.approx([2.0])


def test_control_variate_recovers_a_constant_gradient_under_torch_sgd_momentum():
    # Oracle: torch.optim.SGD(momentum=0.9) on the linear loss g·w with the SCAFFOLD correction (c - c_i) added
    # to the gradient; every corrected gradient is g + c - c_i, so c_i+ must come out as exactly g.
    g = torch.tensor([0.3, -1.2], dtype=torch.float64)
    c, ci = torch.tensor([0.5, 0.1], dtype=torch.float64), torch.tensor([-0.2, 0.4], dtype=torch.float64)
    x = torch.tensor([1.0, 2.0], dtype=torch.float64)
    w = torch.nn.Parameter(x.clone())
    opt = torch.optim.SGD([w], lr=0.05, momentum=0.9)
    for _ in range(7):
        opt.zero_grad()
        (g @ w).backward()
        w.grad += c - ci
        opt.step()
    c_new, _ = scaffold_client_update({"w": c}, {"w": ci}, {"w": x}, {"w": w.detach()}, num_steps=7, lr=0.05,
                                      momentum=0.9)
    assert torch.allclose(c_new["w"], g, atol=1e-12)
    # the plain option II formula (K eta_l) overstates it several-fold under momentum
    c_plain, _ = scaffold_client_update({"w": c}, {"w": ci}, {"w": x}, {"w": w.detach()}, num_steps=7, lr=0.05)
    assert (c_plain["w"] - g).abs().max() > 1.0


def test_client_update_first_round_has_zero_local_c():
    # c_i = 0 (empty), c = [1], x = [0], y = [-2], K = 4, eta_l = 0.5: (0 + 2)/2 = 1 -> c_i+ = 0 - 1 + 1 = 0, Δc = 0
    c_new, dc = scaffold_client_update({"w": torch.tensor([1.0])}, {}, {"w": torch.tensor([0.0])},
                                       {"w": torch.tensor([-2.0])}, num_steps=4, lr=0.5)
    assert c_new["w"].tolist() == [0.0] and dc["w"].tolist() == [0.0]


def test_integer_buffers_carried_and_not_in_c():
    # c covers float tensors only; the counter advances by the sample-weighted mean increment:
    # +2 (n=1), +6 (n=3): (2 + 18)/4 = 5
    rule = Scaffold()
    g = {"w": torch.zeros(1), "nbt": torch.tensor(10)}
    agg = rule.begin(g)
    assert set(rule.broadcast()) == {"w"}
    agg.add(upd("a", 1, [1.0], [0.0], nbt=torch.tensor(12)))
    agg.add(upd("b", 3, [3.0], [0.0], nbt=torch.tensor(16)))
    out = agg.result()
    assert out["nbt"].item() == 15 and out["w"].tolist() == [2.0]  # uniform mean of Δy = (1 + 3)/2


def test_missing_delta_c_is_rejected():
    rule = Scaffold()
    agg = rule.begin({"w": torch.zeros(2)})
    with pytest.raises(InvalidUpdate, match="scaffold_delta_c"):
        agg.add(ClientUpdate("a", 1, {"w": torch.ones(2)}))
    with pytest.raises(InvalidUpdate, match="shape"):
        agg.add(ClientUpdate("a", 1, {"w": torch.ones(2)}, extra={"scaffold_delta_c": {"w": torch.ones(3)}}))
    assert agg.count == 0


def test_broadcast_before_begin_and_bad_commit():
    rule = Scaffold()
    with pytest.raises(RuntimeError):
        rule.broadcast()
    agg = rule.begin({"w": torch.zeros(1)})
    agg.add(upd("a", 1, [1.0], [1.0]))
    agg.add(upd("b", 1, [1.0], [1.0]))
    with pytest.raises(ValueError, match="N = 1"):
        rule.commit(agg, num_workers_total=1)
