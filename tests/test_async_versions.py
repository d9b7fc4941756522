"""The asynchronous machine (coordinator/versions.py): FedBuff and FedAsync by hand,
staleness bounds, slots, and a crash with a half-full buffer; the sync equivalence property."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedbus.aggregation import fedasync
from fedbus.aggregation.base import ClientUpdate
from fedbus.aggregation.staleness import constant, hinge, polynomial
from fedbus.coordinator.inline import drive, settle
from fedbus.coordinator.rounds import (CloseRound, Commit, FinishJob, OpenRound, RejectUpdate,
                                       RoundPolicy, RoundStateMachine, Start, Tick, UpdateReceived, WorkerSeen)
from fedbus.coordinator.versions import AckUpdates, AsyncPolicy, VersionStateMachine


def model(x: float = 0.0) -> dict:
    return {"w": torch.tensor([x, 2 * x], dtype=torch.float32)}


def base_policy(**kw) -> RoundPolicy:
    return RoundPolicy(**{"rounds": 3, "min_workers": 2, "round_deadline_ms": 10_000, "liveness_ms": 60_000,
                          "final_eval": False, **kw})


def machine(buffer_size=2, rounds=3, concurrency=None, staleness=None, max_staleness=10, algorithm="fedbuff",
            alpha=0.6, server_lr=1.0, min_workers=2, initial=None) -> VersionStateMachine:
    pol = AsyncPolicy(base=base_policy(rounds=rounds, min_workers=min_workers), buffer_size=buffer_size,
                      concurrency=concurrency, staleness=staleness or constant(), max_staleness=max_staleness,
                      algorithm=algorithm, alpha=alpha, server_lr=server_lr)
    return VersionStateMachine(pol, initial or model(0.0))


def update(m, worker: str, ticket: int, base_version: int, state: dict, samples: int = 10, now: int = 10,
           digest: bytes | None = None) -> list:
    return drive(m, UpdateReceived(worker, ticket, ClientUpdate(worker, samples, state), now,
                                   digest=digest or f"{worker}-{ticket}".encode(), base_version=base_version))


def start(m, workers, now=1) -> list:
    out = drive(m, Start(now))
    for w in workers:
        out += drive(m, WorkerSeen(w, 1000, now))
    return out


def opens(actions) -> list[OpenRound]:
    return [a for a in actions if isinstance(a, OpenRound)]


def test_dispatch_respects_concurrency_and_hands_freed_slots_to_idle_workers():
    m = machine(buffer_size=5, concurrency=2)
    out = start(m, ["a", "b", "c"])
    first = opens(out)
    assert sum(len(o.cohort) for o in first) == 2 and all(o.model_version == 0 for o in first)
    busy = {w for o in first for w in o.cohort}
    idle = ({"a", "b", "c"} - busy).pop()
    w = sorted(busy)[0]
    ticket = next(o.round for o in first if w in o.cohort)
    more = opens(update(m, w, ticket, 0, model(1.0)))
    # The freed slot goes to the worker that was idle, not back to the one that just finished.
    assert [o.cohort for o in more] == [(idle,)]


def test_fedbuff_by_hand_stale_update_discounted_and_server_lr_applied():
    # x0 = 0, s(τ) = (1 + τ)^-1, η_g = 0.5, buffer of 2. Version 1 from a and b (fresh);
    # version 2 from c (trained from version 0: τ = 1) and b (trained from version 1: τ = 0).
    m = machine(buffer_size=2, rounds=2, staleness=polynomial(1.0), server_lr=0.5, min_workers=3)
    out = start(m, ["a", "b", "c"])
    t = {w: o.round for o in opens(out) for w in o.cohort}
    assert set(t) == {"a", "b", "c"}
    update(m, "a", t["a"], 0, model(2.0), samples=10)
    out = update(m, "b", t["b"], 0, model(4.0), samples=30)
    # v1 = 0 + 0.5 * (10*(2-0) + 30*(4-0)) / 40 = 1.75 (first coordinate)
    closes = [a for a in out if isinstance(a, CloseRound)]
    assert [c.model_version for c in closes] == [1] and closes[0].staleness == (0, 0)
    assert torch.allclose(m.state["w"], torch.tensor([1.75, 3.5]))
    new = {w: (o.round, o.model_version) for o in opens(out) for w in o.cohort}
    assert new["b"][1] == 1  # b was handed the new model once it was committed
    update(m, "c", t["c"], 0, model(6.0), samples=10)                 # Δ = 6 - 0, s(1) = 1/2: 3
    out = update(m, "b", new["b"][0], 1, model(3.75), samples=10)     # Δ = 3.75 - 1.75 = 2, s(0) = 1: 2
    close = next(a for a in out if isinstance(a, CloseRound))
    assert close.model_version == 2 and close.accepted == ("c", "b") and close.staleness == (1, 0)
    # v2 = 1.75 + 0.5 * (10*3 + 10*2) / 20 = 3.0
    assert torch.allclose(m.state["w"], torch.tensor([3.0, 6.0]))
    assert any(isinstance(a, FinishJob) and a.reason == "completed" for a in out)


def test_fedasync_by_hand_mixes_with_alpha_times_staleness():
    # x0 = 0, α = 0.5, hinge(a=1, b=0): s(0) = 1, s(1) = 1/2.
    m = machine(buffer_size=1, rounds=2, concurrency=2, staleness=hinge(1.0, 0), algorithm="fedasync", alpha=0.5)
    out = start(m, ["a", "b"])
    t = {w: o.round for o in opens(out) for w in o.cohort}
    update(m, "a", t["a"], 0, model(4.0))  # x1 = 0.5*0 + 0.5*4 = 2
    assert torch.allclose(m.state["w"], torch.tensor([2.0, 4.0]))
    update(m, "b", t["b"], 0, model(10.0))  # τ = 1: α_t = 0.25; x2 = 0.75*2 + 0.25*10 = 4
    assert torch.allclose(m.state["w"], torch.tensor([4.0, 8.0]))
    assert torch.allclose(fedasync.mix(model(2.0), model(10.0), 0.25)["w"], m.state["w"])


def test_too_stale_updates_are_rejected_by_name_and_free_their_slot():
    m = machine(buffer_size=1, rounds=5, concurrency=2, max_staleness=1)
    out = start(m, ["a", "b"])
    t = {w: o.round for o in opens(out) for w in o.cohort}
    out = update(m, "a", t["a"], 0, model(1.0))                    # v1
    t.update({w: o.round for o in opens(out) for w in o.cohort})
    update(m, "a", t["a"], 1, model(1.0))                          # v2
    out = update(m, "b", t["b"], 0, model(1.0))                    # τ = 2 > 1
    rejected = [a for a in out if isinstance(a, RejectUpdate)]
    assert [(r.worker_id, r.reason) for r in rejected] == [("b", "too_stale")]
    # Its slot is freed: b gets fresh work on the current model at once.
    assert m.rejections["too_stale"] == 1 and m.outstanding["b"].ticket != t["b"]
    assert m.outstanding["b"].version == 2 and any("b" in o.cohort for o in opens(out))


def test_unassigned_tickets_duplicates_and_wrong_base_are_refused():
    m = machine(buffer_size=3, concurrency=1)
    out = start(m, ["a", "b"])
    (o,) = opens(out)
    w = o.cohort[0]
    other = "b" if w == "a" else "a"
    assert [a.reason for a in update(m, other, o.round, 0, model(1.0)) if isinstance(a, RejectUpdate)] == \
        ["not_in_cohort"]
    assert [a.reason for a in update(m, w, o.round, 3, model(1.0)) if isinstance(a, RejectUpdate)] == ["wrong_round"]
    update(m, w, o.round, 0, model(1.0), digest=b"x")
    again = update(m, w, o.round, 0, model(1.0), digest=b"x")
    assert not [a for a in again if isinstance(a, RejectUpdate)]  # the same update again: ignored
    other_body = update(m, w, o.round, 0, model(2.0), digest=b"y")
    assert [a.reason for a in other_body if isinstance(a, RejectUpdate)] == ["duplicate_update"]


def test_expired_assignment_frees_the_slot_but_its_late_update_is_still_used():
    m = machine(buffer_size=2, concurrency=1, rounds=2)
    out = start(m, ["a", "b"])
    (first,) = opens(out)
    slow = first.cohort[0]
    out = drive(m, Tick(1 + 10_001))  # the assignment expires: the slot goes to the other worker
    (second,) = opens(out)
    assert second.cohort != first.cohort
    update(m, slow, first.round, 0, model(2.0), now=20_000)        # late, still folded
    out = update(m, second.cohort[0], second.round, 0, model(4.0), now=20_001)
    close = next(a for a in out if isinstance(a, CloseRound))
    assert sorted(close.accepted) == ["a", "b"]


def _run_until(m, trainer, versions_wanted: int, now: int = 10) -> list:
    """Answer every dispatch at once, in ticket order (no stragglers)."""
    queue = start(m, sorted(trainer.workers))
    closes = []
    while queue:
        a = queue.pop(0)
        if isinstance(a, OpenRound):
            for w in a.cohort:
                queue += update(m, w, a.round, a.model_version, trainer(a.state, w), samples=trainer.samples[w],
                                now=now)
        elif isinstance(a, CloseRound):
            closes.append(a)
    assert len(closes) == versions_wanted
    return closes


class Trainer:
    """A deterministic stand-in for local training: y = x * (1 - lr) + target_w * lr."""

    def __init__(self, targets: dict[str, float], samples: dict[str, int]):
        self.targets, self.samples = targets, samples
        self.workers = list(targets)

    def __call__(self, state: dict, worker: str) -> dict:
        return {"w": state["w"] * 0.7 + self.targets[worker] * 0.3}


@settings(max_examples=25, deadline=None)
@given(targets=st.lists(st.floats(-10, 10, allow_nan=False), min_size=2, max_size=5),
       samples=st.lists(st.integers(1, 500), min_size=5, max_size=5), rounds=st.integers(1, 4))
def test_async_with_buffer_of_the_cohort_and_no_staleness_equals_sync_fedavg(targets, samples, rounds):
    """buffer_size = concurrency = cohort, max_staleness 0 (a worker that finishes first and is
    handed the old model again has its answer refused as too_stale), every worker equally
    fast: each version folds the cohort's updates on the current model, as a sync round does."""
    workers = {f"w{i}": t for i, t in enumerate(targets)}
    trainer = Trainer(workers, {w: samples[i] for i, w in enumerate(workers)})
    n = len(workers)
    a = VersionStateMachine(AsyncPolicy(base=base_policy(rounds=rounds, min_workers=n), buffer_size=n,
                                        concurrency=n, staleness=polynomial(0.5), max_staleness=0), model(0.5))
    closes = _run_until(a, trainer, rounds)
    assert all(set(c.staleness) == {0} and sorted(c.accepted) == sorted(workers) for c in closes)
    s = RoundStateMachine(base_policy(rounds=rounds, min_workers=n, min_updates=n), model(0.5))
    queue = start(s, sorted(workers))
    while queue:
        act = queue.pop(0)
        if isinstance(act, OpenRound):
            for w in act.cohort:
                queue += drive(s, UpdateReceived(w, act.round, ClientUpdate(w, trainer.samples[w],
                                                                            trainer(act.state, w)), 10,
                                                 base_version=act.model_version))
    assert s.rounds_completed == a.rounds_completed == rounds
    # Folds may come in another order (float64 sums): equal to float32 resolution.
    assert torch.allclose(a.state["w"], s.state["w"], rtol=1e-6, atol=1e-7), (a.state, s.state)


