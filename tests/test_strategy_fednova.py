"""FedNova (Wang et al. 2020):  x+ = x − tau_eff Σ p_i (x − y_i)/a_i,  tau_eff = Σ p_i a_i,  p_i = n_i/n.

Every expected value is worked out by hand from the formula and typed in.
"""

from __future__ import annotations

import pytest
import torch

from fedbus.aggregation.base import ClientUpdate, InvalidUpdate
from fedbus.aggregation.fedavg import FedAvg
from fedbus.aggregation.fednova import FedNova, fednova_a


def run(rule, g, updates):
    agg = rule.begin(g)
    for u in updates:
        agg.add(u)
    return agg.result()


def test_two_clients_hand_case():
    # x = [1, 1].  A: n=1, a=2 (num_steps), y_A = [-1, 5]  -> d_A = (x - y_A)/2 = [2, -4]/2 = [1, -2]
    #              B: n=3, a=4,            y_B = [5, -7]  -> d_B = (x - y_B)/4 = [-4, 8]/4 = [-1, 2]
    # p = [1/4, 3/4];  Σ p d = [1/4 - 3/4, -2/4 + 6/4] = [-0.5, 1]
    # tau_eff = 1/4*2 + 3/4*4 = 0.5 + 3 = 3.5
    # x+ = [1, 1] - 3.5 * [-0.5, 1] = [1 + 1.75, 1 - 3.5] = [2.75, -2.5]
    # (FedAvg would give (1*[-1, 5] + 3*[5, -7])/4 = [14, -16]/4 = [3.5, -4].)
    g = {"w": torch.tensor([1.0, 1.0]), "steps": torch.tensor(10)}
    a = ClientUpdate("a", 1, {"w": torch.tensor([-1.0, 5.0]), "steps": torch.tensor(12)}, num_steps=2)
    b = ClientUpdate("b", 3, {"w": torch.tensor([5.0, -7.0]), "steps": torch.tensor(14)}, num_steps=4)
    out = run(FedNova(), g, [a, b])
    assert out["w"].tolist() == [2.75, -2.5]
    assert out["w"].dtype == torch.float32
    # integer buffer carried as in FedAvg: increments +2 (n=1), +4 (n=3): (2 + 12)/4 = 3.5 -> rounds to 4 -> 14
    assert out["steps"].item() == 14
    assert run(FedAvg(), g, [a, b])["w"].tolist() == [3.5, -4.0]


def test_extra_fednova_a_overrides_num_steps():
    # x = 0. A: n=1, y=2, a=extra 4 (num_steps 100 ignored) -> d_A = -2/4 = -0.5
    #        B: n=1, y=6, a=2                               -> d_B = -6/2 = -3
    # p = [1/2, 1/2]: Σ p d = -1.75;  tau_eff = (4 + 2)/2 = 3;  x+ = 0 - 3*(-1.75) = 5.25
    g = {"w": torch.zeros(1, dtype=torch.float64)}
    a = ClientUpdate("a", 1, {"w": torch.tensor([2.0], dtype=torch.float64)}, num_steps=100, extra={"fednova_a": 4.0})
    b = ClientUpdate("b", 1, {"w": torch.tensor([6.0], dtype=torch.float64)}, num_steps=2)
    assert run(FedNova(), g, [a, b])["w"].tolist() == [5.25]


def test_equal_a_is_fedavg():
    # a_i all equal to 3: tau_eff = 3, x+ = x + 3 Σ p_i (y_i - x)/3 = Σ p_i y_i.
    # x = 0, y = [1, 4], n = [1, 3]: (1 + 12)/4 = 3.25
    g = {"w": torch.zeros(1)}
    ups = [ClientUpdate("a", 1, {"w": torch.tensor([1.0])}, num_steps=3),
           ClientUpdate("b", 3, {"w": torch.tensor([4.0])}, num_steps=3)]
    assert run(FedNova(), g, ups)["w"].tolist() == [3.25]


