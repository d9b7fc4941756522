"""A large model is announced by reference: round.open names the committed object of its
version in the models bucket instead of carrying the model a second time, and a receiver
reads it only from there, only this job's, bounded and checked (fedbus.messaging)."""

from __future__ import annotations

import asyncio

import torch
from nats.js.api import DeliverPolicy

from fedbus.bus import BLOBS_BUCKET, Subjects, connect, ensure_job_infrastructure
from fedbus.coordinator.jobstate import JobStateStore
from fedbus.coordinator.records import JobRecord
from fedbus.crypto.envelopes import EnvelopeVerifier, Rejection
from fedbus.crypto.federation import Federation, FederationFile, Participant
from fedbus.crypto.keys import Identity
from fedbus.messaging import Messenger
from fedbus.protocol.envelope import BlobPointer
from fedbus.protocol.messages import RoundOpen

JOB = "refjob"


def model() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"w": torch.randn(512, 1024, generator=g), "b": torch.randn(1024, generator=g).to(torch.float16),
            "steps": torch.tensor(4, dtype=torch.int64)}


def record(version: int) -> JobRecord:
    return JobRecord(round=version, phase="round_open", model_version=version, rounds_completed=0, cohort=("w01",))


async def announce(url: str, mutate=None, *, max_body: int = 64 << 20, strategy: dict | None = None):
    """Commit a model (as the coordinator's job state does), announce it by reference, and
    receive the announcement as a worker; ``mutate(ref) -> ref`` forges the pointer."""
    coordinator = Identity.generate("coordinator", "coordinator")
    federation = Federation(FederationFile(participants=[Participant(**coordinator.participant_entry())]))
    subjects = Subjects(JOB)
    nc = await connect(url, name="ref-test", first_connect_timeout=10)
    try:
        js = nc.jetstream()
        await ensure_job_infrastructure(js, subjects)
        store = JobStateStore(nc, js, JOB, coordinator)
        await store.reset()
        await store.commit(run="r1700000000000-0a0b0c0d", record=record(1), model=model(),
                           strategy_state=strategy or {}, now_ms=0)
        ref = dict(store.model_ref_for(1))
        ref = mutate(ref) if mutate else ref
        messenger = Messenger(nc, js, coordinator, subjects, inline_max_bytes=512 * 1024)
        body = RoundOpen(round=1, model_version=1, cohort=["w01"], deadline_ms=1, model=BlobPointer(**ref))
        header = await messenger.publish(subjects.ctl("round.open"), body, {"extra/c": torch.ones(3)}, round=1)
        sub = await js.subscribe(subjects.ctl("round.open"), ordered_consumer=True, deliver_policy=DeliverPolicy.LAST)
        msg = await sub.next_msg(timeout=10)
        verifier = EnvelopeVerifier(federation, JOB, max_age_ms=60_000, max_future_ms=5_000, max_body_bytes=max_body)
        blobs = await messenger.blobs.names()
        try:
            got = await messenger.receive(verifier, msg.data)
            return header, got, None, blobs, store
        except Rejection as rej:
            return header, None, rej, blobs, store
    finally:
        await nc.close()


def test_a_large_model_is_announced_by_reference_and_read_from_the_committed_object(nats_server):
    header, got, err, blobs, store = asyncio.run(announce(nats_server.url))
    assert err is None
    assert header.blob is None and header.length < 4096, "the announcement itself is small and inline"
    assert not [n for n in blobs if n.startswith(f"{JOB}/")], "nothing was written to the blob bucket"
    assert got.fields.model.name == store.model_ref["name"]
    want = model()
    assert set(got.tensors) == {*want, "extra/c"}
    for name, t in want.items():
        assert got.tensors[name].dtype == t.dtype and torch.equal(got.tensors[name], t), name


def test_the_strategy_state_is_a_separate_object_the_announcement_does_not_carry(nats_server):
    state = {"m": {"w": torch.full((512, 1024), 2.0)}}
    _, got, err, _, store = asyncio.run(announce(nats_server.url, strategy=state))
    assert err is None
    assert store.strategy_ref is not None and store.strategy_ref["name"] != store.model_ref["name"]
    assert store.model_ref["size"] < 2.2 * 2**20, "the model object holds the model alone"
    assert not any(k.startswith("strategy") or k == "m" for k in got.tensors)


def test_a_pointer_outside_the_models_bucket_or_the_job_is_refused_before_any_read(nats_server):
    for forge in (lambda r: {**r, "bucket": BLOBS_BUCKET}, lambda r: {**r, "name": "otherjob/v1/abc"}):
        _, got, err, _, _ = asyncio.run(announce(nats_server.url, forge))
        assert got is None and err.reason == "pointer_not_allowed", err


def test_a_model_over_the_limit_or_not_as_signed_is_refused(nats_server):
    _, _, err, _, _ = asyncio.run(announce(nats_server.url, max_body=1 << 20))
    assert err.reason == "oversize", err
    _, _, err, _, _ = asyncio.run(announce(nats_server.url, lambda r: {**r, "digest": "SHA-256=" + "A" * 43 + "="}))
    assert err.reason == "blob_unavailable", err
    _, _, err, _, _ = asyncio.run(announce(nats_server.url, lambda r: {**r, "name": r["name"] + "x"}))
    assert err.reason == "blob_unavailable", err
