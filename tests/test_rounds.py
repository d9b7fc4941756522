"""RoundStateMachine driven event by event: every clock value is given, nothing sleeps."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedbus.aggregation.base import ClientUpdate
from fedbus.coordinator.inline import drive
from fedbus.coordinator.rounds import (
    CloseRound,
    EvalReceived,
    FinishJob,
    MessageRejected,
    OpenEval,
    OpenRound,
    Phase,
    RejectUpdate,
    RoundPolicy,
    RoundStateMachine,
    Start,
    Tick,
    UpdateReceived,
    WorkerSeen,
    Aggregate,
    Aggregated,
    AckThrough,
    Commit,
    CommitFailed,
    Committed,
    DuplicateIgnored,
    InternalError,
)
from fedbus.coordinator.records import JobRecord

INIT = {"w": torch.zeros(2), "bn.num_batches_tracked": torch.tensor(0, dtype=torch.int64)}
WORKERS = ("w1", "w2", "w3")
DECLARED = 100  # samples each test worker declares on its heartbeats (the cap on its claims)


def policy(**kw) -> RoundPolicy:
    base = dict(rounds=2, min_workers=3, min_updates=2, round_deadline_ms=1_000, wait_for_workers_ms=10_000,
                liveness_ms=5_000, max_failed_rounds=2, final_eval=False, final_eval_deadline_ms=500, seed=7)
    base.update(kw)
    return RoundPolicy(**base)


def state(value: float, steps: int = 1) -> dict[str, torch.Tensor]:
    return {"w": torch.full((2,), value), "bn.num_batches_tracked": torch.tensor(steps, dtype=torch.int64)}


def update(worker: str, round_: int, now: int, value: float = 1.0, n: int = 10, st=None, **kw) -> UpdateReceived:
    return UpdateReceived(worker, round_, ClientUpdate(worker, n, state(value) if st is None else st), now, **kw)


def started(p: RoundPolicy | None = None, workers=WORKERS, now: int = 0) -> tuple[RoundStateMachine, OpenRound]:
    """A machine whose first round is open (opened at ``now``)."""
    m = RoundStateMachine(p or policy(), INIT)
    assert drive(m, Start(now)) == []
    actions = []
    for w in workers:
        actions += drive(m, WorkerSeen(w, DECLARED, now))
    [opened] = actions
    assert isinstance(opened, OpenRound)
    return m, opened


def of(actions, kind):
    return [a for a in actions if isinstance(a, kind)]


# ---- waiting for workers -----------------------------------------------------------

def test_waits_for_min_workers_then_opens_round_1():
    m = RoundStateMachine(policy(), INIT)
    assert m.phase is Phase.CREATED
    assert drive(m, Start(100)) == []
    assert m.phase is Phase.WAITING_FOR_WORKERS
    assert drive(m, WorkerSeen("w1", 10, 200)) == []
    assert drive(m, WorkerSeen("w2", 10, 300)) == []
    assert drive(m, Tick(400)) == []
    assert drive(m, WorkerSeen("w2", 10, 450)) == []  # the same worker twice is still one
    [opened] = drive(m, WorkerSeen("w3", 10, 500))
    assert (opened.round, opened.model_version, opened.cohort, opened.deadline_ms) == (1, 0, WORKERS, 1_500)
    assert opened.state is INIT  # round 1 starts from the initial model
    assert m.phase is Phase.ROUND_OPEN and m.round == 1 and m.deadline_ms == 1_500


def test_workers_seen_before_start_count():
    m = RoundStateMachine(policy(), INIT)
    for w in WORKERS:
        assert drive(m, WorkerSeen(w, 10, 0)) == []  # CREATED: nothing opens before Start
    [opened] = drive(m, Start(10))
    assert opened.cohort == WORKERS


def test_workers_that_went_silent_do_not_count():
    m = RoundStateMachine(policy(), INIT)
    drive(m, Start(0))
    drive(m, WorkerSeen("w1", 10, 0))
    drive(m, WorkerSeen("w2", 10, 1_000))
    assert drive(m, WorkerSeen("w3", 10, 5_001)) == []  # w1 last seen 5001 ms ago > liveness
    assert m.alive_workers(5_001) == ["w2", "w3"]
    [opened] = drive(m, WorkerSeen("w1", 10, 5_002))
    assert opened.cohort == WORKERS


def test_not_enough_workers_after_the_wait():
    m = RoundStateMachine(policy(), INIT)
    drive(m, Start(1_000))
    drive(m, WorkerSeen("w1", 10, 2_000))
    assert drive(m, Tick(11_000)) == []  # exactly wait_for_workers_ms: still waiting
    [done] = drive(m, Tick(11_001))
    assert done == FinishJob("not_enough_workers", 0, 0, {})
    assert m.phase is Phase.DONE
    assert drive(m, Tick(20_000)) == [] and drive(m, WorkerSeen("w2", 1, 20_000)) == []


def test_start_is_idempotent():
    m, _ = started()
    assert drive(m, Start(5)) == []
    assert m.round == 1


# ---- cohort selection ---------------------------------------------------------------

def cohort_for(seed: int, workers, size: int, round_=1):
    p = policy(min_workers=len(workers), cohort_size=size, min_updates=1, seed=seed, rounds=5)
    m, opened = started(p, workers)
    cohorts = [opened.cohort]
    now = 0
    while len(cohorts) < round_:
        now += 1
        for w in workers:
            drive(m, WorkerSeen(w, 10, now))
        actions = []
        for w in cohorts[-1]:
            actions += drive(m, update(w, len(cohorts), now))
        cohorts.append(of(actions, OpenRound)[0].cohort)
    return cohorts


def test_cohort_is_deterministic_for_a_seed():
    workers = [f"w{i:02d}" for i in range(20)]
    a = cohort_for(3, workers, 5, round_=4)
    b = cohort_for(3, list(reversed(workers)), 5, round_=4)  # arrival order does not matter
    assert a == b
    for c in a:
        assert len(c) == 5 and len(set(c)) == 5 and set(c) <= set(workers)
        assert list(c) == sorted(c)
    assert len(set(a)) > 1  # rounds draw different cohorts
    assert len({cohort_for(s, workers, 5)[0] for s in range(10)}) > 1  # seeds matter


def test_cohort_only_from_alive_workers():
    p = policy(min_workers=2, cohort_size=2, min_updates=1, rounds=3, liveness_ms=1_000, round_deadline_ms=5_000)
    m = RoundStateMachine(p, INIT)
    drive(m, Start(0))
    for w in ("a", "b", "c", "d"):
        drive(m, WorkerSeen(w, 10, 0))  # round 1 opened when the second one arrived
    assert m.round == 1
    # Only c and d keep heartbeating; a and b fall silent.
    drive(m, WorkerSeen("c", 10, 900))
    drive(m, WorkerSeen("d", 10, 900))
    actions = []
    for w in m.cohort:
        actions += drive(m, update(w, 1, 1_500))
    [opened] = of(actions, OpenRound)
    assert opened.round == 2 and opened.cohort == ("c", "d")


def test_cohort_size_larger_than_alive_takes_everyone():
    _, opened = started(policy(cohort_size=50))
    assert opened.cohort == WORKERS


# ---- closing rounds --------------------------------------------------------------

def test_round_closes_when_the_whole_cohort_reported():
    m, opened = started(policy(min_updates=3))
    assert drive(m, update("w2", 1, 100, value=1.0, n=10)) == []
    assert drive(m, update("w1", 1, 200, value=2.0, n=10)) == []
    actions = drive(m, update("w3", 1, 300, value=4.0, n=20))
    close, nxt = actions
    assert isinstance(close, CloseRound) and isinstance(nxt, OpenRound)
    # FedAvg by hand: (10*1 + 10*2 + 20*4) / 40 = 110/40 = 2.75
    assert close.state["w"].tolist() == [2.75, 2.75]
    assert close.state["bn.num_batches_tracked"].item() == 1
    assert (close.round, close.model_version, close.status) == (1, 1, "aggregated")
    assert close.accepted == ("w1", "w2", "w3")
    assert close.rejected == {}
    assert close.seconds == 0.3
    assert nxt.round == 2 and nxt.model_version == 1 and nxt.deadline_ms == 1_300
    assert nxt.state is close.state and m.state is close.state
    assert m.rounds_completed == 1 and m.accepted_total == 3


def test_deadline_with_enough_updates_aggregates():
    m, opened = started()
    drive(m, update("w1", 1, 100, value=3.0, n=1))
    drive(m, update("w3", 1, 200, value=7.0, n=3))
    assert drive(m, Tick(999)) == []
    close, nxt = drive(m, Tick(1_000))
    # (1*3 + 3*7) / 4 = 24/4 = 6
    assert close.status == "aggregated" and close.accepted == ("w1", "w3")
    assert close.state["w"].tolist() == [6.0, 6.0]
    assert close.seconds == 1.0
    assert isinstance(nxt, OpenRound) and nxt.round == 2


def test_deadline_with_too_few_updates_fails_and_opens_next_round():
    m, opened = started()
    drive(m, update("w1", 1, 100, value=3.0))
    close, nxt = drive(m, Tick(1_000))
    assert close.status == "failed" and close.accepted == ("w1",)
    assert close.model_version == 0 and torch.equal(close.state["w"], INIT["w"])
    assert isinstance(nxt, OpenRound) and nxt.round == 2 and nxt.model_version == 0
    assert m.rounds_completed == 0
    # the update folded in the failed round is gone: round 2 starts from scratch
    drive(m, update("w1", 2, 1_100, value=1.0))
    drive(m, update("w2", 2, 1_200, value=1.0))
    close, nxt = drive(m, Tick(2_000))
    assert close.status == "aggregated" and close.state["w"].tolist() == [1.0, 1.0] and close.model_version == 1


def test_max_failed_rounds_finishes_with_quorum_not_reached():
    m, _ = started()
    close, nxt = drive(m, Tick(1_000))
    assert close.status == "failed" and isinstance(nxt, OpenRound)
    close, done = drive(m, Tick(2_000))
    assert close.status == "failed"
    assert done == FinishJob("quorum_not_reached", 0, 0, {})
    assert m.phase is Phase.DONE


def test_failures_must_be_in_a_row():
    m, _ = started(policy(rounds=3, max_failed_rounds=2))
    drive(m, Tick(1_000))  # round 1 fails
    for w in WORKERS:
        drive(m, update(w, 2, 1_100))  # round 2 aggregates
    close, nxt = drive(m, Tick(2_100))  # round 3 fails: one in a row, not two
    assert close.status == "failed" and isinstance(nxt, OpenRound) and nxt.round == 4


def test_job_completes_after_the_last_round_without_final_eval():
    m, _ = started(policy(rounds=1))
    drive(m, update("w1", 1, 10))
    drive(m, update("w2", 1, 20))
    close, done = drive(m, update("w3", 1, 30))
    assert close.status == "aggregated"
    assert done == FinishJob("completed", 1, 1, {})


def test_too_few_live_workers_for_the_next_round_waits_for_them():
    p = policy(min_workers=2, min_updates=2, liveness_ms=1_000, round_deadline_ms=5_000)
    m, _ = started(p, ("w1", "w2"))
    drive(m, update("w1", 1, 100))
    # w2 reports only after going silent for longer than the liveness window
    actions = drive(m, update("w2", 1, 1_500))
    [close] = actions
    assert close.status == "aggregated" and m.phase is Phase.WAITING_FOR_WORKERS
    drive(m, WorkerSeen("w1", 10, 1_600))
    [opened] = drive(m, WorkerSeen("w2", 10, 1_700))
    assert opened.round == 2 and opened.model_version == 1


def test_waiting_between_rounds_can_time_out():
    p = policy(min_workers=2, min_updates=2, liveness_ms=1_000, wait_for_workers_ms=3_000, round_deadline_ms=5_000)
    m, _ = started(p, ("w1", "w2"))
    drive(m, update("w1", 1, 100))
    drive(m, update("w2", 1, 1_500))
    assert drive(m, Tick(4_500)) == []
    assert drive(m, Tick(4_501)) == [FinishJob("not_enough_workers", 1, 1, {})]


# ---- rejections ---------------------------------------------------------------------

def test_rejections_are_counted_and_honest_updates_complete_the_job():
    p = policy(rounds=2, min_workers=4, min_updates=2)
    m, opened = started(p, ("w1", "w2", "w3", "w4"))
    cohort = opened.cohort
    assert cohort == ("w1", "w2", "w3", "w4")

    def rej(event):
        [r] = drive(m, event)
        assert isinstance(r, RejectUpdate)
        return r.reason

    assert rej(update("w1", 2, 10)) == "wrong_round"  # a round that is not open
    assert rej(update("w1", 0, 10)) == "wrong_round"
    assert rej(update("outsider", 1, 10)) == "not_in_cohort"
    assert drive(m, update("w1", 1, 20, value=2.0, n=10)) == []
    assert rej(update("w1", 1, 30, value=100.0, n=1000)) == "duplicate_update"
    wrong_shape = {"w": torch.zeros(3), "bn.num_batches_tracked": torch.tensor(1)}
    assert rej(update("w2", 1, 40, st=wrong_shape)) == "tensor_mismatch"
    wrong_dtype = {"w": torch.zeros(2, dtype=torch.float64), "bn.num_batches_tracked": torch.tensor(1)}
    assert rej(update("w2", 1, 41, st=wrong_dtype)) == "tensor_mismatch"
    missing = {"w": torch.zeros(2)}
    assert rej(update("w2", 1, 42, st=missing)) == "tensor_mismatch"
    nan = {"w": torch.tensor([float("nan"), 0.0]), "bn.num_batches_tracked": torch.tensor(1)}
    assert rej(update("w3", 1, 50, st=nan)) == "non_finite"
    inf = {"w": torch.tensor([0.0, float("-inf")]), "bn.num_batches_tracked": torch.tensor(1)}
    assert rej(update("w3", 1, 51, st=inf)) == "non_finite"
    drive(m, MessageRejected("bad_signature"))

    # a rejected (not reported) cohort member may still send a good update
    assert drive(m, update("w2", 1, 60, value=4.0, n=30)) == []
    close, nxt = drive(m, Tick(1_000))  # w3, w4 never sent a good one
    # (10*2 + 30*4) / 40 = 140/40 = 3.5 ; nothing from the rejected updates leaks in
    assert close.status == "aggregated" and close.accepted == ("w1", "w2")
    assert close.state["w"].tolist() == [3.5, 3.5]
    assert close.rejected == {"wrong_round": 2, "not_in_cohort": 1, "duplicate_update": 1,
                              "tensor_mismatch": 3, "non_finite": 2, "bad_signature": 1}

    # round 2: all honest; per-round counts start again, job totals keep growing
    assert rej(update("w1", 1, 1_100)) == "wrong_round"  # late update for the closed round
    actions = []
    for w in nxt.cohort:
        actions += drive(m, update(w, 2, 1_200, value=1.0))
    close2, done = actions
    assert close2.status == "aggregated" and close2.rejected == {"wrong_round": 1}
    assert done == FinishJob("completed", 2, 2, {})
    assert dict(m.rejections) == {"wrong_round": 3, "not_in_cohort": 1, "duplicate_update": 1,
                                  "tensor_mismatch": 3, "non_finite": 2, "bad_signature": 1}
    assert m.accepted_total == 6


def test_updates_outside_an_open_round_are_wrong_round():
    m = RoundStateMachine(policy(), INIT)
    drive(m, Start(0))
    [r] = drive(m, update("w1", 1, 10))
    assert r.reason == "wrong_round" and m.rejections["wrong_round"] == 1
    assert not m.accepts_round("update", 1)


def test_message_rejected_counts():
    m, _ = started()
    for reason in ("bad_signature", "stale_timestamp", "bad_signature"):
        assert drive(m, MessageRejected(reason)) == []
    assert m.rejections["bad_signature"] == 2 and m.rejections["stale_timestamp"] == 1
    for w in WORKERS:
        actions = drive(m, update(w, 1, 100))
    close = of(actions, CloseRound)[0]
    assert close.rejected == {"bad_signature": 2, "stale_timestamp": 1}


def test_accepts_round():
    m, _ = started()
    assert m.accepts_round("update", 1)
    assert not m.accepts_round("update", 2)
    assert not m.accepts_round("eval.report", 1)
    assert m.accepts_round("heartbeat", 12345)


# ---- metrics and the final evaluation ------------------------------------------------

def test_round_metrics_are_sample_weighted():
    m, _ = started(policy(min_updates=3))
    drive(m, update("w1", 1, 10, n=10, train_metrics={"loss": 1.0, "acc": 0.5},
                    eval_metrics={"acc": 0.2}, eval_samples=5))
    drive(m, update("w2", 1, 20, n=30, train_metrics={"loss": 3.0, "acc": 0.9},
                    eval_metrics={"acc": 0.6}, eval_samples=15))
    close, _ = drive(m, update("w3", 1, 30, n=60, train_metrics={"loss": 0.5},
                               eval_metrics={"acc": 99.0}, eval_samples=0))  # no eval split: ignored
    # train_loss = (10*1 + 30*3 + 60*0.5) / 100 = 130/100 = 1.3
    # train_acc  = (10*0.5 + 30*0.9) / 40 = 32/40 = 0.8   (w3 reported no acc)
    # federated_acc = (5*0.2 + 15*0.6) / 20 = 10/20 = 0.5
    assert close.metrics == pytest.approx({"train_loss": 1.3, "train_acc": 0.8, "federated_acc": 0.5})


def test_final_evaluation_phase_and_weighted_metrics():
    m, _ = started(policy(rounds=1, final_eval=True))
    drive(m, update("w1", 1, 10))
    drive(m, update("w2", 1, 20))
    close, ev = drive(m, update("w3", 1, 30))
    assert isinstance(ev, OpenEval)
    assert (ev.round, ev.model_version, ev.cohort, ev.deadline_ms) == (2, 1, WORKERS, 530)
    assert ev.state is close.state
    assert m.phase is Phase.EVALUATING
    assert m.accepts_round("eval.report", 2) and not m.accepts_round("update", 2)

    assert drive(m, EvalReceived("w1", 2, 10, {"acc": 0.5, "loss": 2.0}, 100)) == []
    [r] = drive(m, EvalReceived("w1", 2, 10, {"acc": 0.5}, 101))
    assert r.reason == "duplicate_update"
    [r] = drive(m, EvalReceived("w2", 1, 10, {"acc": 0.5}, 102))
    assert r.reason == "wrong_round"
    [r] = drive(m, EvalReceived("zz", 2, 10, {"acc": 0.5}, 103))
    assert r.reason == "not_in_cohort"
    [r] = drive(m, update("w2", 2, 104))
    assert r.reason == "wrong_round"  # no training during evaluation
    assert drive(m, EvalReceived("w3", 2, 0, {"acc": 0.0}, 105)) == []  # no samples: no weight
    [done] = drive(m, EvalReceived("w2", 2, 30, {"acc": 0.9, "loss": 1.0}, 106))
    # acc = (10*0.5 + 30*0.9) / 40 = 32/40 = 0.8 ; loss = (10*2 + 30*1) / 40 = 50/40 = 1.25
    assert done.reason == "completed" and done.rounds_completed == 1 and done.model_version == 1
    assert done.metrics == pytest.approx({"federated_acc": 0.8, "federated_loss": 1.25})
    assert m.phase is Phase.DONE


def test_final_evaluation_deadline_finishes_with_what_arrived():
    m, _ = started(policy(rounds=1, final_eval=True))
    for w in WORKERS:
        actions = drive(m, update(w, 1, 10))
    assert isinstance(actions[-1], OpenEval)
    drive(m, EvalReceived("w2", 2, 4, {"acc": 0.25}, 100))
    assert drive(m, Tick(509)) == []
    [done] = drive(m, Tick(510))
    assert done == FinishJob("completed", 1, 1, {"federated_acc": 0.25})


def test_final_evaluation_goes_to_alive_workers_only():
    m, _ = started(policy(rounds=1, final_eval=True, min_updates=1, liveness_ms=999))
    drive(m, WorkerSeen("w1", 10, 900))
    drive(m, update("w1", 1, 950))
    close, ev = drive(m, Tick(1_000))
    assert close.status == "aggregated" and ev.cohort == ("w1",)


# ---- the deadline is judged by the event's own clock ----------------------------------

def test_update_after_the_deadline_is_late_even_without_a_tick():
    """No Tick arrived between the deadline and the update: the update's own timestamp
    shows the deadline passed, so the round closes first and the update is dropped."""
    m, _ = started()
    drive(m, update("w1", 1, 100, value=3.0))
    drive(m, update("w2", 1, 200, value=5.0))
    actions = drive(m, update("w3", 1, 1_000, value=1_000.0))  # at the deadline: too late
    close, nxt, rej = actions
    assert close.status == "aggregated" and close.accepted == ("w1", "w2")
    assert close.state["w"].tolist() == [4.0, 4.0]  # (10*3 + 10*5) / 20
    assert isinstance(nxt, OpenRound) and nxt.round == 2
    assert isinstance(rej, RejectUpdate) and rej.reason == "wrong_round" and rej.worker_id == "w3"


def test_update_just_before_the_deadline_counts():
    m, _ = started()
    drive(m, update("w1", 1, 100))
    drive(m, update("w2", 1, 200))
    close, nxt = drive(m, update("w3", 1, 999))
    assert close.accepted == WORKERS


def test_late_eval_report_after_the_eval_deadline():
    m, _ = started(policy(rounds=1, final_eval=True))
    for w in WORKERS:
        drive(m, update(w, 1, 10))
    drive(m, EvalReceived("w1", 2, 10, {"acc": 0.5}, 100))
    done, rej = drive(m, EvalReceived("w2", 2, 10, {"acc": 1.0}, 510))
    assert done == FinishJob("completed", 1, 1, {"federated_acc": 0.5})
    assert rej.reason == "wrong_round"


# ---- resuming from a committed record ---------------------------------------------

def record(phase: str, round_: int, version: int, completed: int, cohort=(), **kw) -> JobRecord:
    return JobRecord(round=round_, phase=phase, model_version=version, rounds_completed=completed,
                     cohort=tuple(cohort), declared={w: 10 for w in cohort}, **kw)


def resumed(p: RoundPolicy, rec: JobRecord, workers=WORKERS) -> tuple[RoundStateMachine, list]:
    m = RoundStateMachine(p, INIT)
    m.restore(rec, state(5.0, steps=4))
    actions = drive(m, Start(0))
    for w in workers:
        actions += drive(m, WorkerSeen(w, 10, 0))
    return m, actions


def test_restore_reopens_the_uncommitted_round_with_its_committed_cohort():
    # Round 4 was open (cohort w1, w2) when the old coordinator died.
    m, actions = resumed(policy(rounds=5), record("round_open", 4, 2, 2, cohort=("w1", "w2")), workers=())
    [opened] = of(actions, OpenRound)
    assert (opened.round, opened.model_version, opened.cohort) == (4, 2, ("w1", "w2"))
    assert torch.equal(opened.state["w"], torch.full((2,), 5.0))
    # Updates held for round 4 are accepted before any heartbeat: the cohort and the
    # declared sample counts were committed with the round.
    assert of(drive(m, update("w1", 4, 10)), RejectUpdate) == []
    closed = drive(m, update("w2", 4, 20))
    [close] = of(closed, CloseRound)
    assert close.round == 4 and close.status == "aggregated" and close.accepted == ("w1", "w2")


def test_restore_of_a_waiting_job_needs_min_updates_not_min_workers():
    # min_workers=3, but two workers died for good: two live workers (= min_updates) go on.
    m, actions = resumed(policy(rounds=5), record("waiting", 3, 3, 3), workers=("w1", "w2"))
    [opened] = of(actions, OpenRound)
    assert opened.round == 4 and opened.cohort == ("w1", "w2")


def test_restore_of_a_finished_job_does_nothing():
    m, actions = resumed(policy(rounds=2), record("done", 2, 2, 2, reason="completed"))
    assert actions == [] and m.phase is Phase.DONE


def test_restore_is_refused_after_start_or_for_another_model():
    m = RoundStateMachine(policy(), INIT)
    with pytest.raises(ValueError):
        m.restore(record("waiting", 1, 1, 1), {"other": torch.zeros(3)})
    drive(m, Start(0))
    with pytest.raises(RuntimeError):
        m.restore(record("waiting", 1, 1, 1), state(1.0))


# ---- two-phase commit ----------------------------------------------------------------

def test_nothing_is_announced_before_it_is_committed():
    m = RoundStateMachine(policy(), INIT)
    m.handle(Start(0))
    m.handle(WorkerSeen("w1", 10, 0))
    m.handle(WorkerSeen("w2", 10, 0))
    [commit] = m.handle(WorkerSeen("w3", 10, 0))
    assert isinstance(commit, Commit) and commit.record.phase == "round_open" and commit.record.round == 1
    assert commit.record.cohort == WORKERS and commit.record.declared == {w: 10 for w in WORKERS}
    assert m.phase is Phase.COMMITTING and not m.accepts_round("update", 1)
    [opened] = m.handle(Committed(commit.seq, 50))
    assert isinstance(opened, OpenRound) and opened.deadline_ms == 1_050  # deadline from the commit time
    m.handle(update("w1", 1, 100))
    m.handle(update("w2", 1, 100))
    [agg] = m.handle(update("w3", 1, 100))
    assert isinstance(agg, Aggregate) and m.phase is Phase.AGGREGATING
    [commit2] = m.handle(Aggregated(1, agg.compute(), 200))
    assert isinstance(commit2, Commit) and commit2.record.model_version == 1 and commit2.record.round == 2
    assert m.handle(Committed(commit2.seq + 1, 210)) == []  # a stale or foreign seq moves nothing
    ack, close, opened2 = m.handle(Committed(commit2.seq, 210))
    assert ack == AckThrough(1) and isinstance(close, CloseRound) and opened2.round == 2


def test_a_failed_commit_finishes_without_announcing():
    m = RoundStateMachine(policy(), INIT)
    m.handle(Start(0))
    for w in WORKERS:
        actions = m.handle(WorkerSeen(w, 10, 0))
    [commit] = actions
    [finish] = m.handle(CommitFailed(commit.seq, "kv down", 10))
    assert isinstance(finish, FinishJob) and finish.reason == "commit_failed" and m.phase is Phase.DONE


def test_an_exception_inside_a_transition_keeps_the_actions_already_decided(monkeypatch):
    m, opened = started()
    drive(m, update("w1", 1, 100))
    drive(m, update("w2", 1, 100))

    def boom(*a, **k):
        raise RuntimeError("bug")
    monkeypatch.setattr(m, "_on_update", boom)
    # The deadline passed before this update: the round's aggregation was decided first.
    actions = m.handle(update("w3", 1, 5_000))
    assert isinstance(actions[0], Aggregate) and isinstance(actions[-1], InternalError)


# ---- bounded claims ------------------------------------------------------------------

def test_sample_claim_above_the_heartbeat_declaration_is_rejected():
    """The 2**63 attack: one worker's sample claim must not replace the model."""
    m, opened = started()
    [rej] = drive(m, update("w1", 1, 100, value=1000.0, n=2**63))
    assert rej.reason == "excessive_samples"
    drive(m, update("w2", 1, 100, value=1.0))
    [close, *_] = of(drive(m, update("w3", 1, 100, value=1.0)) + drive(m, Tick(2_000)), CloseRound)
    assert torch.equal(close.state["w"], torch.full((2,), 1.0))  # the attacker's 1000 never entered


