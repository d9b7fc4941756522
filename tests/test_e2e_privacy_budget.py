"""The privacy budget over NATS: real nats-server, coordinator and workers as CLI processes.

The job asks for 6 rounds, but its max_epsilon leaves room for exactly 3 (distributed DP:
each worker clips and adds its noise share). The coordinator is SIGKILLed once round 2
has closed and resumed with --resume: the resumed coordinator must continue the committed
budget, so the job ends after round 3 with ``privacy_budget_exhausted``. A budget lost on
resume would allow three more rounds and end with more.
"""

from __future__ import annotations

import json

import pytest

from fedbus.privacy.accountant import RoundEvent, epsilon
from tests.e2e_support import LocalFederation, small_job, wait_for_round

pytestmark = pytest.mark.e2e

Z, DELTA, WORKERS = 3.0, 1e-5, 4


def eps_after(rounds: int) -> float:
    # Every round's cohort is the whole pool of live workers (cohort.size unset): no sampling.
    return epsilon([(RoundEvent(WORKERS, WORKERS, Z), rounds)], DELTA)


def test_budget_stops_the_job_before_it_is_exceeded_and_survives_a_coordinator_kill(nats_server, tmp_path):
    max_epsilon = (eps_after(3) + eps_after(4)) / 2
    job = small_job("e2e-dp-budget", rounds=6, min_workers=WORKERS, min_updates=WORKERS, deadline_s=60.0,
                    evaluation={"final_round": False},
                    privacy={"dp": {"mode": "distributed", "noise_multiplier": Z, "clip": {"fixed": 1.0},
                                    "target_delta": DELTA, "max_epsilon": max_epsilon}})
    fed = LocalFederation(tmp_path, nats_server.url, job, WORKERS)
    try:
        fed.start_coordinator()
        for w in fed.federation.workers():
            # Slowed, so that round 3 (the last the budget allows) is still open at the kill:
            # unslowed, a round takes ~0.1 s and the job could end before the kill lands.
            fed.start_worker(w.id, "--simulate-slowdown", "20")
        wait_for_round(fed, 2, timeout=120)
        fed.kill("coordinator")  # nothing survives but what was committed
        assert fed.start_coordinator(resume=True).wait(timeout=180) == 0, fed.tail_logs()
        workers = fed.wait_all(timeout=30)
        assert all(workers[w.id] == 0 for w in fed.federation.workers()), (workers, fed.tail_logs())
    finally:
        fed.stop()

    summary = fed.summary()
    assert summary["reason"] == "privacy_budget_exhausted", fed.tail_logs()
    assert summary["incarnations"] == 2, fed.tail_logs()  # (the resumed coordinator made round 3)
    assert summary["rounds_completed"] == 3 and [r["round"] for r in summary["rounds"]] == [1, 2, 3]
    expected = [eps_after(k) for k in (1, 2, 3)]
    assert [r["dp_epsilon"] for r in summary["rounds"]] == pytest.approx(expected, rel=1e-9)
    dp = summary["privacy"]["client_level"]
    assert dp["epsilon"] == pytest.approx(expected[-1], rel=1e-9) and dp["epsilon"] <= max_epsilon
    assert dp["rounds_accounted"] == 3 and dp["mode"] == "distributed"
    # ε after every round in the log, from both incarnations.
    logged = [json.loads(line) for name in ("coordinator.log", "coordinator-resumed.log")
              for line in (tmp_path / "logs" / name).read_text().splitlines() if '"privacy.epsilon"' in line]
    assert [e["round"] for e in logged if e["round"] is not None] == [1, 2, 3]
