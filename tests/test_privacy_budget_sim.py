"""The round machine asks the budget before each round (sans-I/O, through ``fedbus sim``)."""

from __future__ import annotations

import pytest

from fedbus.jobspec import JobSpec
from fedbus.privacy.accountant import RoundEvent, epsilon
from fedbus.sim import simulate


def test_sampled_central_job_stops_before_the_round_that_would_exceed_max_epsilon():
    z, delta = 2.0, 1e-5
    shape = RoundEvent(6, 3, z)  # 3 of 6 live workers per round, without replacement
    eps = [epsilon([(shape, k)], delta) for k in range(1, 5)]
    job = JobSpec.model_validate({
        "job": "j", "task": "fedbus.tasks.digits:task", "task_params": {"model": "mlp", "partition": "iid"},
        "rounds": 10, "cohort": {"min_workers": 6, "size": 3, "min_updates": 3},
        "train": {"epochs": 1}, "evaluation": {"federated": False},
        "privacy": {"dp": {"mode": "central", "noise_multiplier": z, "clip": {"fixed": 1.0},
                           "target_delta": delta, "max_epsilon": (eps[2] + eps[3]) / 2}}})
    result = simulate(job, 6)
    assert result.reason == "privacy_budget_exhausted"
    assert [r["dp_epsilon"] for r in result.rounds] == pytest.approx(eps[:3], rel=1e-12)
    assert all(r["accepted"] == 3 for r in result.rounds)
