"""Server optimizers on the pseudo-gradient Δ_t = proposal_t − x_t.

sgd: x + lr·Δ.  momentum (FedAvgM, Hsu et al. 2019): v = beta·v + Δ, x + lr·v.
adagrad/adam/yogi (Reddi et al. 2021, Algorithm 2): m = b1·m + (1−b1)Δ, v per optimizer (v_{−1} = tau²),
x + eta·m/(√v + tau); optional bias correction at 1-based step t: m/(1−b1^t), v/(1−b2^t) (moments from 0).
Expected values are worked out by hand (square roots left as math.sqrt of the hand-computed radicand).
"""

from __future__ import annotations

import math

import pytest
import torch

from fedbus.aggregation.fedadagrad import FedAdagrad
from fedbus.aggregation.fedadam import FedAdam
from fedbus.aggregation.fedavgm import ServerMomentum
from fedbus.aggregation.fedyogi import FedYogi
from fedbus.aggregation.server_sgd import ServerSGD


def st(v, k=0):
    return {"w": torch.tensor([v], dtype=torch.float64), "k": torch.tensor(k)}


def two_steps(opt, delta1, delta2, x0=0.0):
    """x1 = opt(x0, x0 + delta1); x2 = opt(x1, x1 + delta2)."""
    x1 = opt.step(st(x0), st(x0 + delta1, 5))["w"].item()
    x2 = opt.step(st(x1), st(x1 + delta2, 7))["w"].item()
    return x1, x2


def test_sgd():
    # x = [1, -2], proposal [3, 0] -> Δ = [2, 2]; lr 0.5 -> [2, -1]; the counter comes from the proposal
    out = ServerSGD(0.5).step({"w": torch.tensor([1.0, -2.0]), "k": torch.tensor(1)},
                              {"w": torch.tensor([3.0, 0.0]), "k": torch.tensor(4)})
    assert out["w"].tolist() == [2.0, -1.0] and out["w"].dtype == torch.float32 and out["k"].item() == 4


def test_sgd_lr_one_is_the_proposal_bit_for_bit():
    p = {"w": torch.tensor([0.1, 1e-8, 3.3333333])}
    assert torch.equal(ServerSGD(1.0).step({"w": torch.tensor([7.0, -1.0, 1e6])}, p)["w"], p["w"])


def test_momentum_two_steps():
    # beta 0.9, lr 1: step 1 Δ = 1: v = 1, x1 = 1;  step 2 Δ = 2: v = 0.9*1 + 2 = 2.9, x2 = 1 + 2.9 = 3.9
    assert two_steps(ServerMomentum(lr=1.0, beta=0.9), 1.0, 2.0) == pytest.approx((1.0, 3.9), abs=1e-12)
    # lr 0.5: x1 = 0.5*1 = 0.5;  v2 = 2.9, x2 = 0.5 + 0.5*2.9 = 1.95
    assert two_steps(ServerMomentum(lr=0.5, beta=0.9), 1.0, 2.0) == pytest.approx((0.5, 1.95), abs=1e-12)


def test_adam_paper_no_bias_correction():
    # b1 0.5, b2 0.75, tau 0.5, eta 1; m_{-1} = 0, v_{-1} = tau^2 = 0.25
    # step 1, Δ = 2: m = 0.5*2 = 1;  v = 0.75*0.25 + 0.25*4 = 1.1875;  x1 = 1/(√1.1875 + 0.5)
    # step 2, Δ = 4: m = 0.5*1 + 0.5*4 = 2.5;  v = 0.75*1.1875 + 0.25*16 = 4.890625;  x2 = x1 + 2.5/(√4.890625 + 0.5)
    x1 = 1 / (math.sqrt(1.1875) + 0.5)
    x2 = x1 + 2.5 / (math.sqrt(4.890625) + 0.5)
    assert two_steps(FedAdam(lr=1.0, beta1=0.5, beta2=0.75, tau=0.5), 2.0, 4.0) == pytest.approx((x1, x2), abs=1e-12)


def test_adam_bias_correction_counts_steps_from_one():
    # moments from 0.  step t=1, Δ = 2: m = 1, v = 0.25*4 = 1; m̂ = 1/(1-0.5) = 2, v̂ = 1/(1-0.75) = 4
    #   x1 = 0 + 2/(√4 + 0.5) = 2/2.5 = 0.8            (m̂_1 = Δ_1 and v̂_1 = Δ_1² exactly)
    # step t=2, Δ = 4: m = 0.5*1 + 0.5*4 = 2.5, v = 0.75*1 + 0.25*16 = 4.75
    #   m̂ = 2.5/(1-0.25) = 2.5/0.75,  v̂ = 4.75/(1-0.5625) = 4.75/0.4375
    #   x2 = 0.8 + (2.5/0.75)/(√(4.75/0.4375) + 0.5)
    x2 = 0.8 + (2.5 / 0.75) / (math.sqrt(4.75 / 0.4375) + 0.5)
    got = two_steps(FedAdam(lr=1.0, beta1=0.5, beta2=0.75, tau=0.5, bias_correction=True), 2.0, 4.0)
    assert got == pytest.approx((0.8, x2), abs=1e-12)
    # The off-by-one version (1 - beta^(t+1)) would give at step 1: m̂ = 1/0.75, v̂ = 1/0.4375
    off_by_one_x1 = (1 / 0.75) / (math.sqrt(1 / 0.4375) + 0.5)  # = 0.6627...
    assert abs(got[0] - off_by_one_x1) > 0.1


