"""A 20 MB+ model travels through the Object Store (claim check) inside a signed envelope."""

from __future__ import annotations

import asyncio

import torch
from nats.js.api import DeliverPolicy

from fedbus.bus import Subjects, connect, ensure_job_infrastructure
from fedbus.crypto.envelopes import EnvelopeVerifier, Rejection
from fedbus.crypto.federation import Federation, FederationFile, Participant
from fedbus.crypto.keys import Identity
from fedbus.messaging import Messenger
from fedbus.protocol.messages import Update


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
