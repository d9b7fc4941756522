"""How fast does a key event reach a running process, and what does replaying them cost at start?

On a real nats-server (embedded, temporary store), one connection publishes key events the
way `fedbus keys rotate` does (signed, JetStream-acknowledged), and ``--watchers`` other
connections each run a ``KeyWatch`` over their own federation, as every coordinator,
aggregator and worker does. Each of ``--events`` rotations (of one worker, each naming the
key before it) is published only after every watcher applied the previous one, and we
report, as medians over the events:

- ``ack_ms``: publish until JetStream's acknowledgement (when `fedbus keys` returns);
- ``applied_ms``: publish until the last watcher applied it (after which that process
  refuses the old key).

Then a fresh ``KeyWatch`` (a restarted process) replays all the events before ``start``
returns: ``replay_ms`` (median over ``--replays``) against ``start_empty_ms`` on a job with no
key events. The control stream keeps the last 32 key events per job, so ``--events`` is capped.

    .venv/bin/python benchmarks/key_events.py --events 30 --watchers 4

Every wait is bounded (``--timeout``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from fedbus.bus import Subjects, connect, ensure_job_infrastructure
from fedbus.bus.server import EmbeddedNatsServer
from fedbus.crypto.federation import Federation, FederationFile, Participant
from fedbus.crypto.keys import Identity, b64
from fedbus.jobspec import SecuritySpec
from fedbus.keywatch import KeyWatch, publish_key_event
from fedbus.protocol.messages import KeyEvent

MAX_EVENTS = 32  # the control stream's per-subject cap (fedbus/bus/layout.py)


def federation_of(identities: list[Identity]) -> Federation:
    return Federation(FederationFile(participants=[Participant(**i.participant_entry()) for i in identities]))


async def until(predicate, timeout: float) -> None:
    give_up = time.perf_counter() + timeout
    while not predicate():
        if time.perf_counter() > give_up:
            raise TimeoutError("a watcher did not apply the event in time")
        await asyncio.sleep(0.0005)


async def start_ms(url: str, subjects: Subjects, identities: list[Identity], timeout: float) -> float:
    nc = await connect(url, name="bench-replay", first_connect_timeout=10)
    watch = KeyWatch(nc.jetstream(), subjects, federation_of(identities), SecuritySpec())
    started = time.perf_counter()
    await watch.start(timeout)
    took = (time.perf_counter() - started) * 1000
    await watch.stop()
    await nc.close()
    return took


async def run(url: str, events: int, watchers: int, replays: int, timeout: float) -> dict:
    operator = Identity.generate("ops", "operator")
    worker = Identity.generate("w1", "worker")
    identities = [Identity.generate("coord", "coordinator"), operator, worker]
    subjects, empty = Subjects("key-bench"), Subjects("key-bench-empty")
    pub = await connect(url, name="bench-publisher", first_connect_timeout=10)
    js = pub.jetstream()
    for s in (subjects, empty):
        await ensure_job_infrastructure(js, s)
    conns, watches = [], []
    for i in range(watchers):
        nc = await connect(url, name=f"bench-watch-{i}", first_connect_timeout=10)
        watch = KeyWatch(nc.jetstream(), subjects, federation_of(identities), SecuritySpec())
        await watch.start(timeout)
        conns.append(nc)
        watches.append(watch)
    acks, applied = [], []
    current = b64(bytes(worker.public_key))
    for n in range(1, events + 1):
        new = b64(bytes(Identity.generate("w1", "worker").public_key))
        event = KeyEvent(action="rotate", participant="w1", old_key=current, new_key=new)
        started = time.perf_counter()
        await publish_key_event(js, subjects, operator, event)
        acks.append((time.perf_counter() - started) * 1000)
        await until(lambda n=n: all(w.applied >= n for w in watches), timeout)
        applied.append((time.perf_counter() - started) * 1000)
        current = new
    assert all(w.federation.get("w1").public_key == current for w in watches)
    replay = [await start_ms(url, subjects, identities, timeout) for _ in range(replays)]
    baseline = [await start_ms(url, empty, identities, timeout) for _ in range(replays)]
    for watch, nc in zip(watches, conns):
        await watch.stop()
        await nc.close()
    await pub.close()
    return {"events": events, "watchers": watchers,
            "ack_ms": round(statistics.median(acks), 2), "applied_ms": round(statistics.median(applied), 2),
            "applied_ms_max": round(max(applied), 2),
            "replay_ms": round(statistics.median(replay), 2), "start_empty_ms": round(statistics.median(baseline), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=30)
    parser.add_argument("--watchers", type=int, default=4)
    parser.add_argument("--replays", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args()
    if not 1 <= args.events <= MAX_EVENTS:
        parser.error(f"--events must be 1..{MAX_EVENTS}")
    with tempfile.TemporaryDirectory() as store:
        server = EmbeddedNatsServer(store_dir=Path(store)).start()
        try:
            result = asyncio.run(run(server.url, args.events, args.watchers, args.replays, args.timeout))
        finally:
            server.stop()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
