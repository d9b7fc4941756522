"""Build a RoundStateMachine from a job spec: the one place job settings meet the core."""

from __future__ import annotations

import dataclasses

from fedbus.aggregation.base import AggregationRule, State
from fedbus.aggregation.fednova import FedNova
from fedbus.aggregation.specs import build_rule, build_server_optimizer
from fedbus.coordinator.rounds import RoundPolicy, RoundStateMachine
from fedbus.crypto.federation import Federation
from fedbus.jobspec import JobSpec


def policy_from(job: JobSpec, federation: Federation | None = None) -> RoundPolicy:
    return RoundPolicy(
        rounds=job.rounds,
        min_workers=job.cohort.min_workers,
        cohort_size=job.cohort.size,
        min_updates=job.cohort.min_updates,
        round_deadline_ms=int(job.round_deadline_s * 1000),
        wait_for_workers_ms=int(job.cohort.wait_for_workers_s * 1000),
        liveness_ms=int(max(5.0, 5 * job.transport.heartbeat_s) * 1000),
        final_eval=job.evaluation.final_round and job.evaluation.federated,
        final_eval_deadline_ms=int(job.round_deadline_s * 1000),
        seed=job.seed,
        max_samples=job.security.max_samples_per_update,
        deterministic=job.deterministic,
        epochs=job.train.epochs,
        batch_size=job.train.batch_size,
        max_samples_by_worker=({p.id: p.max_samples for p in federation.workers() if p.max_samples is not None}
                               if federation is not None else {}),
    )


def _innermost(rule: AggregationRule) -> AggregationRule:
    while hasattr(rule, "rule"):  # pre-filters and pre-aggregations wrap a rule
        rule = rule.rule
    return rule


def rule_for(job: JobSpec) -> AggregationRule:
    """The job's rule, told what it needs of the job's local training to bound claims."""
    rule = build_rule(job.strategy)
    inner = _innermost(rule)
    if isinstance(inner, FedNova):
        inner.max_a_per_step = 1.0 / (1.0 - job.train.momentum)
    return rule


def machine_for(job: JobSpec, initial_state: State, num_workers_total: int,
                federation: Federation | None = None, *, reopened_min_ms: int = 0) -> RoundStateMachine:
    policy = dataclasses.replace(policy_from(job, federation), reopened_min_ms=reopened_min_ms)
    return RoundStateMachine(policy, initial_state, rule=rule_for(job),
                             optimizer=build_server_optimizer(job.server_optimizer),
                             num_workers_total=num_workers_total)