def test_sample_caps_from_the_job_and_the_federation():
    m, opened = started(policy(max_samples=8, max_samples_by_worker={"w2": 5}))
    assert m.sample_cap("w1") == 8 and m.sample_cap("w2") == 5
    assert of(drive(m, update("w1", 1, 100, n=9)), RejectUpdate)[0].reason == "excessive_samples"
    assert of(drive(m, update("w2", 1, 100, n=6)), RejectUpdate)[0].reason == "excessive_samples"
    assert of(drive(m, update("w2", 1, 100, n=5)), RejectUpdate) == []


def test_an_identical_resend_is_ignored_and_a_different_second_update_rejected():
    m, opened = started()
    assert of(drive(m, update("w1", 1, 100, digest=b"d1")), RejectUpdate) == []
    assert drive(m, update("w1", 1, 100, digest=b"d1")) == [DuplicateIgnored("w1", 1)]
    [rej] = drive(m, update("w1", 1, 100, digest=b"d2"))
    assert rej.reason == "duplicate_update"


# ---- deterministic mode ----------------------------------------------------------------

def _close_in_order(order, deterministic: bool) -> torch.Tensor:
    values = {"w1": 1e30, "w2": 1.0, "w3": -1e30}  # float sums of these depend on their order
    m, _ = started(policy(min_updates=3, deterministic=deterministic))
    actions = []
    for w in order:
        actions += drive(m, update(w, 1, 100, value=values[w], n=10))
    [close] = of(actions, CloseRound)
    return close.state["w"]


