"""The status model of `fedbus status`: verified observations in, the view out (no bus)."""

from __future__ import annotations

import pytest

from fedbus.coordinator.records import JobRecord, SignedRecordError, open_signed_record, sign_record
from fedbus.crypto.keys import Identity
from fedbus.status.model import Close, StatusModel
from fedbus.status.render import headline, render_plain, render_rich

T0 = 1_800_000_000_000


def _doc(run: str = "r1", **record) -> dict:
    rec = JobRecord(**{"round": 1, "phase": "round_open", "model_version": 0, "rounds_completed": 0, **record})
    return {"job": "j", "run": run, "record": rec.as_dict(), "updated_ms": T0, "coordinator": "coordinator"}


def _row(round_: int, *, accepted=("w1", "w2"), staleness=(0, 0), rejected=None, **metrics) -> dict:
    return {"round": round_, "model_version": round_, "status": "aggregated", "seconds": 1.5,
            "accepted": len(accepted), "accepted_workers": list(accepted), "late_workers": [],
            "folded": len(accepted), "staleness": list(staleness), "rejected": rejected or {}, "elapsed_s": 3.0,
            **metrics}


def test_sync_round_cohort_stragglers_and_the_round_left_out():
    m = StatusModel("j", mode="sync", total=10, heartbeat_s=1.0, deadline_s=30.0)
    m.record_committed(_doc(round=3, cohort=("w1", "w2", "w3", "w4"), model_version=2, rounds_completed=2))
    m.round_opened(3, T0, "r1")
    for w in ("w1", "w2", "w3", "w4"):
        m.heartbeat(w, "training", "default", T0 + 600)
    v = m.view(T0 + 900)
    assert (v.mode, v.round, v.model_version, v.completed, v.total) == ("sync", 3, 2, 2, 10)
    assert v.training == ("w1", "w2", "w3", "w4") and v.stragglers == ()  # nobody finished: nobody late yet
    # Fast workers finish between two heartbeats: their next one says idle.
    m.heartbeat("w1", "idle", "default", T0 + 1600)
    assert m.view(T0 + 2100).stragglers == ()  # 1 of 4 done: too early to call anyone a straggler
    m.heartbeat("w2", "idle", "default", T0 + 1600)
    assert m.view(T0 + 1700).stragglers == ()  # half done, but the round is younger than two heartbeats
    v = m.view(T0 + 2100)
    assert v.stragglers == ("w3", "w4") and v.training == ("w3", "w4")
    assert v.round_age_s == pytest.approx(2.1)
    # An idle heartbeat from before the open (or just after it) says nothing about this round.
    m.round_opened(4, T0 + 5000, "r1")
    m.record_committed(_doc(round=4, cohort=("w1", "w2", "w3", "w4"), model_version=3, rounds_completed=3,
                            last_close=_row(3, accepted=("w1", "w2", "w3"), staleness=(0, 0, 0),
                                            rejected={"bad_signature": 2}, test_accuracy=0.91)))
    m.heartbeat("w4", "training", "default", T0 + 5600)
    v = m.view(T0 + 7100)
    assert (v.round, v.missed_round, v.missed) == (4, 3, ("w4",))
    assert v.stragglers == ()  # only w4 was heard from since the open: the others are not known to be done
    assert v.rejected == {"bad_signature": 2} and v.accuracy == ((3, 0.91),)
    assert headline(v) == "round 4 of 10"


def test_silent_workers_drop_out_after_three_heartbeats():
    m = StatusModel("j", heartbeat_s=1.0)
    m.record_committed(_doc())
    m.heartbeat("w1", "idle", "default", T0)
    m.heartbeat("w2", "idle", "default", T0 + 2500)
    v = m.view(T0 + 3500)
    assert v.alive == 1 and v.silent == ("w1",)


def test_rejections_staleness_epsilon_and_accuracy_over_the_closes_kept():
    m = StatusModel("j", mode="sync")
    m.record_committed(_doc(round=2, last_close=_row(1, rejected={"stale_timestamp": 1}, staleness=(0, 2),
                                                       test_accuracy=0.5, dp_epsilon=0.7)))
    # The announcement of round 2 arrives before the commit that records it ...
    m.round_closed(Close(round=2, model_version=2, status="aggregated", rejected={"stale_timestamp": 3},
                         metrics={"test_accuracy": 0.6, "dp_epsilon": 1.1}), "r1")
    v = m.view(T0)
    assert v.rejected == {"stale_timestamp": 4} and v.epsilon == pytest.approx(1.1)
    assert v.accuracy == ((1, 0.5), (2, 0.6)) and v.staleness_max == 2
    # ... and the committed row (richer: staleness, workers) replaces it, not doubles it.
    m.record_committed(_doc(round=3, last_close=_row(2, rejected={"stale_timestamp": 3}, staleness=(5,),
                                                       test_accuracy=0.6, dp_epsilon=1.1)))
    m.round_closed(Close(round=2, model_version=2, status="aggregated", rejected={"stale_timestamp": 3}), "r1")
    v = m.view(T0)
    assert v.rejected == {"stale_timestamp": 4} and v.staleness_last == (5,) and v.staleness_max == 5
    assert v.closes_kept == 2


