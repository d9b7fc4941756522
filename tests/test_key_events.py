"""Live key events, without a bus: the overlay's rules (fedbus.crypto.keyevents) and what the
envelope verifier and KeyWatch.handle make of them."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from fedbus.crypto.envelopes import Rejection, seal
from fedbus.crypto.federation import Federation, FederationFile, Participant
from fedbus.crypto.keyevents import KeyEventRefused
from fedbus.crypto.keys import Identity, b64
from fedbus.jobspec import SecuritySpec
from fedbus.keywatch import KeyWatch, own_key_lost, own_key_problem
from fedbus.messaging import security_verifier
from fedbus.protocol.messages import Heartbeat, KeyEvent, RoundClose, encode_body

JOB = "keys-unit"


@pytest.fixture
def ids() -> dict[str, Identity]:
    return {i.id: i for i in (Identity.generate("coord", "coordinator"), Identity.generate("ops", "operator"),
                              Identity.generate("w1", "worker"), Identity.generate("w2", "worker"),
                              Identity.generate("agg", "aggregator"))}


@pytest.fixture
def federation(ids) -> Federation:
    return Federation(FederationFile(participants=[Participant(**i.participant_entry()) for i in ids.values()]))


def pub(identity: Identity) -> str:
    return b64(bytes(identity.public_key))


def revoke(who: str, reason: str = "") -> KeyEvent:
    return KeyEvent(action="revoke", participant=who, reason=reason)


def rotate(who: Identity, new: Identity, **extra) -> KeyEvent:
    extra.setdefault("new_encryption_key", new.participant_entry().get("encryption_key"))
    return KeyEvent(action="rotate", participant=who.id, old_key=pub(who), new_key=pub(new), **extra)


def heartbeat(identity: Identity) -> bytes:
    wire, _ = seal(identity, "heartbeat", job=JOB, round=0, body=encode_body(Heartbeat(num_samples=1, partition=0)))
    return wire


def opens(federation: Federation, wire: bytes) -> str:
    """'ok' or the rejection reason of a fresh verifier (its own replay guard)."""
    try:
        security_verifier(JOB, SecuritySpec(), federation).open(wire)
    except Rejection as rej:
        return rej.reason
    return "ok"


def test_revocation_rejects_the_next_message_as_revoked_sender(ids, federation):
    assert opens(federation, heartbeat(ids["w1"])) == "ok"
    change = federation.apply_key_event(revoke("w1", "lost laptop"), "ops", seq=7)
    assert (change.participant, change.action, change.signer, change.seq) == ("w1", "revoke", "ops", 7)
    assert federation.get("w1").revoked
    assert opens(federation, heartbeat(ids["w1"])) == "revoked_sender"
    assert opens(federation, heartbeat(ids["w2"])) == "ok"  # nobody else is touched
    assert [w.id for w in federation.workers()] == ["w1", "w2"]  # still listed: partitions do not move


def test_rotation_refuses_the_old_key_and_accepts_the_new_one(ids, federation):
    new = Identity.generate("w1", "worker")
    federation.apply_key_event(rotate(ids["w1"], new), "coord")
    assert opens(federation, heartbeat(ids["w1"])) == "bad_signature"
    assert opens(federation, heartbeat(new)) == "ok"
    assert own_key_problem(federation, new) is None
    assert own_key_problem(federation, ids["w1"]) is not None


def test_revocation_is_final(ids, federation):
    federation.apply_key_event(revoke("w1"), "ops")
    assert federation.apply_key_event(revoke("w1"), "coord") is None  # repeated: changes nothing
    with pytest.raises(KeyEventRefused, match="final"):
        federation.apply_key_event(rotate(ids["w1"], Identity.generate("w1", "worker")), "ops")
    assert federation.get("w1").revoked


def test_a_rotation_must_name_the_current_key(ids, federation):
    second, third = Identity.generate("w1", "worker"), Identity.generate("w1", "worker")
    federation.apply_key_event(rotate(ids["w1"], second), "ops")
    # A replay (or a racing operator's rotation) of the first key is stale.
    with pytest.raises(KeyEventRefused, match="stale"):
        federation.apply_key_event(rotate(ids["w1"], third), "ops")
    federation.apply_key_event(rotate(second, third), "ops")
    assert federation.get("w1").public_key == pub(third)


def test_retired_and_shared_keys_never_become_current(ids, federation):
    second = Identity.generate("w1", "worker")
    federation.apply_key_event(rotate(ids["w1"], second), "ops")
    back = KeyEvent(action="rotate", participant="w1", old_key=pub(second), new_key=pub(ids["w1"]))
    with pytest.raises(KeyEventRefused, match="retired"):
        federation.apply_key_event(back, "ops")
    steal = KeyEvent(action="rotate", participant="w1", old_key=pub(second), new_key=pub(ids["w2"]))
    with pytest.raises(KeyEventRefused, match="w2's current key"):
        federation.apply_key_event(steal, "ops")
    # A revoked participant's key cannot be handed to someone else either.
    federation.apply_key_event(revoke("w2"), "ops")
    with pytest.raises(KeyEventRefused, match="retired"):
        federation.apply_key_event(steal, "ops")


def test_who_may_sign_and_whom_events_may_target(ids, federation):
    with pytest.raises(KeyEventRefused, match="may not sign"):
        federation.apply_key_event(revoke("w2"), "w1")
    with pytest.raises(KeyEventRefused, match="coordinator"):
        federation.apply_key_event(revoke("coord"), "ops")
    with pytest.raises(KeyEventRefused, match="not listed"):
        federation.apply_key_event(revoke("nobody"), "ops")
    federation.apply_key_event(revoke("ops"), "coord")  # an operator can be revoked...
    with pytest.raises(KeyEventRefused, match="may not sign"):
        federation.apply_key_event(revoke("w2"), "ops")  # ...and then signs nothing
    assert not federation.get("w2").revoked


def test_an_aggregator_revoked_live_leaves_the_aggregator_list(ids, federation):
    assert [a.id for a in federation.aggregators()] == ["agg"]
    federation.apply_key_event(revoke("agg"), "coord")
    assert federation.aggregators() == []


def test_rotation_carries_an_optional_encryption_key(ids, federation):
    enc = b64(bytes(range(32)))
    w1_before = federation.overlay.encryption_key("w1")
    federation.apply_key_event(rotate(ids["w2"], Identity.generate("w2", "worker"), new_encryption_key=enc), "ops")
    assert federation.overlay.encryption_key("w2") == enc
    assert federation.overlay.encryption_key("w1") == w1_before == ids["w1"].participant_entry()["encryption_key"]


@pytest.mark.parametrize("fields", [
    {"action": "rotate", "participant": "w1"},
    {"action": "rotate", "participant": "w1", "old_key": b64(bytes(32)), "new_key": b64(bytes(32))},
    {"action": "revoke", "participant": "w1", "new_key": b64(bytes(32))},
    {"action": "revoke", "participant": "w1.*"},
    {"action": "revoke", "participant": "w1", "reason": "x" * 257},
    {"action": "rotate", "participant": "w1", "old_key": "short", "new_key": b64(bytes(32))},
])
def test_malformed_key_events_do_not_validate(fields):
    with pytest.raises(ValidationError):
        KeyEvent(**fields)


def test_only_coordinator_and_operator_may_send_key_events_and_operators_nothing_else(ids, federation):
    body = encode_body(revoke("w2"))
    by_worker, _ = seal(ids["w1"], "keys", job=JOB, round=0, body=body)
    assert opens(federation, by_worker) == "role_not_allowed"
    by_operator, _ = seal(ids["ops"], "keys", job=JOB, round=0, body=body)
    assert opens(federation, by_operator) == "ok"
    close = encode_body(RoundClose(round=1, model_version=1, status="aggregated", accepted=[], seconds=0.0))
    forged, _ = seal(ids["ops"], "round.close", job=JOB, round=1, body=close)
    assert opens(federation, forged) == "role_not_allowed"



def watch(federation: Federation, changes: list) -> KeyWatch:
    from fedbus.bus import Subjects

    return KeyWatch(None, Subjects(JOB), federation, SecuritySpec(), on_change=changes.append)


def test_keywatch_applies_verified_events_and_refuses_the_rest(ids, federation):
    changes: list = []
    kw = watch(federation, changes)
    event, _ = seal(ids["ops"], "keys", job=JOB, round=0, body=encode_body(revoke("w1")))
    kw.handle(event, stored_ms=None, seq=1)
    assert [c.participant for c in changes] == ["w1"] and federation.get("w1").revoked
    assert own_key_lost(federation, ids["w1"], changes[0]) and not own_key_lost(federation, ids["w2"], changes[0])
    with pytest.raises(Rejection) as rej:  # the same bytes again
        kw.handle(event, stored_ms=None, seq=2)
    assert rej.value.reason == "replayed_nonce"
    refused, _ = seal(ids["ops"], "keys", job=JOB, round=0, body=encode_body(revoke("coord")))
    with pytest.raises(Rejection) as rej:
        kw.handle(refused, stored_ms=None, seq=3)
    assert rej.value.reason == "invalid_key_event"
    other_job, _ = seal(ids["ops"], "keys", job="other", round=0, body=encode_body(revoke("w2")))
    with pytest.raises(Rejection) as rej:
        kw.handle(other_job, stored_ms=None, seq=4)
    assert rej.value.reason == "wrong_job"
    not_a_key_event, _ = seal(ids["coord"], "round.close", job=JOB, round=1, body=encode_body(
        RoundClose(round=1, model_version=1, status="aggregated", accepted=[], seconds=0.0)))
    with pytest.raises(Rejection) as rej:
        kw.handle(not_a_key_event, stored_ms=None, seq=5)
    assert rej.value.reason == "unknown_type"
    assert len(changes) == 1 and not federation.get("w2").revoked


def test_keywatch_judges_freshness_by_stored_time(ids, federation):
    """A week-old event replayed from the stream is valid; the same event stored today is stale."""
    week_ms = 7 * 24 * 3600 * 1000
    from fedbus.crypto.envelopes import now_ms

    then = now_ms() - week_ms
    old, _ = seal(ids["ops"], "keys", job=JOB, round=0, body=encode_body(revoke("w1")), ts_ms=then)
    with pytest.raises(Rejection) as rej:
        watch(federation, []).handle(old, stored_ms=now_ms(), seq=9)
    assert rej.value.reason == "stale_timestamp" and not federation.get("w1").revoked
    watch(federation, []).handle(old, stored_ms=then + 5, seq=1)
    assert federation.get("w1").revoked


def test_the_key_tool_refuses_locally_what_every_process_would_refuse(ids, federation):
    from fedbus.keytool import KeyToolError, build_event

    second = Identity.generate("w1", "worker")
    event = build_event(federation, ids["ops"], "w1", new_key=second, reason="yearly")
    assert (event.old_key, event.new_key) == (pub(ids["w1"]), pub(second))
    federation.apply_key_event(event, "ops")
    for signer, target, new_key, message in (
            (ids["ops"], "w1", second, "already w1's current key"),
            (ids["w2"], "w1", None, "coordinator or an operator"),
            (ids["ops"], "coord", None, "federation file"),
            (ids["ops"], "w2", Identity.generate("w3", "worker"), "for w3"),
            (ids["ops"], "nobody", None, "not listed"),
            (ids["ops"], "w2", Identity("w2", "worker", "default", ids["w1"].signing_key), "retired")):
        with pytest.raises(KeyToolError, match=message):
            build_event(federation, signer, target, new_key=new_key, reason="")
    federation.apply_key_event(revoke("w2"), "ops")
    with pytest.raises(KeyToolError, match="already revoked"):
        build_event(federation, ids["coord"], "w2", new_key=None, reason="")


def test_a_revoked_worker_leaves_the_coordinators_registry_at_once():
    import torch

    from fedbus.coordinator.machine import WorkerRevoked
    from fedbus.coordinator.rounds import RoundPolicy, RoundStateMachine, Start, WorkerSeen

    machine = RoundStateMachine(RoundPolicy(rounds=2, min_workers=3, min_updates=2, round_deadline_ms=1_000,
                                            wait_for_workers_ms=10_000, liveness_ms=5_000, max_failed_rounds=2,
                                            final_eval=False, final_eval_deadline_ms=500, seed=7),
                                {"w": torch.zeros(2)})
    machine.handle(Start(0))
    for worker in ("w1", "w2"):
        machine.handle(WorkerSeen(worker, 10, 0))
    assert machine.handle(WorkerRevoked("w1")) == []
    assert machine.alive_workers(1) == ["w2"]  # not after its liveness window: now
    # Two live workers of three: round 1 does not open until a third one beats.
    assert machine.handle(WorkerSeen("w3", 10, 2)) == []


def test_keys_gen_writes_operators_into_the_federation_file(tmp_path, capsys):
    from fedbus import cli

    for id_, role in (("coord", "coordinator"), ("w1", "worker"), ("desk", "operator")):
        assert cli.main(["keys", "gen", "--id", id_, "--role", role, "--out", str(tmp_path / "keys")]) == 0
    assert cli.main(["keys", "federation", "--keys", str(tmp_path / "keys"), "--out", str(tmp_path / "fed.yaml")]) == 0
    federation = Federation.load(tmp_path / "fed.yaml")
    assert [(p.id, p.role) for p in federation.spec.participants] == [
        ("coord", "coordinator"), ("desk", "operator"), ("w1", "worker")]
    desk = Identity.load(tmp_path / "keys" / "desk.key")
    assert federation.listed_as(desk, "operator").role == "operator"