def test_deterministic_mode_folds_in_worker_order_whatever_the_arrival_order():
    a = _close_in_order(("w1", "w2", "w3"), deterministic=True)
    b = _close_in_order(("w3", "w1", "w2"), deterministic=True)
    assert torch.equal(a, b)
    # Arrival order does matter otherwise, so the assertion above is not vacuous.
    assert not torch.equal(_close_in_order(("w1", "w2", "w3"), False), _close_in_order(("w1", "w3", "w2"), False))


def test_an_update_trained_from_another_model_version_is_wrong_round():
    """Update.base_version is read: a sync round folds only updates of its own base."""
    m, opened = started()
    [rej] = drive(m, update("w1", 1, 100, base_version=7))
    assert rej.reason == "wrong_round" and "version 7" in rej.detail
    assert of(drive(m, update("w2", 1, 100, base_version=0)), RejectUpdate) == []


def test_local_step_claims_are_bounded_by_the_jobs_epochs_and_batches():
    # 100 declared samples, 3 epochs of batch 16: at most 3 * ceil(100 / 16) = 21 steps.
    m, opened = started(policy(epochs=3, batch_size=16))
    assert m.steps_cap(100) == 21
    [rej] = drive(m, UpdateReceived("w1", 1, ClientUpdate("w1", 100, state(1.0), num_steps=22), 100))
    assert rej.reason == "invalid_update" and "22 local steps" in rej.detail
    assert of(drive(m, UpdateReceived("w2", 1, ClientUpdate("w2", 100, state(1.0), num_steps=21), 100)),
              RejectUpdate) == []


