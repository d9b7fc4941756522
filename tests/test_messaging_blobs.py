"""A 20 MB+ model travels through the Object Store (claim check) inside a signed envelope."""

from __future__ import annotations

import asyncio

import torch
from nats.js.api import DeliverPolicy

from fedbus.bus import Subjects, connect, ensure_job_infrastructure
from fedbus.crypto.envelopes import EnvelopeVerifier, Rejection, seal
from fedbus.crypto.federation import Federation, FederationFile, Participant
from fedbus.crypto.keys import Identity
from fedbus.jobspec import JobSpec
from fedbus.messaging import Messenger, verifier_for
from fedbus.protocol.envelope import BlobPointer
from fedbus.protocol.messages import Heartbeat, Update, encode_body


def big_model() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"encoder.weight": torch.randn(2048, 2048, generator=g),        # 16 MiB
            "decoder.weight": torch.randn(1024, 1024, generator=g),        # 4 MiB
            "decoder.bias": torch.randn(1024, generator=g).to(torch.float16),
            "bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64)}


async def roundtrip(url: str, tamper: bool) -> tuple[object, dict | None, Exception | None]:
    worker = Identity.generate("w01", "worker")
    federation = Federation(FederationFile(participants=[Participant(**worker.participant_entry())]))
    subjects = Subjects("blobjob")
    nc = await connect(url, name="blob-test", first_connect_timeout=10)
    js = nc.jetstream()
    await ensure_job_infrastructure(js, subjects)
    messenger = Messenger(nc, js, worker, subjects, inline_max_bytes=512 * 1024)
    model = big_model()
    header = await messenger.publish(subjects.upd("default", "w01"), Update(round=1, base_version=0, num_samples=5,
                                     num_steps=1), model, round=1)
    assert header.blob is not None and header.length > 20 * 2**20
    if tamper:
        # Replace the stored object with other bytes of the same size under the same name.
        data = bytearray(await messenger.blobs.get(header.blob.name))
        data[-100] ^= 0xFF
        await messenger.blobs.put(header.blob.name, bytes(data))
    sub = await js.subscribe(subjects.upd_all, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
    msg = await sub.next_msg(timeout=10)
    assert len(msg.data) < 1024, "the envelope on the bus carries only the pointer"
    verifier = EnvelopeVerifier(federation, "blobjob", max_age_ms=60_000, max_future_ms=5_000,
                                max_body_bytes=64 << 20)
    try:
        got = await messenger.receive(verifier, msg.data, sender_token="w01")
        return header, got.tensors, None
    except Rejection as rej:
        return header, None, rej
    finally:
        await nc.close()


def test_20mb_model_roundtrips_through_object_store(nats_server):
    header, tensors, err = asyncio.run(roundtrip(nats_server.url, tamper=False))
    assert err is None
    expected = big_model()
    assert set(tensors) == set(expected)
    for name, t in expected.items():
        assert tensors[name].dtype == t.dtype and torch.equal(tensors[name], t), name


def test_tampered_blob_is_rejected(nats_server):
    _, tensors, err = asyncio.run(roundtrip(nats_server.url, tamper=True))
    assert tensors is None
    assert isinstance(err, Rejection) and err.reason == "blob_unavailable", err


# ---- claim checks are refused before any download --------------------------------------

async def claim_checks(url: str) -> dict[str, object]:
    """Pointers a listed worker may not use, against a real Object Store."""
    w01, w02 = Identity.generate("w01", "worker"), Identity.generate("w02", "worker")
    federation = Federation(FederationFile(participants=[Participant(**w.participant_entry()) for w in (w01, w02)]))
    subjects = Subjects("blobjob")
    nc = await connect(url, name="blob-claims", first_connect_timeout=10)
    js = nc.jetstream()
    await ensure_job_infrastructure(js, subjects)
    receiver = Messenger(nc, js, w02, subjects, inline_max_bytes=512 * 1024)
    verifier = verifier_for(JobSpec.model_validate({"job": "blobjob", "task": "digits", "rounds": 1,
                                                    "security": {"max_message_bytes": 8 << 20}}), federation)
    # w02's own 6 MiB object: a pointer of w01's naming it must not cost a download
    body_w02 = encode_body(Update(round=1, base_version=0, num_samples=5, num_steps=1),
                           {"w": torch.zeros(6 * 2**20 // 4)})
    ref = await receiver.blobs.put("blobjob/w02/update/1/abcd", body_w02)
    downloads = []
    real_get = receiver.blobs.get

    async def counting_get(*args, **kwargs):
        downloads.append(args[0])
        return await real_get(*args, **kwargs)

    receiver.blobs.get = counting_get  # the real store, counted
    out: dict[str, object] = {}

    async def attempt(label, identity, msg_type, body, pointer):
        wire, _ = seal(identity, msg_type, job="blobjob", round=1, body=body, blob=pointer)
        try:
            got = await receiver.receive(verifier, wire, sender_token=identity.id, offload=True)
            out[label] = got
        except Rejection as rej:
            out[label] = rej.reason
        except Exception as exc:  # must never happen: the point of these checks
            out[label] = f"escaped {type(exc).__name__}"

    other = BlobPointer(bucket=ref.bucket, name=ref.name, size=ref.size, digest=ref.digest)
    await attempt("other-sender", w01, "update", body_w02, other)
    await attempt("invalid-bucket", w01, "update", body_w02,
                  other.model_copy(update={"bucket": "no such bucket!", "name": "blobjob/w01/update/1/x"}))
    await attempt("models-bucket", w01, "update", body_w02,
                  other.model_copy(update={"bucket": "fedbus-models", "name": "blobjob/w01/update/1/x"}))
    hb = encode_body(Heartbeat(num_samples=1, partition=0))
    await attempt("heartbeat", w01, "heartbeat", hb,
                  BlobPointer(bucket=ref.bucket, name="blobjob/w01/heartbeat/1/x", size=len(hb), digest=ref.digest))
    out["downloads_refused"] = list(downloads)
    # over the job's limit: refused on the header
    big = BlobPointer(bucket=ref.bucket, name="blobjob/w01/update/1/big", size=9 << 20, digest=ref.digest)
    wire, header = seal(w01, "update", job="blobjob", round=1, body=b"\0" * 16, blob=big)
    from fedbus.protocol.envelope import encode_header, frame
    hb_bytes = encode_header(header.model_copy(update={"length": 9 << 20}))
    try:
        await receiver.receive(verifier, frame(hb_bytes, w01.sign(hb_bytes), b""), sender_token="w01")
    except Rejection as rej:
        out["oversize"] = rej.reason
    # a missing object of the sender's own naming: asked for, refused as unavailable
    await attempt("missing", w01, "update", body_w02, other.model_copy(update={"name": "blobjob/w01/update/1/none"}))
    # a genuine claim check of w01's still works, offloaded
    sender = Messenger(nc, js, w01, subjects, inline_max_bytes=512 * 1024)
    wire, header = await sender.seal(Update(round=1, base_version=0, num_samples=5, num_steps=1),
                                     {"w": torch.ones(2**20)}, round=1)
    assert header.blob is not None
    got = await receiver.receive(verifier, wire, sender_token="w01", offload=True)
    out["genuine"] = bool(torch.equal(got.tensors["w"], torch.ones(2**20)))
    out["downloads"] = list(downloads)
    await nc.close()
    return out


def test_claim_checks_outside_the_senders_namespace_are_refused_before_download(nats_server):
    out = asyncio.run(claim_checks(nats_server.url))
    assert out["other-sender"] == "pointer_not_allowed"
    assert out["invalid-bucket"] == "pointer_not_allowed"  # was an exception escaping as handler_failed
    assert out["models-bucket"] == "pointer_not_allowed"
    assert out["heartbeat"] == "pointer_not_allowed"
    assert out["downloads_refused"] == []
    assert out["oversize"] == "oversize"
    assert out["missing"] == "blob_unavailable"
    assert out["genuine"] is True
    assert len(out["downloads"]) == 2  # the missing one (asked, not found) and the genuine one
