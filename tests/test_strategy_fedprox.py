"""FedProx (Li et al. 2020): the worker adds (mu/2)·||w − w_t||² (squared norm) to its loss."""

from __future__ import annotations

import pytest
import torch

from fedbus.aggregation.fedprox import proximal_term


def test_proximal_term_is_half_mu_squared_norm():
    # w - w_t = [3, 4] and [1]: ||.||^2 = 9 + 16 + 1 = 26;  mu = 0.1: 0.05 * 26 = 1.3
    lin = torch.nn.Linear(2, 1)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[3.0, 4.0]]))
        lin.bias.copy_(torch.tensor([1.0]))
    g = {"weight": torch.zeros(1, 2), "bias": torch.zeros(1)}
    term = proximal_term(lin.named_parameters(), g, mu=0.1)
    assert term.item() == pytest.approx(1.3)
    term.backward()  # gradient mu (w - w_t) = [0.3, 0.4], [0.1]
    assert lin.weight.grad[0].tolist() == pytest.approx([0.3, 0.4])
    assert lin.bias.grad.tolist() == pytest.approx([0.1])


def test_frozen_parameters_are_skipped():
    lin = torch.nn.Linear(1, 1)
    lin.bias.requires_grad_(False)
    with torch.no_grad():
        lin.weight.fill_(2.0)
        lin.bias.fill_(100.0)
    # only the weight: (1/2) * 1 * 2^2 = 2
    g = {"weight": torch.zeros(1, 1), "bias": torch.zeros(1)}
    assert proximal_term(lin.named_parameters(), g, 1.0).item() == 2.0