def test_fednova_a_claims_are_bounded_by_the_local_momentum():
    """A huge a_i would scale tau_eff and with it every honest update (an amplification)."""
    from fedbus.coordinator.factory import rule_for
    from fedbus.jobspec import JobSpec
    job = JobSpec.model_validate({"job": "j", "task": "m:t", "rounds": 1, "strategy": {"name": "fednova"},
                                  "train": {"momentum": 0.5}})
    rule = rule_for(job)
    assert rule.max_a_per_step == 2.0  # 1 / (1 - 0.5)
    m = RoundStateMachine(policy(min_updates=1), INIT, rule=rule)
    drive(m, Start(0))
    for w in WORKERS:
        drive(m, WorkerSeen(w, DECLARED, 0))
    honest = ClientUpdate("w1", 10, state(1.0), num_steps=4, extra={"fednova_a": 8.0})  # = 4 / (1 - 0.5)
    greedy = ClientUpdate("w2", 10, state(1.0), num_steps=4, extra={"fednova_a": 1e12})
    assert of(drive(m, UpdateReceived("w1", 1, honest, 100)), RejectUpdate) == []
    [rej] = of(drive(m, UpdateReceived("w2", 1, greedy, 100)), RejectUpdate)
    assert rej.reason == "invalid_update" and "fednova_a" in rej.detail


