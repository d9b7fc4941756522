"""Sealed updates end to end: neither a client subscribed to every subject (``>``) during
the job nor the nats-server's store files on disk hold a sealed update in the clear.

Real nats-server, coordinator and two worker processes through the CLI, with the default
``seal_updates: auto``. Each worker's update is its own constant byte pattern
(``tests/pattern_task.py``), large enough to go through the Object Store. w01 seals. w02
runs with an older federation file that lists no encryption key for the coordinator, so
under ``auto`` it sends in the clear: the control in the same run, on the same path,
which the same checks must find (so the test can fail).
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from pathlib import Path

import pytest

from fedbus.bus import connect
from fedbus.crypto.federation import Federation
from fedbus.jobspec import CohortSpec, JobSpec
from tests.e2e_support import LocalFederation
from tests.pattern_task import pattern_of

pytestmark = pytest.mark.e2e

PATTERNS = (pattern_of(0), pattern_of(1))  # w01's and w02's update bytes


class Sniffer:
    """A client that reads every subject for the length of a job, in its own thread, and
    counts the messages that hold each pattern (it keeps counts, not the messages)."""

    def __init__(self, url: str, patterns: tuple[bytes, ...]):
        self.url, self.patterns = url, patterns
        self.hits: Counter[int] = Counter()  # pattern index -> messages holding it
        self.subjects: Counter[str] = Counter()  # subject kind -> messages
        self.bytes = 0
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def _kind(self, subject: str) -> str:
        if subject.startswith("$O.fedbus-blobs.C."):
            return "blob_chunk"
        parts = subject.split(".")
        return parts[2] if subject.startswith("fedbus.") and len(parts) > 2 else "other"

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        nc = await connect(self.url, name="sniffer", first_connect_timeout=10)

        async def on_msg(msg) -> None:
            self.subjects[self._kind(msg.subject)] += 1
            self.bytes += len(msg.data)
            for i, pattern in enumerate(self.patterns):
                if pattern in msg.data:
                    self.hits[i] += 1

        # Large limits: a slow sniffer must not be dropped (it would then see nothing).
        await nc.subscribe(">", cb=on_msg, pending_msgs_limit=1_000_000, pending_bytes_limit=1 << 30)
        await nc.flush()
        self._ready.set()
        await self._stop.wait()
        await nc.close()

    def __enter__(self) -> Sniffer:
        self._thread.start()
        assert self._ready.wait(20), "sniffer did not connect"
        return self

    def __exit__(self, *exc) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(20)


def patterns_on_disk(store: Path) -> tuple[Counter[int], int]:
    """(files holding each pattern, bytes scanned) under a nats-server store directory."""
    found: Counter[int] = Counter()
    scanned = 0
    for path in store.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            scanned += len(data)
            for i, pattern in enumerate(PATTERNS):
                found[i] += pattern in data
    return found, scanned


def test_sealed_updates_leave_no_plaintext_on_the_bus_or_on_disk(tmp_path, nats_server_factory):
    store = tmp_path / "store"
    server = nats_server_factory(store_dir=store)
    job = JobSpec(job="sealed", task="tests.pattern_task:task", rounds=1, seed=0,
                  cohort=CohortSpec(min_workers=2, min_updates=2, wait_for_workers_s=120), round_deadline_s=60,
                  evaluation={"server_test": False, "federated": False, "final_round": False},
                  # keep the updates and their claim checks after the job (by default a finished
                  # job deletes them), so the store still holds w02's plain one for the check below
                  retention={"keep_updates": True})
    assert job.security.seal_updates == "auto"  # the default
    fed = LocalFederation(tmp_path / "run", server.url, job, num_workers=2)
    old = fed.federation.spec.model_copy(deep=True)
    old.participants[0] = old.participants[0].model_copy(update={"encryption_key": None})
    assert old.participants[0].role == "coordinator"
    Federation(old).dump(tmp_path / "old-federation.yaml")

    def args(worker: str) -> tuple[str, ...]:  # the last --federation wins
        return ("--federation", str(tmp_path / "old-federation.yaml")) if worker == "w02" else ()

    with Sniffer(server.url, PATTERNS) as sniffer:
        summary = fed.run_job(timeout=150, worker_args=args)
    server.stop()  # flushes the store; the directory stays (the test owns it)
    on_disk, scanned = patterns_on_disk(store)

    assert summary["reason"] == "completed" and summary["updates_accepted"] == 2, summary
    assert summary["updates_sealed"] == 1  # w01's
    assert '"sealing.unavailable"' in (fed.run_dir / "logs" / "w02.log").read_text()
    # The sniffer saw both updates and their blob chunks, and the store holds them.
    assert sniffer.subjects["upd"] >= 2 and sniffer.subjects["blob_chunk"] >= 4, sniffer.subjects
    assert scanned > 2 * 1_200_000
    # w01's sealed update: nowhere. w02's plain one: on the bus and on disk.
    assert sniffer.hits[0] == 0 and on_disk[0] == 0, (sniffer.hits, on_disk)
    assert sniffer.hits[1] >= 1 and on_disk[1] >= 1, (sniffer.hits, on_disk)