def _record_of(actions) -> Commit | None:
    commits = [a for a in actions if isinstance(a, Commit)]
    return commits[-1] if commits else None


def test_crash_with_a_half_full_buffer_loses_nothing_and_folds_nothing_twice():
    """Commits are recorded as the service would persist them; the machine "dies" with one
    update in a buffer of two and is restored from the last commit. The held update comes
    back (unacknowledged) and is folded once; a redelivery of an already committed one is a duplicate."""
    m = machine(buffer_size=2, rounds=3, concurrency=3)
    acked: set = set()

    def step(event):
        settled = settle(m, m.handle(event), getattr(event, "now_ms", 0), keep_acks=True)
        for a in settled:
            if isinstance(a, AckUpdates):
                acked.update(a.keys)
        return settled

    # settle() settles Commit actions itself; record them (what the service would persist) on the way.
    original = m.handle
    commits: list[Commit] = []

    def handle(event):
        out = original(event)
        commits.extend(a for a in out if isinstance(a, Commit))
        return out

    m.handle = handle  # type: ignore[method-assign]
    out = step(Start(1))
    for w in ("a", "b", "c"):
        out += step(WorkerSeen(w, 10, 1))
    t = {w: o.round for o in opens(out) for w in o.cohort}
    step(UpdateReceived("a", t["a"], ClientUpdate("a", 10, model(1.0)), 5, digest=b"a1", base_version=0))
    step(UpdateReceived("b", t["b"], ClientUpdate("b", 10, model(3.0)), 6, digest=b"b1", base_version=0))
    assert m.model_version == 1 and {("a", t["a"]), ("b", t["b"])} <= acked
    step(UpdateReceived("c", t["c"], ClientUpdate("c", 10, model(5.0)), 7, digest=b"c1", base_version=0))
    assert m.model_version == 1 and len(m._buffer) == 1  # half full
    assert ("c", t["c"]) not in acked
    committed = commits[-1]
    version_commits = [c for c in commits if c.record.model_version == 1]
    assert version_commits, "version 1 was committed"

    # -- crash: a new machine from the last committed record and the models it names
    m2 = machine(buffer_size=2, rounds=3, concurrency=3)
    history = {0: model(0.0), 1: version_commits[-1].model}
    m2.restore(committed.record, committed.model, committed.strategy_state, history)
    out = drive(m2, Start(100))
    for w in ("a", "b", "c"):
        out += drive(m2, WorkerSeen(w, 10, 100))
    # The held update of c comes back: accepted again and folded once (staleness 1: version 0 -> 1).
    back = drive(m2, UpdateReceived("c", t["c"], ClientUpdate("c", 10, model(5.0)), 101, digest=b"c1",
                                    base_version=0))
    assert not [a for a in back if isinstance(a, RejectUpdate)]
    # A redelivered update already committed in version 1 is a duplicate, not news.
    dup = drive(m2, UpdateReceived("a", t["a"], ClientUpdate("a", 10, model(1.0)), 102, digest=b"a1",
                                   base_version=0))
    # (accepted_total counts committed folds: c is held again, not counted until its version commits)
    assert not [a for a in dup if isinstance(a, RejectUpdate)] and m2.accepted_total == committed.record.accepted_total
    assert committed.record.accepted_total == 2
    assert len(m2._buffer) == 1 and m2.model_version == 1
    # Committed assignments are announced again (a dispatch may have died before its publish).
    reopened = {w for o in opens(out) for w in o.cohort}
    assert {w for w, _, _ in committed.record.async_state["outstanding"]} <= reopened
    w = sorted(m2.outstanding)[0]
    final = drive(m2, UpdateReceived(w, m2.outstanding[w].ticket, ClientUpdate(w, 10, model(2.0)), 103, digest=b"z",
                                     base_version=m2.outstanding[w].version))
    close = next(a for a in final if isinstance(a, CloseRound))
    pairs = list(zip(close.accepted, close.tickets))
    assert close.model_version == 2 and pairs.count(("c", t["c"])) == 1 and close.staleness[0] == 1
    assert m2.accepted_total == 4  # a, b in version 1; c and one more in version 2: none twice


