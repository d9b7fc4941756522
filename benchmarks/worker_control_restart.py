"""How late does a worker see a control message published right after a nats-server restart?

Issue 7 measured ~14 s (a round failed). For each mode, per trial: a follower subscribes to
a job's control stream, a message is published and seen, the nats-server is SIGKILLed and
restarted on the same ports and store after 1 s, and as soon as the publisher's JetStream
publish is acknowledged again a control message is published; we report how long after that
acknowledgement the follower receives it.

- ``legacy``: the worker's old subscription, a nats-py ordered push consumer (default 5 s
  idle heartbeat): it recreates the consumer only after its activity check (every
  2 x heartbeat) finds it idle, so 10-20 s after the consumer vanished with the server.
- ``follower``: ``fedbus.worker.service.ControlFollower``: the consumer is recreated from
  the last stream sequence seen as soon as the connection is re-established.

    .venv/bin/python benchmarks/worker_control_restart.py --trials 3

Every wait is bounded (``--timeout``).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from nats.js.api import DeliverPolicy

from fedbus.bus import Subjects, connect, ensure_job_infrastructure, publish_with_retry
from fedbus.bus.server import EmbeddedNatsServer
from fedbus.worker.service import ControlFollower


async def trial(mode: str, store: Path, timeout: float) -> dict[str, float]:
    server = EmbeddedNatsServer(store_dir=store)
    server.start()
    subjects = Subjects("restart-bench")
    received: asyncio.Queue = asyncio.Queue()

    async def on_msg(msg) -> None:
        await received.put((time.monotonic(), bytes(msg.data)))

    follower = None

    async def on_reconnected() -> None:
        if follower is not None:
            follower.on_reconnected()

    pub_nc = await connect(server.url, name="bench-publisher")
    sub_nc = await connect(server.url, name=f"bench-{mode}", reconnected_cb=on_reconnected)
    try:
        pub_js, sub_js = pub_nc.jetstream(), sub_nc.jetstream()
        await ensure_job_infrastructure(pub_js, subjects, replicas=1)
        if mode == "legacy":
            await sub_js.subscribe(subjects.ctl_all, ordered_consumer=True,
                                   deliver_policy=DeliverPolicy.LAST_PER_SUBJECT, cb=on_msg)
        else:
            follower = ControlFollower(sub_js, subjects.ctl_all, on_msg)
            await follower.start()
        await publish_with_retry(pub_js, subjects.ctl("round.open"), b"before")
        _, data = await asyncio.wait_for(received.get(), timeout)
        assert data == b"before"

        server.kill()
        await asyncio.sleep(1.0)
        restarted = time.monotonic()
        await asyncio.to_thread(server.start)
        await publish_with_retry(pub_js, subjects.ctl("round.open"), b"after", attempts=200, timeout=2.0)
        published = time.monotonic()
        while True:
            got_at, data = await asyncio.wait_for(received.get(), timeout)
            if data == b"after":
                break
        return {"after_publish_s": got_at - published, "after_restart_s": got_at - restarted,
                "publish_after_restart_s": published - restarted}
    finally:
        if follower is not None:
            await follower.stop()
        await sub_nc.close()
        await pub_nc.close()
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--modes", default="legacy,follower")
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    for mode in args.modes.split(","):
        rows = []
        for i in range(args.trials):
            with tempfile.TemporaryDirectory() as tmp:
                row = asyncio.run(trial(mode, Path(tmp) / "store", args.timeout))
            rows.append(row)
            print(f"{mode:9s} trial {i + 1}: seen {row['after_publish_s']:.2f} s after the publish "
                  f"({row['after_restart_s']:.2f} s after the restart began; "
                  f"publish possible after {row['publish_after_restart_s']:.2f} s)", flush=True)
        lat = [r["after_publish_s"] for r in rows]
        print(f"{mode:9s} median {statistics.median(lat):.2f} s, max {max(lat):.2f} s over {len(lat)} trials",
              flush=True)


if __name__ == "__main__":
    main()
