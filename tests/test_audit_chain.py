"""The audit chain's pure checks: signing, linking, and naming the first broken record."""

from __future__ import annotations

import json

import pytest

from fedbus.audit import GENESIS, ChainVerifier, RecordError, open_record, record_hash, seal_record
from fedbus.audit.reader import describe_verdict
from fedbus.crypto.envelopes import seal
from fedbus.crypto.federation import Federation, FederationFile, Participant
from fedbus.crypto.keys import Identity
from fedbus.protocol.envelope import frame, split_frame

JOB = "audit-job"
COORD = Identity.generate("coordinator", "coordinator")
W1 = Identity.generate("w01", "worker")
W2 = Identity.generate("w02", "worker")
OUTSIDER = Identity.generate("coordinator", "coordinator")  # same id, a key nobody listed
FED = Federation(FederationFile(federation="t", participants=[Participant(**i.participant_entry())
                                                               for i in (COORD, W1, W2)]))


def subject(writer: str) -> str:
    return f"fedbus.{JOB}.audit.{writer}"


class Writer:
    """A writer's chain built by hand (what AuditTrail does, minus the bus)."""

    def __init__(self, identity: Identity):
        self.identity, self.seq, self.prev = identity, 0, GENESIS

    def next(self, event: str, **fields) -> bytes:
        sealed = seal_record(self.identity, JOB, seq=self.seq + 1, prev=self.prev, event=event, fields=fields,
                             ts_ms=1_700_000_000_000 + self.seq)
        self.seq, self.prev = self.seq + 1, sealed.hash
        return sealed.wire


def stream() -> list[tuple[str, bytes]]:
    """An interleaved audit stream: the coordinator's chain of 4, w01's of 2, w02's of 1."""
    c, w1, w2 = Writer(COORD), Writer(W1), Writer(W2)
    return [(subject("coordinator"), c.next("job.started", run="r1")),
            (subject("w01"), w1.next("worker.started")),
            (subject("coordinator"), c.next("round.closed", round=1, accepted=["w01", "w02"])),
            (subject("w02"), w2.next("worker.started")),
            (subject("w01"), w1.next("rejections", reason="bad_signature", count=3)),
            (subject("coordinator"), c.next("round.closed", round=2, accepted=["w01"])),
            (subject("coordinator"), c.next("job.done", run="r1"))]


def verify(messages, federation=FED, *, seqs=None, last=None):
    verifier = ChainVerifier(JOB, "fedbus", federation)
    seqs = seqs or list(range(1, len(messages) + 1))
    for seq, (subj, wire) in zip(seqs, messages):
        verifier.feed(seq, subj, wire)
    return verifier.finish(last if last is not None else (seqs[-1] if seqs else 0))


def replace_body(wire: bytes, body: bytes) -> bytes:
    header, signature, _ = split_frame(wire)
    return frame(bytes(header), signature, body)


def test_an_intact_stream_verifies_with_counts_per_writer():
    verdict = verify(stream())
    assert verdict.ok and verdict.records == 7
    assert verdict.writers == {"coordinator": 4, "w01": 2, "w02": 1}
    assert describe_verdict(verdict).startswith("audit OK: 7 records in 3 chains")


def test_records_link_by_the_hash_of_their_exact_wire_bytes():
    msgs = stream()
    first = open_record(msgs[0][1], job=JOB, writer="coordinator", key=COORD.public_key)
    second = open_record(msgs[2][1], job=JOB, writer="coordinator", key=COORD.public_key)
    assert first.record["prev"] == GENESIS and first.record["seq"] == 1
    assert second.record["prev"] == record_hash(msgs[0][1]) == first.hash
    assert second.record["accepted"] == ["w01", "w02"] and second.record["writer"] == "coordinator"


def test_altered_content_is_named():
    msgs = stream()
    subj, wire = msgs[2]
    body = json.loads(bytes(split_frame(wire)[2]))
    body["accepted"] = ["w01"]
    msgs[2] = (subj, replace_body(wire, json.dumps(body, sort_keys=True, separators=(",", ":")).encode()))
    verdict = verify(msgs)
    first = verdict.problems[0]
    assert not verdict.ok and (first.stream_seq, first.writer, first.reason) == (3, "coordinator", "altered")
    assert "first broken record: stream sequence 3, writer coordinator: altered" in describe_verdict(verdict)


def test_a_record_resigned_with_another_participants_key_is_named_with_its_signer():
    msgs = stream()
    subj, wire = msgs[5]
    header, _, body = split_frame(wire)
    msgs[5] = (subj, frame(bytes(header), W1.sign(bytes(header)), body))  # same header, w01's signature
    verdict = verify(msgs)
    first = verdict.problems[0]
    assert (first.stream_seq, first.reason) == (6, "wrong_signer") and "signed by 'w01'" in first.detail
    # The honest successor no longer links to what is left of the chain: reported after it.
    assert [p.reason for p in verdict.problems] == ["wrong_signer", "sequence_gap"]