def test_adam_bias_correction_matches_torch_adam():
    # Independent oracle: torch.optim.Adam with grad = -Δ, eps = tau (added outside the square root, as here).
    torch.manual_seed(1)
    opt = FedAdam(lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3, bias_correction=True)
    p = torch.nn.Parameter(torch.zeros(6, dtype=torch.float64))
    ref = torch.optim.Adam([p], lr=0.1, betas=(0.9, 0.99), eps=1e-3)
    x = {"w": torch.zeros(6, dtype=torch.float64)}
    for _ in range(5):
        delta = torch.randn(6, dtype=torch.float64)
        x = opt.step(x, {"w": x["w"] + delta})
        p.grad = -delta
        ref.step()
        assert torch.allclose(x["w"], p.detach(), atol=1e-12, rtol=0)


def test_adagrad():
    # b1 0.5, tau 1.5, eta 1; v_{-1} = 2.25
    # step 1, Δ = 2: m = 1, v = 2.25 + 4 = 6.25, x1 = 1/(2.5 + 1.5) = 0.25
    # step 2, Δ = 1: m = 0.5 + 0.5 = 1, v = 6.25 + 1 = 7.25, x2 = 0.25 + 1/(√7.25 + 1.5)
    x2 = 0.25 + 1 / (math.sqrt(7.25) + 1.5)
    assert two_steps(FedAdagrad(lr=1.0, beta1=0.5, tau=1.5), 2.0, 1.0) == pytest.approx((0.25, x2), abs=1e-12)


def test_adagrad_without_momentum_matches_torch_adagrad():
    # beta1 = 0: m = Δ, v = tau² + ΣΔ²  ==  torch Adagrad with initial_accumulator_value = tau², eps = tau
    torch.manual_seed(2)
    opt = FedAdagrad(lr=0.3, beta1=0.0, tau=0.1)
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    ref = torch.optim.Adagrad([p], lr=0.3, eps=0.1, initial_accumulator_value=0.01)
    x = {"w": torch.zeros(4, dtype=torch.float64)}
    for _ in range(4):
        delta = torch.randn(4, dtype=torch.float64)
        x = opt.step(x, {"w": x["w"] + delta})
        p.grad = -delta
        ref.step()
        assert torch.allclose(x["w"], p.detach(), atol=1e-12, rtol=0)


def test_yogi_both_signs():
    # b1 0.5, b2 0.75, tau 0.5, eta 1; v_{-1} = 0.25
    # step 1, Δ = 2: Δ² = 4 > v -> sign(0.25 - 4) = -1 -> v = 0.25 + 0.25*4 = 1.25;  m = 1
    #   x1 = 1/(√1.25 + 0.5)
    # step 2, Δ = 0.5: Δ² = 0.25 < v -> sign(+) -> v = 1.25 - 0.25*0.25 = 1.1875;  m = 0.5*1 + 0.5*0.5 = 0.75
    #   x2 = x1 + 0.75/(√1.1875 + 0.5)        (Adam would have v = 0.75*1.25 + 0.0625 = 1.0)
    x1 = 1 / (math.sqrt(1.25) + 0.5)
    x2 = x1 + 0.75 / (math.sqrt(1.1875) + 0.5)
    assert two_steps(FedYogi(lr=1.0, beta1=0.5, beta2=0.75, tau=0.5), 2.0, 0.5) == pytest.approx((x1, x2), abs=1e-12)


def test_buffers_come_from_the_proposal_and_dtypes_are_kept():
    for opt in (ServerSGD(0.3), ServerMomentum(), FedAdagrad(), FedAdam(), FedYogi()):
        out = opt.step({"w": torch.zeros(2, dtype=torch.float16), "k": torch.tensor(1), "m": torch.tensor([True])},
                       {"w": torch.ones(2, dtype=torch.float16), "k": torch.tensor(9), "m": torch.tensor([False])})
        assert out["w"].dtype == torch.float16 and out["k"].item() == 9 and out["m"].tolist() == [False]


@pytest.mark.parametrize("make", [lambda: FedAdam(tau=0.0), lambda: FedYogi(beta2=1.0), lambda: ServerSGD(0.0),
                                  lambda: ServerMomentum(beta=1.0), lambda: FedAdagrad(lr=-1)])
def test_bad_hyperparameters(make):
    with pytest.raises(ValueError):
        make()