def test_evaluation_sample_claims_weigh_no_more_than_the_worker_may_claim():
    m, opened = started(policy(rounds=1, final_eval=True))
    drive(m, update("w1", 1, 100, eval_metrics={"accuracy": 0.0}, eval_samples=2**52))
    drive(m, update("w2", 1, 100, eval_metrics={"accuracy": 1.0}, eval_samples=100))
    actions = drive(m, update("w3", 1, 100, eval_metrics={"accuracy": 1.0}, eval_samples=100))
    [close] = of(actions, CloseRound)
    assert close.metrics["federated_accuracy"] == pytest.approx(2 / 3)  # w1 weighs its 100, not 2**52
    [eo] = of(actions, OpenEval)
    drive(m, EvalReceived("w1", eo.round, 2**52, {"accuracy": 0.0}, 200))
    drive(m, EvalReceived("w2", eo.round, 100, {"accuracy": 1.0}, 200))
    [finish] = drive(m, EvalReceived("w3", eo.round, 100, {"accuracy": 1.0}, 200))
    assert finish.metrics["federated_accuracy"] == pytest.approx(2 / 3)


def test_copies_of_accepted_updates_are_recognised_after_their_round_closed():
    m, opened = started(policy(min_updates=3, rounds=5))
    for w in WORKERS:
        drive(m, update(w, 1, 100))
    for w in WORKERS:
        drive(m, update(w, 2, 200))
    assert m.round == 3
    assert m.already_accepted("w1", 1) and m.already_accepted("w3", 2)
    assert not m.already_accepted("w1", 3) and not m.already_accepted("mallory", 1)


def test_a_reopened_round_waits_for_held_updates_to_come_back():
    """Held updates return only after the stream's ack wait; a worker that died since
    cannot resend, so the reopened round must outlast that wait."""
    p = dataclasses.replace(policy(rounds=5), reopened_min_ms=12_000)
    m = RoundStateMachine(p, INIT)
    m.restore(record("round_open", 4, 2, 2, cohort=("w1", "w2")), state(5.0, steps=4))
    [opened] = drive(m, Start(0))
    assert opened.deadline_ms == 12_000  # not the usual 1_000
