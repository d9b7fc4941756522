"""Our accountant against dp-accounting's own example values (its test suite, v0.6.0).

- ``rdp/rdp_privacy_accountant_test.py::test_compute_epsilon_delta_gaussian``: a Gaussian
  with noise multiplier 4.530877117 is exactly (1, 1e-6)-DP.
- ``pld/pld_privacy_accountant_test.py::test_gaussian_basic``: three Gaussians of
  multiplier sqrt(3) compose to epsilon 1 at delta 0.126936.

Both are stated for a sensitivity-1 query. fedbus accounts under replace-one, where the
sum of clipped deltas moves by 2C: a round with z = 2 · 4.530877117 is that same Gaussian.
"""

from __future__ import annotations

import math

import pytest
from dp_accounting import dp_event
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import rdp_privacy_accountant

from fedbus.privacy.accountant import RDP_ORDERS, RoundEvent, epsilon, noise_multiplier_for
from fedbus.privacy.budget import PrivacyBudget


def test_rdp_matches_dp_accounting_gaussian_example():
    eps = epsilon([(RoundEvent(10, 10, 2 * 4.530877117), 1)], 1e-6, "rdp")
    # Their example uses 99,000 orders; our coarser grid may only overestimate, slightly.
    assert 1.0 <= eps < 1.0 + 5e-3


def test_pld_matches_dp_accounting_gaussian_example():
    eps = epsilon([(RoundEvent(10, 10, 2 * math.sqrt(3)), 3)], 0.126936, "pld")
    assert eps == pytest.approx(1.0, abs=1e-3)


def test_sampled_rounds_are_dp_accountings_sampling_without_replacement():
    ours = epsilon([(RoundEvent(100, 10, 1.2), 50)], 1e-5, "rdp")
    acc = rdp_privacy_accountant.RdpAccountant(list(RDP_ORDERS), NeighboringRelation.REPLACE_ONE)
    acc.compose(dp_event.SampledWithoutReplacementDpEvent(100, 10, dp_event.GaussianDpEvent(0.6)), 50)
    assert ours == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    # Sampling amplifies: a tenth of the pool per round costs far less than all of it.
    assert ours < 0.5 * epsilon([(RoundEvent(100, 100, 1.2), 50)], 1e-5, "rdp")


def test_pld_refuses_sampling_without_replacement():
    with pytest.raises(ValueError, match="does not support"):
        epsilon([(RoundEvent(100, 10, 1.0), 1)], 1e-5, "pld")


def test_pld_is_at_most_rdp():
    rounds = [(RoundEvent(10, 10, 3.0), 20)]
    assert epsilon(rounds, 1e-5, "pld") <= epsilon(rounds, 1e-5, "rdp")


def test_noise_multiplier_for_hits_the_target_from_above():
    z = noise_multiplier_for(3.0, 1e-5, 20, 100, 100)
    assert epsilon([(RoundEvent(100, 100, z), 20)], 1e-5) <= 3.0
    assert epsilon([(RoundEvent(100, 100, z * 0.99), 20)], 1e-5) > 3.0


def test_budget_allows_exactly_the_rounds_under_max_epsilon_and_survives_a_round_trip():
    z, delta = 4.0, 1e-5
    eps = [epsilon([(RoundEvent(10, 10, z), k)], delta) for k in (1, 2, 3, 4)]
    budget = PrivacyBudget(z, delta, max_epsilon=(eps[2] + eps[3]) / 2)  # room for exactly 3 rounds
    for k in range(3):
        assert budget.allows(10, 10)
        budget.opened(10, 10)
        assert budget.aggregated() == pytest.approx(eps[k])
    assert not budget.allows(10, 10)
    budget.opened(5, 2)  # e.g. committed with an open round, then the coordinator died
    again = PrivacyBudget(z, delta, budget.max_epsilon)
    again.load_state_dict(budget.state_dict())
    assert again.epsilon == budget.epsilon and again.rounds_accounted == 3 and again.pending == (5, 2)
    again.failed()  # a failed round released nothing
    assert again.aggregated() == budget.epsilon


def test_budget_refuses_a_forged_round_shape():
    budget = PrivacyBudget(1.0, 1e-5, 10.0)
    import torch
    with pytest.raises(ValueError):
        budget.load_state_dict({"rounds": torch.tensor([[5, 9, 1]])})  # 9 sampled out of 5
