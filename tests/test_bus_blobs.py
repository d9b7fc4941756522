from __future__ import annotations

import asyncio
import base64
import hashlib
import os

import pytest

from fedbus.bus import (
    BLOBS_BUCKET,
    BlobIntegrityError,
    BlobNotFound,
    BlobRef,
    BlobStore,
    Subjects,
    connect,
    ensure_job_infrastructure,
)
from fedbus.bus.blobs import chunk_size_for
from fedbus.bus.server import EmbeddedNatsServer


def _digest(data: bytes) -> str:
    return "SHA-256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode()


async def _with_store(url: str, body) -> object:
    nc = await connect(url, "test-blobs", first_connect_timeout=5)
    try:
        js = nc.jetstream()
        await ensure_job_infrastructure(js, Subjects("blobs"))
        return await body(BlobStore(nc, js), js)
    finally:
        await nc.close()


def test_chunk_size_stays_under_max_payload() -> None:
    assert 1_000_000 < chunk_size_for(1024 * 1024) < 1024 * 1024
    assert chunk_size_for(64 * 1024 * 1024) == 1024 * 1024
    assert chunk_size_for(64 * 1024) < 64 * 1024


def test_24mb_model_roundtrips_with_size_and_digest_checks(nats_server: EmbeddedNatsServer) -> None:
    data = os.urandom(24 * 1024 * 1024 + 12345)  # not a multiple of the chunk size

    async def body(store: BlobStore, js) -> None:
        ref = await store.put("model-v1", data)
        assert ref == BlobRef(BLOBS_BUCKET, "model-v1", len(data), _digest(data))
        info = await store.info("model-v1")
        assert info.chunks > 20  # really chunked, each chunk under max_payload
        out = await store.get("model-v1", expected_size=ref.size, expected_digest=ref.digest)
        assert not memoryview(out).readonly and out[:] == data  # a writable buffer of its own (huge pages when large)

    asyncio.run(_with_store(nats_server.url, body))


def test_small_payloads_and_buffer_types(nats_server: EmbeddedNatsServer) -> None:
    async def body(store: BlobStore, js) -> None:
        for name, payload in [("bytes", b"hi"), ("bytearray", bytearray(b"abc")), ("memoryview", memoryview(b"xyz" * 1000))]:
            ref = await store.put(name, payload)
            assert ref.size == len(bytes(payload))
            assert await store.get(name, expected_digest=ref.digest) == bytes(payload)
        ref = await store.put("empty", b"")
        assert ref.size == 0
        assert await store.get("empty", expected_size=0, expected_digest=ref.digest) == b""

    asyncio.run(_with_store(nats_server.url, body))


def test_replacing_a_blob_returns_the_new_content(nats_server: EmbeddedNatsServer) -> None:
    async def body(store: BlobStore, js) -> None:
        await store.put("x", b"old" * 500_000)
        ref = await store.put("x", b"new" * 400_000)
        assert await store.get("x", expected_digest=ref.digest) == b"new" * 400_000

    asyncio.run(_with_store(nats_server.url, body))


def test_wrong_expectations_raise_named_reasons(nats_server: EmbeddedNatsServer) -> None:
    data = os.urandom(3 * 1024 * 1024)

    async def body(store: BlobStore, js) -> None:
        ref = await store.put("m", data)
        with pytest.raises(BlobIntegrityError) as err:
            await store.get("m", expected_size=ref.size + 1)
        assert err.value.reason == "size_mismatch"
        with pytest.raises(BlobIntegrityError) as err:
            await store.get("m", expected_digest=_digest(b"something else"))
        assert err.value.reason == "digest_mismatch"
        with pytest.raises(BlobIntegrityError) as err:
            await store.get("m", expected_digest="MD5=abc")
        assert err.value.reason == "malformed_digest"

    asyncio.run(_with_store(nats_server.url, body))


def test_missing_blob_and_missing_bucket(nats_server: EmbeddedNatsServer) -> None:
    async def body(store: BlobStore, js) -> None:
        with pytest.raises(BlobNotFound):
            await store.get("never-written")
        await store.put("gone", b"data")
        await store.delete("gone")
        with pytest.raises(BlobNotFound):
            await store.get("gone")
        await store.delete("gone")  # idempotent
        with pytest.raises(BlobNotFound, match="bucket"):
            await BlobStore(store._nc, js, bucket="no-such-bucket").get("x")

    asyncio.run(_with_store(nats_server.url, body))


def test_data_is_read_from_the_chunk_subject(nats_server: EmbeddedNatsServer) -> None:
    """Tampered or purged chunks are detected from what is actually read."""
    data = os.urandom(2 * 1024 * 1024 + 7)

    async def body(store: BlobStore, js) -> None:
        ref = await store.put("m", data)
        info = await store.info("m")
        chunk_subject = f"$O.{BLOBS_BUCKET}.C.{info.nuid}"

        # Rewrite the chunks with same-sized garbage: the meta (and its digest) is
        # untouched, so only hashing the bytes read can notice.
        await js.purge_stream(store.stream, subject=chunk_subject)
        size = store.chunk_size
        for offset in range(0, len(data), size):
            await js.publish(chunk_subject, bytes(len(data[offset : offset + size])))
        with pytest.raises(BlobIntegrityError) as err:
            await store.get("m", expected_size=ref.size, expected_digest=ref.digest)
        assert err.value.reason == "digest_mismatch"

        # Chunks gone, meta still there.
        await js.purge_stream(store.stream, subject=chunk_subject)
        with pytest.raises(BlobIntegrityError) as err:
            await store.get("m")
        assert err.value.reason == "missing_chunks"

        # One chunk short.
        for offset in range(0, len(data) - size, size):
            await js.publish(chunk_subject, data[offset : offset + size])
        with pytest.raises(BlobIntegrityError) as err:
            await store.get("m")
        assert err.value.reason == "missing_chunks"

    asyncio.run(_with_store(nats_server.url, body))


def test_reader_leaves_no_consumer_or_subscription_behind(nats_server: EmbeddedNatsServer) -> None:
    async def body(store: BlobStore, js) -> None:
        await store.put("m", os.urandom(3 * 1024 * 1024))
        subs_before = len(store._nc._subs)
        for _ in range(3):
            await store.get("m")
        with pytest.raises(BlobIntegrityError):
            await store.get("m", expected_size=1)
        assert len(store._nc._subs) == subs_before

    asyncio.run(_with_store(nats_server.url, body))


def test_get_times_out_when_chunks_stop_arriving(nats_server: EmbeddedNatsServer) -> None:
    async def body(store: BlobStore, js) -> None:
        await store.put("m", os.urandom(2 * 1024 * 1024))
        with pytest.raises(TimeoutError):
            await store.get("m", timeout=0.000001)

    asyncio.run(_with_store(nats_server.url, body))
