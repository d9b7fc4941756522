"""Stragglers in sync mode: close_at_quorum, fractional quorums, and late_updates: next_round
(a late update folded once into the next round, its delta scaled by s(τ)), read back from
the commits the machine proposes."""

from __future__ import annotations

import torch

from fedbus.aggregation.base import ClientUpdate
from fedbus.aggregation.staleness import polynomial
from fedbus.coordinator.inline import settle
from fedbus.coordinator.rounds import (CloseRound, Commit, Deferred, DuplicateIgnored, OpenRound, RejectUpdate,
                                       RoundPolicy, RoundStateMachine, Start, Tick, UpdateReceived, WorkerSeen)


def model(x: float) -> dict:
    return {"w": torch.tensor([x], dtype=torch.float32)}


class Driver:
    """Runs the machine inline and keeps every Commit it proposed (what the service persists)."""

    def __init__(self, policy: RoundPolicy):
        self.m = RoundStateMachine(policy, model(0.0))
        self.commits: list[Commit] = []
        handle = self.m.handle

        def recording(event):  # settle() settles commits itself: keep each one on the way
            out = handle(event)
            self.commits += [a for a in out if isinstance(a, Commit)]
            return out

        self.m.handle = recording  # type: ignore[method-assign]

    def __call__(self, event) -> list:
        return settle(self.m, self.m.handle(event), event.now_ms, keep_acks=True)

    def update(self, worker, round_, y, base, now, digest=None):
        return self(UpdateReceived(worker, round_, ClientUpdate(worker, 10, model(y)), now,
                                   digest=digest or f"{worker}{round_}".encode(), base_version=base))


def policy(**kw) -> RoundPolicy:
    return RoundPolicy(**{"rounds": 3, "min_workers": 3, "min_updates": 2, "close_at_quorum": True,
                          "round_deadline_ms": 10_000, "liveness_ms": 60_000, "final_eval": False,
                          "late_updates": "next_round", "staleness": polynomial(1.0), **kw})


def started(d: Driver) -> OpenRound:
    out = d(Start(1))
    for w in ("a", "b", "c"):
        out += d(WorkerSeen(w, 10, 1))
    return next(a for a in out if isinstance(a, OpenRound))


def test_close_at_quorum_closes_when_min_updates_arrived():
    d = Driver(policy(late_updates="drop"))
    first = started(d)
    assert first.cohort == ("a", "b", "c")
    d.update("a", 1, 2.0, 0, 2)
    out = d.update("b", 1, 4.0, 0, 3)
    close = next(a for a in out if isinstance(a, CloseRound))
    assert close.accepted == ("a", "b") and close.model_version == 1
    # late_updates: drop: c's answer is refused by name.
    out = d.update("c", 1, 6.0, 0, 4)
    assert [(a.worker_id, a.reason) for a in out if isinstance(a, RejectUpdate)] == [("c", "wrong_round")]


def test_fractional_quorum_is_a_share_of_the_cohort():
    p = policy(min_updates=0.5, late_updates="drop")
    assert p.quorum(3) == 2 and p.quorum(10) == 5 and p.quorum(1) == 1 and p.live_needed == 1
    d = Driver(p)
    started(d)
    d.update("a", 1, 2.0, 0, 2)
    out = d.update("b", 1, 4.0, 0, 3)  # 2 of 3 = ceil(0.5 * 3)
    assert any(isinstance(a, CloseRound) for a in out)


def test_next_round_folds_each_late_update_once_with_its_staleness_weight():
    d = Driver(policy())
    started(d)
    d.update("a", 1, 2.0, 0, 2)
    d.update("b", 1, 4.0, 0, 3)                      # x1 = (2 + 4) / 2 = 3
    assert torch.equal(d.m.state["w"], torch.tensor([3.0]))
    # c answers round 1 after it closed: kept for round 2, held until round 2 commits.
    out = d.update("c", 1, 6.0, 0, 4)
    assert [a for a in out if isinstance(a, Deferred)] == [Deferred("c", 1, 2)]
    assert not [a for a in out if isinstance(a, RejectUpdate)]
    again = d.update("c", 1, 6.0, 0, 5)             # the same update again (a redelivery)
    assert [type(a) for a in again] == [DuplicateIgnored]
    d.update("a", 2, 4.0, 1, 6)                      # Δ = 1
    out = d.update("b", 2, 5.0, 1, 7)                # Δ = 2
    close = next(a for a in out if isinstance(a, CloseRound))
    # c's Δ = 6 - x0 = 6, trained one version back: s(1) = (1 + 1)^-1 = 1/2 -> 3.
    # x2 = x1 + (10*1 + 10*2 + 10*3) / 30 = 3 + 2 = 5
    assert torch.equal(d.m.state["w"], torch.tensor([5.0]))
    assert close.accepted == ("a", "b") and close.late == ("c",) and close.staleness == (0, 0, 1)
    # What was committed names the late contributor once, with its staleness.
    committed = [c.record.last_close for c in d.commits if c.record.last_close]
    assert [r["late_workers"] for r in committed] == [[], ["c"]]
    assert committed[-1]["folded"] == 3 and committed[-1]["staleness"] == [0, 0, 1]
    # A later copy of c's round-1 update is recognised as already used, not folded again.
    assert d.m.already_accepted("c", 1)
    out = d.update("c", 1, 6.0, 0, 8)
    assert not any(isinstance(a, CloseRound) for a in out)
    assert sum(1 for r in committed for w in r["late_workers"] if w == "c") == 1


def test_next_round_refuses_late_updates_from_outside_the_round_or_from_a_worker_that_reported():
    d = Driver(policy())
    started(d)
    d.update("a", 1, 2.0, 0, 2)
    d.update("b", 1, 4.0, 0, 3)
    out = d.update("a", 1, 9.0, 0, 4, digest=b"other")   # a reported in round 1 already
    assert [(a.worker_id, a.reason) for a in out if isinstance(a, RejectUpdate)] == [("a", "wrong_round")]
    out = d.update("c", 1, 6.0, 5, 5)                     # names the wrong base
    assert [(a.worker_id, a.reason) for a in out if isinstance(a, RejectUpdate)] == [("c", "wrong_round")]


def test_a_round_failed_at_its_deadline_opens_the_window_for_its_own_stragglers():
    d = Driver(policy(close_at_quorum=False, max_failed_rounds=5))
    started(d)
    d.update("a", 1, 2.0, 0, 2)
    d(Tick(1 + 10_001))                                   # round 1 fails (1 of 2)
    out = d.update("b", 1, 4.0, 0, 10_100)                # late for the failed round: trained from x0 = current
    assert [a for a in out if isinstance(a, Deferred)] == [Deferred("b", 1, 2)]
    d.update("a", 2, 2.0, 0, 10_200)
    out = d.update("c", 2, 6.0, 0, 10_300)
    out += d(Tick(10_300 + 10_001)) if not any(isinstance(a, CloseRound) for a in out) else []
    close = next(a for a in out if isinstance(a, CloseRound) and a.round == 2)
    assert close.late == ("b",) and close.staleness[-1] == 0  # same base: no discount
