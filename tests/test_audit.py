"""The audit chain against a real nats-server: it advances only on acknowledged
publishes, and a new coordinator (resume or new run) continues it."""

from __future__ import annotations

import asyncio
import json

from nats.js.api import StreamConfig

from fedbus.audit import AuditTrail, verify_chain
from fedbus.bus import connect

SUBJECT = "t.audit"
STREAM = "T_AUDIT"


async def _records(js) -> list[dict]:
    info = await js.stream_info(STREAM)
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg(STREAM, seq)
        out.append(json.loads(msg.data))
    return out


async def scenario(url: str) -> dict:
    nc = await connect(url, name="audit-test", first_connect_timeout=10)
    js = nc.jetstream()
    try:
        # Records over 1 KiB are refused by the stream: a publish that fails for good.
        await js.add_stream(StreamConfig(name=STREAM, subjects=[SUBJECT], max_msg_size=1024))
        trail = AuditTrail(js, SUBJECT, "coordinator", stream=STREAM)
        first = await trail.publish("job.started", run="r1")
        refused = await trail.publish("rejections", detail="x" * 4096)
        third = await trail.publish("round.closed", round=1)
        # A later coordinator of the same job continues the chain from the stream.
        resumed = AuditTrail(js, SUBJECT, "coordinator", stream=STREAM)
        await resumed.resume()
        fourth = await resumed.publish("job.resumed", run="r1")
        return {"published": (first, refused, third, fourth), "records": await _records(js),
                "failed": trail.failed}
    finally:
        await nc.close()


def test_chain_skips_failed_publishes_and_continues_across_coordinators(nats_server):
    out = asyncio.run(scenario(nats_server.url))
    assert out["published"] == (True, False, True, True) and out["failed"] == 1
    records = out["records"]
    assert [r["event"] for r in records] == ["job.started", "round.closed", "job.resumed"]
    assert [r["seq"] for r in records] == [1, 2, 3]
    assert verify_chain(records)  # the refused record left no gap in the chain
