"""Claim-check storage for payloads bigger than a NATS message (models, large updates).

Writes go through nats-py's object store, so the layout (stream OBJ_<bucket>, chunk
subject $O.<bucket>.C.<nuid>, meta subject, SHA-256 digest) is the standard one any
NATS client can read. Reads do not use nats-py's ObjectStore.get(): it grows the
result by concatenation and stalls on flow control (~26 s for 100 MiB). Here the
chunks are streamed by an ordered push consumer into a preallocated buffer and
hashed on the way in.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import mmap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from collections.abc import Iterable
from typing import Any

import nats.js.errors
import structlog
from nats.js.api import Header, ObjectInfo, ObjectMeta, ObjectMetaOptions
from nats.js.object_store import OBJ_CHUNKS_PRE_TEMPLATE, OBJ_META_PRE_TEMPLATE, ObjectStore

from fedbus.allocator import large_buffer
from fedbus.chunking import regroup

from .layout import BLOBS_BUCKET

log = structlog.get_logger(__name__)

DIGEST_PREFIX = "SHA-256="
# A chunk is one NATS message: leave room under max_payload for headers that
# mirrors/sources add when the bucket is replicated to another domain.
HEADER_ROOM = 4 * 1024
# Bigger chunks barely speed up writes past 1 MiB, and each one must fit in the
# client's outgoing buffer and the reader's pending queue.
MAX_CHUNK_SIZE = 1024 * 1024
MIN_CHUNK_SIZE = 4 * 1024


# A read may take READ_TIMEOUT_FLOOR_S plus the object's size at READ_TIMEOUT_RATE: a 1 GB
# model is not cut off at a fixed 30 s on a loaded machine, a small one still fails fast.
READ_TIMEOUT_FLOOR_S = 30.0
READ_TIMEOUT_RATE = 10 * 10**6  # bytes per second, far below what a read achieves (~500 MB/s)


def read_timeout_s(size: int) -> float:
    return READ_TIMEOUT_FLOOR_S + size / READ_TIMEOUT_RATE


def chunk_size_for(max_payload: int) -> int:
    """Largest chunk that stays under the server's max_payload with header room."""
    return max(MIN_CHUNK_SIZE, min(MAX_CHUNK_SIZE, max_payload - HEADER_ROOM))


@dataclass(frozen=True)
class BlobRef:
    """What a signed envelope carries instead of the bytes."""

    bucket: str
    name: str
    size: int
    digest: str  # "SHA-256=<base64url>", exactly as the object store writes it