def test_a_new_run_or_a_purge_forgets_the_old_one_and_other_runs_announcements_are_ignored():
    m = StatusModel("j")
    m.record_committed(_doc(run="r1", round=5, last_close=_row(4, test_accuracy=0.9)))
    m.round_closed(Close(round=9, model_version=9, status="aggregated", metrics={"test_accuracy": 0.1}), "r0")
    assert [c.round for c in m.closes.values()] == [4]
    m.record_purged()
    assert m.view(T0).mode == "?" and m.closes == {}
    m.record_committed(_doc(run="r2", round=1))
    v = m.view(T0)
    assert (v.run, v.round, v.accuracy) == ("r2", 1, ())


def test_async_training_and_stragglers_come_from_the_committed_assignments():
    m = StatusModel("j")  # no job spec: the mode is read off the record
    outstanding = [["w1", 40, 20], ["w2", 41, 20], ["w3", 42, 19], ["w9", 12, 3]]
    m.record_committed(_doc(round=42, phase="async", model_version=21, rounds_completed=21,
                            async_state={"outstanding": outstanding, "late": [], "held": [], "recent": []},
                            last_close=_row(21, staleness=(1, 0, 17))))
    v = m.view(T0)
    assert v.mode == "async" and v.unit == "version" and headline(v) == "model v21"
    assert v.cohort == ("w1", "w2", "w3", "w9") and v.training == ("w1", "w2", "w3", "w9")
    assert v.stragglers == ("w9",)  # 18 versions behind; the others 1-2
    assert v.staleness_last == (1, 0, 17)


def test_finished_job_shows_its_last_round_and_reason():
    m = StatusModel("j", total=3)
    m.record_committed(_doc(round=4, phase="done", model_version=3, rounds_completed=3, reason="completed",
                            last_close=_row(3, test_accuracy=0.95)))
    v = m.view(T0)
    assert v.done_reason == "completed" and v.round == 3 and headline(v) == "round 3 of 3"
    text = render_plain(v)
    assert "done (completed)" in text and "v3 0.950" in text


def test_malformed_pieces_are_counted_not_shown():
    m = StatusModel("j")
    m.record_committed({"run": "r1", "record": "nonsense"})
    m.record_committed(_doc(last_close={"round": "x"}, async_state={"outstanding": [["w1"], "junk"]}))
    v = m.view(T0)
    assert v.problems == ("malformed_record x1",) and v.closes_kept == 0


def test_plain_and_rich_renderings_say_the_same():
    from rich.console import Console

    m = StatusModel("j", mode="sync", total=20)
    m.record_committed(_doc(round=6, cohort=tuple(f"w{i:02d}" for i in range(40)), model_version=5,
                            rounds_completed=5, last_close=_row(5, test_accuracy=0.93, dp_epsilon=2.5)))
    v = m.view(T0)
    plain = render_plain(v)
    assert "round 6 of 20" in plain and "+16 more" in plain and "2.5" in plain
    console = Console(width=120, record=True, file=open("/dev/null", "w"))
    console.print(render_rich(v))
    screen = console.export_text()
    assert "round 6 of 20" in screen and "w00" in screen and "0.930" in screen


def test_signed_record_round_trip_and_refusals():
    coordinator = Identity.generate("coordinator", "coordinator")
    other = Identity.generate("coordinator", "coordinator")
    raw = sign_record(_doc(), coordinator.sign)
    assert open_signed_record(raw, coordinator.public_key.verify)["run"] == "r1"
    with pytest.raises(SignedRecordError):
        open_signed_record(raw, other.public_key.verify)
    with pytest.raises(SignedRecordError):
        open_signed_record(raw.replace(b'"r1"', b'"r2"'), coordinator.public_key.verify)
    with pytest.raises(SignedRecordError, match="limit"):
        open_signed_record(b" " * (9 * 1024 * 1024), coordinator.public_key.verify)
    with pytest.raises(SignedRecordError):
        open_signed_record(b"[1, 2]", coordinator.public_key.verify)


def test_before_the_first_commit_nothing_is_made_up():
    v = StatusModel("j", mode="sync", total=5).view(T0)
    assert headline(v) == "nothing committed yet" and v.round is None
    assert "round None" not in render_plain(v) and "waiting for the coordinator's first commit" in render_plain(v)