@pytest.mark.parametrize("steps, extra", [(0, {}), (3, {"fednova_a": 0.0}), (3, {"fednova_a": -1}),
                                          (3, {"fednova_a": "x"}), (3, {"fednova_a": float("nan")})])
def test_missing_or_bad_a_is_rejected_before_anything_changes(steps, extra):
    agg = FedNova().begin({"w": torch.zeros(1)})
    with pytest.raises(InvalidUpdate):
        agg.add(ClientUpdate("a", 1, {"w": torch.ones(1)}, num_steps=steps, extra=extra))
    assert agg.count == 0


# ---- ||a_i||_1 -------------------------------------------------------------------------

def test_fednova_a_vanilla_sgd_is_tau():
    assert fednova_a(5) == 5.0


def test_fednova_a_momentum():
    # rho = 0.5, tau = 3: Σ_{s=1}^{3} (1 - 0.5^s)/(1 - 0.5) = (0.5 + 0.75 + 0.875)/0.5 = 2.125/0.5 = 4.25
    # closed form [tau - rho(1 - rho^tau)/(1 - rho)]/(1 - rho) = [3 - 0.5*0.875/0.5]/0.5 = 2.125/0.5 = 4.25
    assert fednova_a(3, momentum=0.5) == pytest.approx(4.25, abs=1e-12)


def test_fednova_a_proximal():
    # alpha = lr*mu = 0.1*2 = 0.2, tau = 3: 1 + 0.8 + 0.64 = 2.44 = (1 - 0.8^3)/0.2 = 0.488/0.2
    assert fednova_a(3, proximal_mu=2.0, lr=0.1) == pytest.approx(2.44, abs=1e-12)


def test_fednova_a_momentum_and_proximal():
    # rho = 0.5, lr = 0.1, mu = 2, tau = 2; z_k = y_k - x, u_k = rho u_{k-1} + g_k + mu z_k, z_{k+1} = z_k - lr u_k
    #   u_0 = g_0,  z_1 = -0.1 g_0
    #   u_1 = 0.5 g_0 + g_1 + 2(-0.1 g_0) = 0.3 g_0 + g_1,  z_2 = -0.1 g_0 - 0.1(0.3 g_0 + g_1) = -0.1(1.3 g_0 + g_1)
    # a = [1.3, 1],  ||a||_1 = 2.3
    assert fednova_a(2, momentum=0.5, proximal_mu=2.0, lr=0.1) == pytest.approx(2.3, abs=1e-12)


@pytest.mark.parametrize("tau, rho, mu, lr", [(1, 0.0, 0.0, 0.1), (7, 0.9, 0.0, 0.05), (5, 0.0, 0.5, 0.2),
                                              (6, 0.9, 0.01, 0.05), (4, 0.3, 1.0, 0.1)])
def test_fednova_a_matches_torch_sgd(tau, rho, mu, lr):
    # Independent oracle: PyTorch's own SGD. With a linear loss g·w every stochastic gradient is g, so
    # y - x = -lr * ||a||_1 * g exactly when the proximal term (mu/2)||w - x||^2 is added to the loss.
    torch.manual_seed(tau)
    x = torch.randn(4, dtype=torch.float64)
    gvec = torch.randn(4, dtype=torch.float64)
    w = torch.nn.Parameter(x.clone())
    opt = torch.optim.SGD([w], lr=lr, momentum=rho)
    for _ in range(tau):
        opt.zero_grad()
        loss = gvec @ w + 0.5 * mu * ((w - x) ** 2).sum()
        loss.backward()
        opt.step()
    observed = ((x - w.detach()) / (lr * gvec)).mean().item()
    assert fednova_a(tau, momentum=rho, proximal_mu=mu, lr=lr) == pytest.approx(observed, rel=1e-9)


def test_fednova_a_rejects_bad_arguments():
    for kwargs in ({"num_steps": 0}, {"num_steps": 3, "momentum": 1.0}, {"num_steps": 3, "proximal_mu": 0.1}):
        with pytest.raises(ValueError):
            fednova_a(**kwargs)