class BlobIntegrityError(Exception):
    """The stored object is not what was promised. `reason` is a stable name:
    size_mismatch, digest_mismatch, missing_chunks, malformed_digest."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class BlobNotFound(Exception):
    """No such object (or no such bucket)."""


def _digest_bytes(digest: str) -> bytes:
    """Raw SHA-256 from "SHA-256=<base64url>" (prefix case-insensitive, padding optional)."""
    if not isinstance(digest, str) or not digest.upper().startswith(DIGEST_PREFIX):
        raise BlobIntegrityError("malformed_digest", f"{digest!r} does not start with {DIGEST_PREFIX}")
    encoded = digest[len(DIGEST_PREFIX) :]
    try:
        raw = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
    except (binascii.Error, ValueError) as err:
        raise BlobIntegrityError("malformed_digest", f"{digest!r}: {err}") from None
    if len(raw) != hashlib.sha256().digest_size:
        raise BlobIntegrityError("malformed_digest", f"{digest!r} is not a SHA-256 digest")
    return raw


def format_digest(raw: bytes) -> str:
    return DIGEST_PREFIX + base64.urlsafe_b64encode(raw).decode()


class _ChunkReader:
    """Callback state for one read: writes chunks in order into `buf` and hashes them."""

    def __init__(self, size: int, chunks: int) -> None:
        self.buf = large_buffer(size)  # (huge pages: most of a fresh buffer's first fill is page faults)
        self.chunks = chunks
        self.offset = 0
        self.received = 0
        self.hasher = hashlib.sha256()
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Chunks are hashed in order on one thread of their own (hashlib releases the GIL),
        # so the digest overlaps with receiving instead of stalling the event loop.
        self._hash_thread = ThreadPoolExecutor(1, thread_name_prefix="blob-hash")
        self._hashed: Any = None

    async def digest(self) -> bytes:
        """The SHA-256 of every chunk received, once the hash thread caught up."""
        try:
            if self._hashed is not None:
                await asyncio.wrap_future(self._hashed)
            return self.hasher.digest()
        finally:
            self._hash_thread.shutdown(wait=False)

    def _fail(self, reason: str, detail: str) -> None:
        if not self.done.done():
            self.done.set_exception(BlobIntegrityError(reason, detail))

    async def on_chunk(self, msg: Any) -> None:
        if self.done.done():
            return
        data = msg.data
        end = self.offset + len(data)
        if end > len(self.buf):
            self._fail("size_mismatch", f"chunks exceed the declared size {len(self.buf)}")
            return
        self.buf[self.offset : end] = data
        self._hashed = self._hash_thread.submit(self.hasher.update, data)
        self.offset = end
        self.received += 1
        if self.received == self.chunks:
            self.done.set_result(None)
        elif msg.metadata.num_pending == 0:
            # Nothing more is stored for this object: chunks were purged or lost.
            self._fail("missing_chunks", f"stream has only {self.received} of {self.chunks} chunks")


class BlobStore:
    """Put/get/delete large payloads in one object-store bucket."""

    def __init__(self, nc: Any, js: Any, bucket: str = BLOBS_BUCKET) -> None:
        self._nc = nc
        self._js = js
        self.bucket = bucket
        self._store: ObjectStore | None = None

    @property
    def stream(self) -> str:
        return f"OBJ_{self.bucket}"

    @property
    def chunk_size(self) -> int:
        return chunk_size_for(self._nc.max_payload)

    async def _object_store(self) -> ObjectStore:
        if self._store is None:
            try:
                self._store = await self._js.object_store(self.bucket)
            except nats.js.errors.BucketNotFoundError:
                raise BlobNotFound(
                    f"object store bucket {self.bucket!r} does not exist (ensure_job_infrastructure creates it)"
                ) from None
        return self._store

    async def put(self, name: str, data: bytes | bytearray | memoryview) -> BlobRef:
        if not isinstance(name, str) or not name:
            raise ValueError("blob name must be a non-empty string")
        store = await self._object_store()
        # nats-py only reads bytes synchronously; other buffers would go through a
        # thread-pool reader per chunk. One copy is cheaper.
        payload = data if isinstance(data, bytes) else bytes(data)
        meta = ObjectMeta(name=name, options=ObjectMetaOptions(max_chunk_size=self.chunk_size))
        info = await store.put(name, payload, meta=meta)
        ref = BlobRef(bucket=self.bucket, name=info.name, size=info.size or 0, digest=info.digest or "")
        log.debug("bus.blob.put", bucket=self.bucket, name=name, size=ref.size, chunks=info.chunks)
        return ref

    async def put_new(self, name: str, data: bytes | bytearray | memoryview) -> BlobRef:
        """``put_stream`` of one buffer."""
        return await self.put_stream(name, [data])

    async def put_stream(self, name: str, pieces: Iterable[bytes | bytearray | memoryview]) -> BlobRef:
        """Write an object under a name that is new (claim checks carry a random suffix), in
        the standard layout, from consecutive pieces (tensor views, encrypted chunks): the
        whole object is never held in one buffer, and each byte is hashed once.

        nats-py's ``put`` reads the existing entry (STREAM.MSG.GET on the bucket's stream) to
        clean up after a replaced object; granting a worker that API would let it read every
        object in the bucket, other workers' updates included. This needs nothing but
        publishing the chunks and the meta entry (see fedbus/bus/permissions.py).

        Each chunk is hashed in a thread while the previous one is being published and
        acknowledged: hashlib releases the GIL, so the digest costs no wall time on a
        second core."""
        if not isinstance(name, str) or not name:
            raise ValueError("blob name must be a non-empty string")
        nuid = self._nc._nuid.next().decode()
        chunk_subject = OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=self.bucket, obj=nuid)
        step, hasher = self.chunk_size, hashlib.sha256()
        size = chunks = 0
        hashing: asyncio.Future | None = None
        for chunk in regroup(pieces, step):  # (nats-py writes payloads as bytes)
            if hashing is not None:
                await hashing
            hashing = asyncio.ensure_future(asyncio.to_thread(hasher.update, chunk))
            await self._js.publish(chunk_subject, chunk)
            size += len(chunk)
            chunks += 1
        if hashing is not None:
            await hashing
        digest = format_digest(hasher.digest())
        info = ObjectInfo(name=name, bucket=self.bucket, nuid=nuid, size=size, chunks=chunks, digest=digest,
                          mtime=datetime.now(timezone.utc).isoformat(),
                          options=ObjectMetaOptions(max_chunk_size=step))
        meta_subject = OBJ_META_PRE_TEMPLATE.format(bucket=self.bucket,
                                                    obj=base64.urlsafe_b64encode(name.encode()).decode())
        await self._js.publish(meta_subject, json.dumps(info.as_dict()).encode(), headers={Header.ROLLUP: "sub"})
        log.debug("bus.blob.put", bucket=self.bucket, name=name, size=size, chunks=chunks)
        return BlobRef(bucket=self.bucket, name=name, size=size, digest=digest)

    async def info(self, name: str) -> ObjectInfo:
        store = await self._object_store()
        try:
            return await store.get_info(name)
        except nats.js.errors.NotFoundError:
            raise BlobNotFound(f"blob {name!r} not found in bucket {self.bucket!r}") from None

    async def get(
        self,
        name: str,
        *,
        expected_size: int | None = None,
        expected_digest: str | None = None,
        timeout: float | None = None,
    ) -> bytearray | mmap.mmap:
        """Read and verify a blob into a writable buffer of its own (``large_buffer``).
        Raises BlobNotFound, BlobIntegrityError, TimeoutError.
        ``timeout`` (seconds for the whole read) defaults to ``read_timeout_s`` of its size."""
        info = await self.info(name)
        if info.is_link():
            raise BlobNotFound(f"blob {name!r} is a link; links are not supported")
        size, chunks = info.size or 0, info.chunks or 0
        stored_digest = _digest_bytes(info.digest or "")

        # Check what the caller was promised before downloading anything: a
        # claim-check that names a different object must not cost a transfer.
        if expected_size is not None and expected_size != size:
            raise BlobIntegrityError("size_mismatch", f"expected {expected_size} bytes, stored {size}")
        if expected_digest is not None and _digest_bytes(expected_digest) != stored_digest:
            raise BlobIntegrityError("digest_mismatch", f"expected {expected_digest}, stored {info.digest}")

        if chunks == 0:
            if size:
                raise BlobIntegrityError("missing_chunks", f"declared {size} bytes in 0 chunks")
            buf, actual = bytearray(), hashlib.sha256().digest()
        else:
            buf, actual = await self._read_chunks(info, read_timeout_s(size) if timeout is None else timeout)
        if actual != stored_digest:
            raise BlobIntegrityError("digest_mismatch", f"read {format_digest(actual)}, declared {info.digest}")
        return buf

    async def _read_chunks(self, info: ObjectInfo, timeout: float) -> tuple[bytearray | mmap.mmap, bytes]:
        size, chunks = info.size or 0, info.chunks or 0
        subject = f"$O.{self.bucket}.C.{info.nuid}"
        # Count the stored chunks first (a small JSON answer): a purged object fails
        # at once instead of waiting for chunks that will never come.
        state = (await self._js.stream_info(self.stream, subjects_filter=subject)).state
        stored = (state.subjects or {}).get(subject, 0)
        if stored < chunks:
            raise BlobIntegrityError("missing_chunks", f"stream has {stored} of {chunks} chunks")

        reader = _ChunkReader(size, chunks)
        sub = await self._js.subscribe(
            subject,
            stream=self.stream,
            cb=reader.on_chunk,
            ordered_consumer=True,
            # nats-py drops messages above this limit *after* advancing the ordered
            # consumer's sequence, so a drop would look like a missing chunk: make
            # room for the whole object.
            pending_bytes_limit=max(64 * 1024 * 1024, 2 * size),
        )
        try:
            await asyncio.wait_for(reader.done, timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(
                f"blob {info.name!r}: {reader.received} of {chunks} chunks after {timeout}s"
            ) from None
        finally:
            try:
                await sub.unsubscribe()
            except Exception as err:  # the connection may be gone; the read result stands
                log.warning("bus.blob.unsubscribe_failed", error=repr(err))
            reader._hash_thread.shutdown(wait=False)  # queued hashes still run; no new ones
        digest = await reader.digest()
        if reader.offset != size:
            raise BlobIntegrityError("size_mismatch", f"read {reader.offset} bytes, declared {size}")
        buf, reader.buf = reader.buf, bytearray()  # nats-py may keep the callback (and so the reader) alive
        return buf, digest

    async def delete(self, name: str) -> None:
        """Delete a blob. Idempotent: deleting a missing blob is not an error, so
        cleanup can be retried after a crash."""
        store = await self._object_store()
        try:
            await store.delete(name)
        except nats.js.errors.NotFoundError:
            log.debug("bus.blob.delete_missing", bucket=self.bucket, name=name)

    async def delete_completely(self, name: str) -> None:
        """Delete a blob and leave nothing behind: ``delete`` keeps a deletion marker on the
        object's meta subject (one per name, forever); retention purges that subject too, so
        a long job's deleted objects cost no bytes at all."""
        await self.delete(name)
        meta = OBJ_META_PRE_TEMPLATE.format(bucket=self.bucket, obj=base64.urlsafe_b64encode(name.encode()).decode())
        await self._js.purge_stream(self.stream, subject=meta)

    async def names(self) -> list[str]:
        """Names of the objects in the bucket (deleted ones left out); [] when it is empty."""
        store = await self._object_store()
        try:
            infos = await store.list(ignore_deletes=True)
        except nats.js.errors.NotFoundError:
            return []
        return [info.name for info in infos]
