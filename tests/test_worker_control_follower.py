"""A worker sees control messages at once after a nats-server restart (issue 7: ~14 s late).

nats-py's ordered consumer (the worker's old subscription) recreates a consumer lost with
the server only when its idle-heartbeat check fires, 10-20 s later; ControlFollower does
it on reconnect, from the last stream sequence it delivered.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from fedbus.bus import Subjects, connect, ensure_job_infrastructure, publish_with_retry
from fedbus.worker.service import ControlFollower

pytestmark = pytest.mark.e2e

CATCH_UP_S = 3.0  # the ordered consumer took 18.5 s in benchmarks/worker_control_restart.py


def test_control_follower_catches_up_right_after_a_server_restart(nats_server):
    subjects = Subjects("follower-restart")

    async def scenario() -> None:
        received: asyncio.Queue = asyncio.Queue()

        async def on_msg(msg) -> None:
            await received.put((time.monotonic(), bytes(msg.data)))

        follower: ControlFollower | None = None

        async def on_reconnected() -> None:
            follower.on_reconnected()

        pub = await connect(nats_server.url, name="test-publisher")
        sub = await connect(nats_server.url, name="test-follower", reconnected_cb=on_reconnected)
        try:
            js = pub.jetstream()
            await ensure_job_infrastructure(js, subjects, replicas=1)
            await publish_with_retry(js, subjects.ctl("round.close"), b"old")  # caught up on start
            follower = ControlFollower(sub.jetstream(), subjects.ctl_all, on_msg)
            await follower.start()
            await publish_with_retry(js, subjects.ctl("round.open"), b"before")
            seen = [(await asyncio.wait_for(received.get(), 10))[1] for _ in range(2)]
            assert seen == [b"old", b"before"]

            nats_server.kill()
            await asyncio.sleep(1.0)
            await asyncio.to_thread(nats_server.start)
            await publish_with_retry(js, subjects.ctl("round.open"), b"after", attempts=200, timeout=2.0)
            published = time.monotonic()
            got_at, data = await asyncio.wait_for(received.get(), 30)
            assert data == b"after", data  # nothing redelivered, nothing skipped
            assert got_at - published < CATCH_UP_S, got_at - published
            assert follower.resubscribes >= 1
            await publish_with_retry(js, subjects.ctl("round.close"), b"next")
            assert (await asyncio.wait_for(received.get(), 10))[1] == b"next"
            assert received.empty()
        finally:
            if follower is not None:
                await follower.stop()
            await sub.close()
            await pub.close()

    asyncio.run(scenario())
