"""Build a RoundStateMachine from a job spec: the one place job settings meet the core."""

from __future__ import annotations

import dataclasses

from fedbus.aggregation.base import AggregationRule, State
from fedbus.aggregation.fednova import FedNova
from fedbus.aggregation.specs import build_rule, build_server_optimizer
from fedbus.aggregation.staleness import from_spec as staleness_from_spec
from fedbus.coordinator.rounds import RoundPolicy, RoundStateMachine
from fedbus.secagg.rounds import unmask_grace_ms
from fedbus.coordinator.versions import AsyncPolicy, VersionStateMachine
from fedbus.crypto.federation import Federation
from fedbus.jobspec import JobSpec
from fedbus.privacy.budget import PrivacyBudget
from fedbus.privacy.central import DpFedAvg


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
        close_at_quorum=job.cohort.close_at_quorum,
        unmask_grace_ms=unmask_grace_ms(job),
        late_updates=job.late_updates,
        staleness=staleness_from_spec(job.async_.staleness),
    )


def _innermost(rule: AggregationRule) -> AggregationRule:
    while hasattr(rule, "rule"):  # pre-filters and pre-aggregations wrap a rule
        rule = rule.rule
    return rule


def rule_for(job: JobSpec) -> AggregationRule:
    """The job's rule, told what it needs of the job's local training to bound claims.

    With ``privacy.dp`` the server's rule is DP-FedAvg (FedProx keeps its client step)."""
    if (dp := job.privacy.dp) is not None:
        clip = dp.clip.fixed if dp.clip.fixed is not None else dp.clip.adaptive.initial
        return DpFedAvg(dp.mode, dp.noise_multiplier, clip, adaptive=dp.clip.adaptive,
                        count_noise=job.dp_count_noise())
    rule = build_rule(job.strategy)
    inner = _innermost(rule)
    if isinstance(inner, FedNova):
        inner.max_a_per_step = 1.0 / (1.0 - job.train.momentum)
    return rule


def async_policy_from(job: JobSpec, federation: Federation | None = None) -> AsyncPolicy:
    a = job.async_
    return AsyncPolicy(base=policy_from(job, federation), buffer_size=a.buffer_size, concurrency=a.concurrency,
                       staleness=staleness_from_spec(a.staleness), max_staleness=a.max_staleness,
                       algorithm=a.algorithm, server_lr=a.server_lr, alpha=a.alpha)


def history_versions(job: JobSpec) -> int:
    """Past models the machine needs after a resume, besides the current one: the bases of
    stale updates (async) or of the last round's late updates (late_updates: next_round)."""
    if job.mode == "async":
        return job.async_.max_staleness
    return 1 if job.late_updates == "next_round" else 0


def machine_for(job: JobSpec, initial_state: State, num_workers_total: int,
                federation: Federation | None = None, *,
                reopened_min_ms: int = 0) -> RoundStateMachine | VersionStateMachine:
    """The job's machine: sync rounds, or async versions (same events and actions)."""
    rule, optimizer = rule_for(job), build_server_optimizer(job.server_optimizer)
    if job.mode == "async":
        policy = async_policy_from(job, federation)
        policy = dataclasses.replace(policy, base=dataclasses.replace(policy.base, reopened_min_ms=reopened_min_ms))
        return VersionStateMachine(policy, initial_state, rule=rule, optimizer=optimizer,
                                   num_workers_total=num_workers_total)
    policy = dataclasses.replace(policy_from(job, federation), reopened_min_ms=reopened_min_ms)
    return RoundStateMachine(policy, initial_state, rule=rule, optimizer=optimizer,
                             num_workers_total=num_workers_total, privacy=budget_for(job))


def budget_for(job: JobSpec) -> PrivacyBudget | None:
    dp = job.privacy.dp
    return None if dp is None else PrivacyBudget(dp.noise_multiplier, dp.target_delta, dp.max_epsilon, dp.accountant)