def test_a_robust_rule_aggregates_the_buffer_of_discounted_deltas():
    """Coordinate-wise median over the buffer: one wild update cannot move the model."""
    from fedbus.aggregation.specs import MedianSpec, build_rule

    rule = build_rule(MedianSpec(name="median", f=1))
    pol = AsyncPolicy(base=base_policy(rounds=1, min_workers=3), buffer_size=3, staleness=constant())
    m = VersionStateMachine(pol, model(0.0), rule=rule)
    out = start(m, ["a", "b", "c"])
    t = {w: o.round for o in opens(out) for w in o.cohort}
    update(m, "a", t["a"], 0, model(1.0))
    update(m, "b", t["b"], 0, model(1e6))   # an attacker's update
    out = update(m, "c", t["c"], 0, model(3.0))
    assert any(isinstance(a, CloseRound) for a in out)
    assert torch.allclose(m.state["w"], torch.tensor([3.0, 6.0]))  # the median of (1, 3, 1e6)


def test_a_held_update_excused_after_a_resume_is_folded_even_if_versions_passed():
    """A dead predecessor accepted it; the resumed machine made versions before it came back.
    It is folded (its base model is still known) rather than refused as too_stale."""
    from fedbus.coordinator.records import JobRecord

    m = machine(buffer_size=1, rounds=6, concurrency=2, max_staleness=1)
    record = JobRecord(round=3, phase="async", model_version=2, rounds_completed=2, declared={"a": 1000, "b": 1000},
                       async_state={"outstanding": [["b", 3, 2]], "late": [], "held": [["a", 2, 1]], "recent": []})
    m.restore(record, model(2.0), {}, {1: model(1.0), 2: model(2.0)})
    out = start(m, ["a", "b"], now=5)
    assert {("a", 2), ("b", 3)} <= {(w, o.round) for o in opens(out) for w in o.cohort}  # both told again
    update(m, "b", 3, 2, model(2.5), now=6)     # version 3
    update(m, "b", m.outstanding["b"].ticket, 3, model(3.0), now=7)  # version 4: a's base is 3 versions back
    out = update(m, "a", 2, 1, model(1.5), now=8)
    assert not [r for r in out if isinstance(r, RejectUpdate)]
    close = next(a for a in out if isinstance(a, CloseRound))
    assert close.accepted == ("a",) and close.staleness == (3,)


