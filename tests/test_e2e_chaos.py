"""Issue 7, acceptance 4: chaos end-to-end through the CLI with a real nats-server.

A 36-round job with six workers; the coordinator is SIGKILLed 11 times at seeded random
moments and resumed each time with ``--resume`` (once only after waiting longer than
the job's ``max_age_s``, killed while it held updates), two workers are SIGKILLed for
good part way, and the nats-server is SIGKILLed and restarted on the same port and store
once. The job must complete every round with model versions strictly increasing, no
round closed twice, no honest update lost, one summary.json counting every incarnation,
and one verifiable, contiguous audit chain for the whole job. See tests/chaos_support.py
for the plan, the harness and the precise definition of a lost update.

FEDBUS_CHAOS_SEED picks another plan (the seed is printed on failure).
"""

from __future__ import annotations

import pytest

from tests.chaos_support import ChaosError, ChaosPlan, ChaosRun, analyse, chaos_job, env_seed, tail

pytestmark = pytest.mark.e2e

SEED = 20261129


@pytest.mark.timeout(420)
def test_chaos_coordinator_kills_worker_deaths_and_broker_restart_lose_nothing(tmp_path):
    seed = env_seed(SEED)
    plan = ChaosPlan.draw(seed, kills=11)
    job = chaos_job()
    run = ChaosRun(tmp_path, plan, job, budget_s=330)
    try:
        outcome = run.execute()
    except ChaosError as exc:
        # The plan could not be carried out (e.g. the job ended early): show what happened.
        report = analyse(tmp_path, job, run.outcome)
        pytest.fail(f"chaos run aborted: {exc}\nseed {seed}, plan {plan}\n" + "\n".join(run.outcome.timeline)
                    + "\n" + report.describe() + f"\n--- logs\n{run.fed.tail_logs() if run.fed else ''}")
    report = analyse(tmp_path, job, outcome)
    context = (f"seed {seed}, plan {plan}\n" + "\n".join(outcome.timeline) + "\n" + report.describe()
               + f"\n--- last coordinator log\n{tail(run.coordinator_log(outcome.coordinator_starts - 1))}")
    print(context)

    # The chaos really happened as required.
    assert outcome.coordinator_kills >= 10 and outcome.resumes == outcome.coordinator_kills, context
    assert outcome.long_waits_s and min(outcome.long_waits_s) > job.security.max_age_s, context
    assert len(outcome.workers_killed) == 2 and outcome.nats_restarts == 1, context
    assert job.rounds >= 30
    # And the job came through it whole.
    assert not report.problems, context
    live = [w for w in outcome.worker_exit_codes if w not in outcome.workers_killed]
    assert all(outcome.worker_exit_codes[w] == 0 for w in live), context  # they got the job.done
