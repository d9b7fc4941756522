"""A commit whose ack was lost (a KV leader died mid-request) is recognised on the retry."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from fedbus.coordinator.jobstate import JobStateStore
from fedbus.crypto.keys import Identity


class FakeKV:
    def __init__(self, stored: bytes, revision: int):
        self.stored, self.revision = stored, revision

    async def get(self, key):
        return SimpleNamespace(value=self.stored, revision=self.revision)


def store() -> JobStateStore:
    return JobStateStore(None, None, "job", Identity.generate("coord", "coordinator"))


def test_the_stored_value_of_an_earlier_attempt_is_taken_as_committed():
    s = store()
    s.revision, s._attempted = 7, b"attempt-1"
    kv = FakeKV(b"attempt-1", 8)
    landed = asyncio.run(s._earlier_attempt_landed(kv, Exception("nats: wrong last sequence: 8")))
    assert landed and s.revision == 8 and s._attempted is None


def test_someone_elses_write_is_not_taken_for_ours():
    s = store()
    s.revision, s._attempted = 7, b"attempt-1"
    assert not asyncio.run(s._earlier_attempt_landed(FakeKV(b"rival", 8), Exception("wrong last sequence")))
    assert s.revision == 7
    # Without an earlier failed attempt, or for another error, nothing is assumed.
    s._attempted = None
    assert not asyncio.run(s._earlier_attempt_landed(FakeKV(b"rival", 8), Exception("wrong last sequence")))
    s._attempted = b"rival"
    assert not asyncio.run(s._earlier_attempt_landed(FakeKV(b"rival", 8), TimeoutError()))