def test_an_assignment_outstanding_at_the_kill_on_a_forgotten_model_is_too_stale_after_a_resume():
    """A straggler was assigned version 0 and is still training when the coordinator dies at
    version 3 with max_staleness 1: the resumed machine keeps no model 0 to re-announce it,
    but still knows the ticket, so the straggler's answer is ``too_stale`` (as the dead
    machine would have said), not ``not_in_cohort``."""
    from fedbus.coordinator.records import JobRecord

    m = machine(buffer_size=1, rounds=6, concurrency=2, max_staleness=1)
    record = JobRecord(round=4, phase="async", model_version=3, rounds_completed=3, declared={"a": 1000, "b": 1000},
                       async_state={"outstanding": [["slow", 1, 0], ["b", 4, 3]], "late": [], "held": [],
                                    "recent": []})
    m.restore(record, model(3.0), {}, {2: model(2.0), 3: model(3.0)})
    out = start(m, ["a", "b", "slow"], now=5)
    assert ("slow", 1) not in {(w, o.round) for o in opens(out) for w in o.cohort}  # nothing to train from
    rejected = [r for r in update(m, "slow", 1, 0, model(0.5), now=6) if isinstance(r, RejectUpdate)]
    assert [(r.worker_id, r.reason) for r in rejected] == [("slow", "too_stale")]