def test_a_valid_record_of_another_writer_in_a_chain_is_a_wrong_signer():
    msgs = stream()
    forged = Writer(W1)
    forged.seq, forged.prev = 1, record_hash(msgs[0][1])
    msgs[2] = (msgs[2][0], forged.next("round.closed", round=1, accepted=["w01"]))
    first = verify(msgs).problems[0]
    assert (first.stream_seq, first.writer, first.reason) == (3, "coordinator", "wrong_signer")


def test_an_unlisted_key_is_a_bad_signature():
    msgs = stream()
    rogue = Writer(OUTSIDER)  # claims the coordinator's id, holds another key
    rogue.seq, rogue.prev = 4, record_hash(msgs[6][1])
    msgs.append((subject("coordinator"), rogue.next("job.done", run="r2")))
    first = verify(msgs).problems[0]
    assert (first.stream_seq, first.reason, first.seq) == (8, "bad_signature", None)


def test_a_removed_record_is_a_hole_in_the_stream_and_a_gap_in_its_chain():
    msgs = stream()
    seqs = [1, 2, 3, 4, 5, 6, 7]
    del msgs[2], seqs[2]  # the coordinator's record 2, stream sequence 3
    verdict = verify(msgs, seqs=seqs)
    assert [(p.reason, p.stream_seq) for p in verdict.problems] == [("removed", 3), ("sequence_gap", 6)]
    assert "record(s) 2 of coordinator are missing" in verdict.problems[1].detail


def test_a_removed_last_record_shows_as_a_hole_at_the_end():
    msgs = stream()[:-1]
    verdict = verify(msgs, last=7)
    assert [(p.reason, p.stream_seq) for p in verdict.problems] == [("removed", 7)]


def test_a_chain_that_does_not_start_at_genesis_misses_its_predecessors():
    msgs = [m for m in stream() if m[0] != subject("coordinator")]
    w = Writer(COORD)
    w.seq, w.prev = 2, "ab" * 32
    msgs.append((subject("coordinator"), w.next("job.resumed")))
    first = verify(msgs).problems[0]
    assert (first.reason, first.seq) == ("missing_predecessor", 3) and "records 1-2 are missing" in first.detail


def test_a_wrong_predecessor_is_a_broken_link_and_a_restart_is_a_fork():
    msgs = stream()
    w = Writer(COORD)
    w.seq, w.prev = 4, "cd" * 32
    msgs.append((subject("coordinator"), w.next("job.resumed")))
    w2 = Writer(COORD)
    msgs.append((subject("coordinator"), w2.next("job.started")))
    assert [p.reason for p in verify(msgs).problems] == ["broken_link", "fork"]


def test_foreign_subjects_unknown_writers_junk_and_other_jobs_are_named():
    junk = [(f"fedbus.{JOB}.audit", b"x"), (subject("mallory"), b"x"), (subject("w02"), b"FBE1junk"),
            (subject("w02"), seal(W2, "heartbeat", job=JOB, round=0, body=b"{}")[0]),
            (subject("w02"), seal_record(W2, "other-job", seq=1, prev=GENESIS, event="e", fields={}, ts_ms=1).wire),
            (subject("w02"), b"x" * 70_000)]
    assert [p.reason for p in verify(junk).problems] == ["foreign_subject", "unknown_writer", "malformed",
                                                           "malformed", "wrong_job", "oversize"]


def test_a_signed_body_that_is_not_a_record_is_malformed_body():
    for body in (b"[" * 40_000, b"{}", json.dumps({"seq": 0, "prev": GENESIS, "event": "e", "writer": "w02",
                                                    "ts_ms": 1}).encode()):
        wire, _ = seal(W2, "audit.record", job=JOB, round=0, body=body)
        with pytest.raises(RecordError) as err:
            open_record(wire, job=JOB, writer="w02", key=W2.public_key)
        assert err.value.reason == "malformed_body"


def test_without_the_federation_links_are_still_checked_but_not_signatures():
    msgs = stream()
    subj, wire = msgs[4]  # w01's last record, re-signed by w02: no link names it
    header, _, body = split_frame(wire)
    msgs[4] = (subj, frame(bytes(header), W2.sign(bytes(header)), body))
    assert [p.reason for p in verify(msgs).problems] == ["wrong_signer"]
    verdict = verify(msgs, federation=None)
    assert verdict.ok and not verdict.signatures_checked
    assert "signatures NOT checked" in describe_verdict(verdict)
    del msgs[2]
    assert not verify(msgs, federation=None).ok


def test_sealing_refuses_oversized_records_and_the_chains_own_fields():
    with pytest.raises(ValueError, match="limit"):
        seal_record(W1, JOB, seq=1, prev=GENESIS, event="e", fields={"detail": "x" * 60_000}, ts_ms=1)
    with pytest.raises(ValueError, match="chain's own"):
        seal_record(W1, JOB, seq=1, prev=GENESIS, event="e", fields={"seq": 5}, ts_ms=1)
