"""The job spec's privacy section: bounded values, and combinations refused with the reason."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from fedbus.coordinator.factory import budget_for, rule_for
from fedbus.jobspec import JobSpec
from fedbus.privacy.central import DpFedAvg
from fedbus.transforms.factory import build_worker_pipeline

DP = {"mode": "central", "noise_multiplier": 1.0, "clip": {"fixed": 1.0}, "target_delta": 1e-5, "max_epsilon": 8.0}


def job(dp: dict | None = None, **overrides) -> JobSpec:
    spec = {"job": "j", "task": "fedbus.tasks.digits:task", "rounds": 3,
            "cohort": {"min_workers": 10, "min_updates": 8}, "privacy": {"dp": {**DP, **(dp or {})}}}
    return JobSpec.model_validate({**spec, **overrides})


def test_central_job_builds_the_dp_rule_and_budget():
    j = job()
    rule = rule_for(j)
    assert isinstance(rule, DpFedAvg) and rule.mode == "central"
    assert budget_for(j).max_epsilon == 8.0
    assert build_worker_pipeline(j).names == ("encode",)


def test_distributed_job_noises_on_the_worker_with_the_least_quorum():
    j = job({"mode": "distributed", "noise_multiplier": 2.0, "clip": {"fixed": 0.5}})
    pipeline = build_worker_pipeline(j)
    assert pipeline.names == ("clip", "dp_noise", "encode")
    assert pipeline.transforms[1].std == pytest.approx(2.0 * 0.5 / 8 ** 0.5)  # q = min_updates = 8


@pytest.mark.parametrize("dp, overrides, reason", [
    ({}, {"mode": "async"}, "mode: sync"),
    ({}, {"strategy": {"name": "median"}}, "use fedavg or fedprox"),
    ({}, {"strategy": {"name": "fedavg", "norm_bound": {"max_norm": 1.0}}}, "norm_bound"),
    ({}, {"late_updates": "next_round"}, "late_updates: drop"),
    ({}, {"deterministic": True}, "CSPRNG"),
    ({"accountant": "pld"}, {"cohort": {"min_workers": 10, "size": 5, "min_updates": 4}}, "without replacement"),
    ({"mode": "distributed", "clip": {"adaptive": {}}}, {}, "mode: central"),
    ({"clip": {"adaptive": {"count_noise": 0.4}}}, {}, "count_noise"),
    ({"clip": {"fixed": 1.0, "adaptive": {}}}, {}, "exactly one"),
    ({"clip": {}}, {}, "exactly one"),
    ({"max_epsilon": 0}, {}, "greater than 0"),
    ({"target_delta": 1.0}, {}, "less than 1"),
    ({"noise_multiplier": float("inf")}, {}, "finite"),
])
def test_refused_with_the_reason(dp, overrides, reason):
    with pytest.raises(ValidationError, match=reason):
        job(dp, **overrides)


def test_adaptive_count_noise_defaults_to_a_twentieth_of_the_cohort():
    adaptive = {"noise_multiplier": 0.5, "clip": {"adaptive": {}}}
    assert job(adaptive).dp_count_noise() == 0.5  # m = min_workers = 10
    assert job(adaptive, cohort={"min_workers": 40, "size": 20, "min_updates": 10}
               ).dp_count_noise() == 1.0


def test_distributed_needs_a_counted_quorum():
    with pytest.raises(ValidationError, match="min_updates as a count"):
        job({"mode": "distributed"}, cohort={"min_workers": 10, "min_updates": 0.8})
