"""One writer's audit chain against a real nats-server: it advances only on acknowledged
publishes, cannot fork when its head moves under it, continues across restarts from the
stream itself, and never builds on a record that is not its own."""

from __future__ import annotations

import asyncio

from nats.js.api import StreamConfig

from fedbus.audit import AuditTrail, ChainVerifier
from fedbus.audit.reader import read_chain, verify_audit
from fedbus.audit.trail import EXPECTED_LAST_SUBJECT_SEQ
from fedbus.bus import Subjects, connect, publish_with_retry
from fedbus.crypto.federation import Federation, FederationFile, Participant
from fedbus.crypto.keys import Identity

SUBJECTS = Subjects("audit-t")
COORD = Identity.generate("coordinator", "coordinator")
W1 = Identity.generate("w01", "worker")
FED = Federation(FederationFile(federation="t", participants=[Participant(**i.participant_entry())
                                                               for i in (COORD, W1)]))


async def scenario(url: str) -> dict:
    nc = await connect(url, name="audit-test", first_connect_timeout=10)
    js = nc.jetstream()
    out: dict = {}
    try:
        # Records over 2 KiB are refused by the stream: a publish that fails for good.
        await js.add_stream(StreamConfig(name=SUBJECTS.audit_stream, subjects=[SUBJECTS.audit_all],
                                         max_msg_size=2048))
        trail = AuditTrail(js, SUBJECTS, COORD, publish_attempts=2)
        worker = AuditTrail(js, SUBJECTS, W1)
        out["published"] = [await trail.publish("job.started", run="r1"),
                            await worker.publish("worker.started"),
                            await trail.publish("rejections", detail="x" * 4096),  # refused by the stream
                            await trail.publish("round.closed", round=1)]
        out["failed"] = trail.failed
        # A record stored whose ack was lost: the retry is refused (expected sequence), and the
        # writer finds the record as its head: stored once, the head advanced.
        sealed = trail.chain("round.closed", {"round": 2})
        hdrs = {EXPECTED_LAST_SUBJECT_SEQ: str(trail.subject_seq)}
        await publish_with_retry(js, trail.subject, sealed.wire, msg_id=sealed.msg_id, headers=hdrs)
        out["retry"] = (await trail.append(sealed), trail.seq)
        # Someone else's record lands on the coordinator's subject (a stale second writer, or
        # a forger allowed to publish there): the next publish is refused by the server,
        # re-reads the head, does not build on the foreign record, and starts a new chain after it.
        stale = AuditTrail(js, SUBJECTS, COORD)  # thinks the subject is empty
        stale._synced = True
        foreign = AuditTrail(js, SUBJECTS, W1)
        foreign.subject = trail.subject  # w01's valid record, on the coordinator's subject
        await foreign.resume()
        out["foreign"] = await foreign.publish("forged", round=9)
        out["stale"] = await stale.publish("job.resumed", run="r1")
        out["stale_head"] = (stale.seq, stale.failed)
        # A resumed writer continues from its own last record.
        resumed = AuditTrail(js, SUBJECTS, COORD)
        await resumed.resume()
        out["resumed_head"] = resumed.seq
        out["recent"] = await resumed.recent("round.closed", round=2)
        out["chain"] = await read_chain(js, SUBJECTS, "coordinator", FED)
        out["verdict"] = await verify_audit(js, SUBJECTS, FED)
        # A writer's last record removed: no successor's link can show it, the stream's hole does.
        last = (await js.stream_info(SUBJECTS.audit_stream)).state.last_seq
        await js.delete_msg(SUBJECTS.audit_stream, last)
        out["truncated"] = (last, await verify_audit(js, SUBJECTS, FED))
        return out
    finally:
        await nc.close()


def test_chain_advances_on_acks_only_resists_forks_and_continues_from_the_stream(nats_server):
    out = asyncio.run(scenario(nats_server.url))
    assert out["published"] == [True, True, False, True] and out["failed"] == 1
    assert out["retry"] == ("stored", 3)
    assert out["foreign"] is True  # (what a forger with publish rights can do; verify names it below)
    assert out["stale"] is True and out["stale_head"] == (1, 0)  # a new chain after the foreign record
    assert out["resumed_head"] == 1 and out["recent"]["round"] == 2
    events = [(r["seq"], r["event"]) for r in out["chain"]]
    # The refused record left no gap: round.closed is record 2.
    assert events == [(1, "job.started"), (2, "round.closed"), (3, "round.closed"), (1, "job.resumed")]
    verdict = out["verdict"]
    assert [(p.reason, p.writer) for p in verdict.problems] == [("wrong_signer", "coordinator"),
                                                                ("fork", "coordinator")]
    assert verdict.writers == {"coordinator": 4, "w01": 1}
    last, truncated = out["truncated"]
    assert [(p.reason, p.stream_seq) for p in truncated.problems][-1] == ("removed", last)


def test_chain_verifier_needs_no_server_to_name_holes():
    assert ChainVerifier("j", "fedbus", None).finish(2).problems[0].reason == "removed"
