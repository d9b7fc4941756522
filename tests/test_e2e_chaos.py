"""Issue 7, acceptance 4: chaos end-to-end through the CLI with a real nats-server.

A 36-round job with six workers; the coordinator is SIGKILLed 11 times at seeded random
moments and resumed each time with ``--resume`` (once only after waiting longer than
the job's ``max_age_s``, killed while it held updates), two workers are SIGKILLed for
good part way, and the nats-server is SIGKILLed and restarted on the same port and store
once. The job must complete every round with model versions strictly increasing, no
round closed twice, no honest update lost, one summary.json counting every incarnation,
and one verifiable, contiguous audit chain for the whole job. See tests/chaos_support.py
for the plan, the harness and the precise definition of a lost update.

FEDBUS_CHAOS_SEED picks another plan (the seed is printed on failure). The tests after
the e2e one feed ``analyse`` small hand-made runs, to show each check can fail.

Failures it has shown on real runs (each a named problem in the report it prints):
``summary incarnations N != coordinator starts M`` (an incarnation killed before it
closed a round never wrote summary.json); ``audit and summary disagree on the closed
rounds: ... only in summary [r]`` (a round whose closing commit landed just before the
kill was recovered into summary.json but never audited); ``rate_limited`` honest updates
when rounds were faster than the update budget;
``honest updates rejected: {'replayed_nonce': k}``: when the nats-server is SIGKILLed
within ~40 ms of a round's acks, the acks are lost and every update of that round is
redelivered right after the restart with num_delivered == 1, which the coordinator then
takes for replays; ``honest updates lost: ['w03@r5 ... (worker killed later)']``: updates
delivered to a coordinator that died come back only after the consumer's ack wait (10 s),
while the resumed coordinator reopens the round with a fresh round_deadline_s (3.5 s); a
live worker resends on the reopen, a dead one cannot, so the round closes without its
update and the late redelivery is rejected wrong_round and acked (seed 3). All fixed
by d320116, where seeds 20261129, 3 and 11 pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedbus.audit import GENESIS, ChainVerifier, seal_record
from fedbus.crypto.federation import Federation, FederationFile, Participant
from fedbus.crypto.keys import Identity
from tests.chaos_support import (ChaosError, ChaosOutcome, ChaosPlan, ChaosRun, analyse, chaos_job, env_seed,
                                 tail)

SEED = 20261129


@pytest.mark.e2e
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
        last = run.coordinator_log(max(0, run.outcome.coordinator_starts - 1))
        pytest.fail(f"chaos run aborted: {exc}\nseed {seed}, plan {plan}\n" + "\n".join(run.outcome.timeline)
                    + "\n" + report.describe() + f"\n--- logs\n{run.fed.tail_logs(8) if run.fed else ''}"
                    + f"\n--- last coordinator log ({last.name})\n{tail(last, 40)}")
    report = analyse(tmp_path, job, outcome)
    context = (f"seed {seed}, plan {plan}\n" + "\n".join(outcome.timeline) + "\n" + report.describe()
               + f"\n--- last coordinator log\n{tail(run.coordinator_log(outcome.coordinator_starts - 1))}")
    print(context)

    # The chaos really happened as required.
    assert outcome.coordinator_kills >= 10 and outcome.resumes == outcome.coordinator_kills, context
    assert outcome.long_waits_s and min(outcome.long_waits_s) > job.security.max_age_s, context
    # ... while the coordinator held updates: they came back older than max_age_s (a
    # stale_timestamp rejection of any of them is one of report.problems).
    assert outcome.held_at_long_wait_kill >= 1, context
    assert len(outcome.workers_killed) == 2 and outcome.nats_restarts == 1, context
    assert job.rounds >= 30
    # And the job came through it whole.
    assert not report.problems, context
    live = [w for w in outcome.worker_exit_codes if w not in outcome.workers_killed]
    assert len(live) == 4 and all(outcome.worker_exit_codes[w] == 0 for w in live), context  # got job.done


# ---- the analysis itself, on hand-made runs (no processes) -----------------------------

RUN = "r1795985560148-02091d2e"
T0 = "2026-11-29T20:00:"


def _log(path: Path, *records: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")


def _at(second: float) -> str:
    return f"{T0}{second:06.3f}Z"


def _tiny_run(tmp_path: Path, *, accepted_r2=("w01", "w02"), w02_sent_r2: float = 11.0,
              incarnations: int = 2, tamper: bool = False, close_twice: bool = False, audit_r2: bool = True,
              updates_accepted: int | None = None):
    """Two rounds, two workers, one resume: round 2 reopened at 10 s (deadline 13.5 s)."""
    job = chaos_job(rounds=2)
    logs = tmp_path / "logs"
    _log(logs / "coordinator-00.log",
         {"event": "round.opened", "round": 1, "timestamp": _at(1)},
         {"event": "round.closed", "round": 1, "status": "aggregated", "timestamp": _at(2)},
         {"event": "round.opened", "round": 2, "timestamp": _at(2.1)})
    _log(logs / "coordinator-01.log",
         {"event": "round.opened", "round": 2, "timestamp": _at(10)},
         {"event": "round.closed", "round": 2, "status": "aggregated", "timestamp": _at(11.5)},
         *([{"event": "round.closed", "round": 2, "status": "aggregated", "timestamp": _at(12)}]
           if close_twice else []))
    for w in ("w01", "w02"):
        _log(logs / f"{w}.log", {"event": "update.sent", "round": 1, "run": RUN, "timestamp": _at(1.5)})
    _log(logs / "w01.log", {"event": "update.sent", "round": 2, "run": RUN, "timestamp": _at(2.5)})
    _log(logs / "w02.log", {"event": "update.sent", "round": 2, "run": RUN, "timestamp": _at(w02_sent_r2)})
    rows = [{"round": 1, "model_version": 1, "status": "aggregated", "accepted": 2, "accepted_workers": ["w01", "w02"]},
            {"round": 2, "model_version": 2, "status": "aggregated", "accepted": len(accepted_r2),
             "accepted_workers": list(accepted_r2)}]
    (tmp_path / "summary.json").write_text(json.dumps({
        "run": RUN, "reason": "completed", "rounds_completed": 2, "final_accuracy": 0.95, "model_version": 2,
        "incarnations": incarnations,
        "updates_accepted": 2 + len(accepted_r2) if updates_accepted is None else updates_accepted,
        "updates_rejected": {}, "rounds": rows}))
    coordinator = Identity.generate("coordinator", "coordinator")
    federation = Federation(FederationFile(federation="t", participants=[Participant(**coordinator.participant_entry())]))
    verifier = ChainVerifier(job.job, "fedbus", federation)
    audit, prev = [], GENESIS
    for event, fields in (("job.started", {"run": RUN}),
                          ("round.closed", {"round": 1, "status": "aggregated", "model_version": 1,
                                            "accepted": ["w01", "w02"]}),
                          ("job.resumed", {"run": RUN}),
                          *([("round.closed", {"round": 2, "status": "aggregated", "model_version": 2,
                                               "accepted": list(accepted_r2)})] if audit_r2 else []),
                          ("job.done", {"run": RUN})):
        sealed = seal_record(coordinator, job.job, seq=len(audit) + 1, prev=prev, event=event, fields=fields,
                             ts_ms=1_700_000_000_000)
        prev, wire = sealed.hash, sealed.wire
        if tamper and len(audit) == 1:  # the stored round 1 close claims only w01 was accepted
            wire = wire.replace(b'"accepted":["w01","w02"]', b'"accepted":["w01"]')
        verifier.feed(len(audit) + 1, f"fedbus.{job.job}.audit.coordinator", wire)
        audit.append(sealed.record)
    problems = [p.describe() for p in verifier.finish(len(audit)).problems]
    outcome = ChaosOutcome(coordinator_starts=2, coordinator_kills=1, resumes=1, final_exit_code=0, audit=audit,
                           audit_problems=problems)
    return analyse(tmp_path, job, outcome)


def test_analysis_passes_a_clean_run(tmp_path):
    report = _tiny_run(tmp_path)
    assert report.problems == [], report.describe()
    assert report.numbers["pairs required / accepted / lost"] == (4, 4, 0)


def test_analysis_finds_a_lost_update(tmp_path):
    # w01 sent for round 2 long before the (reopened) deadline; round 2 did not take it.
    report = _tiny_run(tmp_path, accepted_r2=("w02",))
    assert report.lost == [("w01", 2)]
    assert any("honest updates lost" in p for p in report.problems)


def test_analysis_excuses_an_update_sent_at_the_deadline(tmp_path):
    report = _tiny_run(tmp_path, accepted_r2=("w01",), w02_sent_r2=13.4)  # deadline 13.5 s
    assert report.lost == [] and report.problems == [], report.describe()


def test_analysis_finds_a_broken_chain_a_missing_incarnation_and_a_round_closed_twice(tmp_path):
    report = _tiny_run(tmp_path, incarnations=1, tamper=True, close_twice=True)
    text = "\n".join(report.problems)
    assert "audit: chain broken (stream sequence 2, writer coordinator: altered" in text
    assert "incarnations 1 != coordinator starts 2" in text
    assert "rounds closed more than once (across incarnations): [2]" in text


def test_analysis_finds_a_committed_round_missing_from_the_audit_and_the_count(tmp_path):
    # A round committed just before a kill: the summary recovered its row, the audit never heard of it.
    report = _tiny_run(tmp_path, audit_r2=False, updates_accepted=2)
    text = "\n".join(report.problems)
    assert "only in summary [2]" in text
    assert "summary updates_accepted 2 != 4" in text
    assert report.lost == []  # the summary row still says who was accepted
