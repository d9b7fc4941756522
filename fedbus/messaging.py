"""Messenger: sign-and-publish and receive-and-verify, shared by every service.

This is the only place where envelopes meet the bus: bodies larger than the inline limit
go to the Object Store (claim check) and the signed header names them; on receipt the
header is verified first and the blob is fetched only for a message that passed every
header check, and only from the job's own bucket, under the sender's own names, and no
larger than the message type allows. An announcement (round.open, eval.open) of a large
model names the coordinator's committed object of that version in the models bucket
instead of carrying the model (``model``); it is read the same way, bounded and checked
against the size and SHA-256 the signed body names, and its tensors join the body's.

Digest and decode of a large body can run off the event loop (``receive(offload=True)``);
the replay guard is still touched only from the loop. Likewise a body that carries tensors
is encoded (and, with ``seal_to``, encrypted to its recipient: ``fedbus.crypto.sealing``)
in a worker thread, so a large update does not stall heartbeats.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import structlog

from fedbus.bus import BLOBS_BUCKET, MODELS_BUCKET, BlobStore, Subjects, publish_with_retry
from fedbus.crypto.envelopes import EnvelopeVerifier, Opened, Rejection, RoundCheck, check_pointer, seal
from fedbus.crypto.federation import Federation
from fedbus.crypto.keys import Identity
from fedbus.crypto.sealing import Opener, SealTarget, seal_pieces
from fedbus.jobspec import JobSpec, SecuritySpec
from fedbus.protocol.codec import DEFAULT_MAX_TENSORS, CodecError, Tensor, decode_tensors
from fedbus.protocol.envelope import BlobPointer, EnvelopeHeader
from fedbus.protocol.messages import MODEL_PREFIX, Body, Update, body_limit, body_pieces, pieces_length
from fedbus.telemetry.metrics import metrics

log = structlog.get_logger(__name__)

# Bodies above this are digested and decoded in a worker thread when offloading: below
# it the thread hop costs more than the work (~1 ms of hashing and decoding per 4 MB).
OFFLOAD_MIN_BYTES = 256 * 1024


@dataclass(frozen=True)
class Received:
    header: EnvelopeHeader
    fields: Body
    tensors: dict[str, Tensor] | None

    @property
    def sealed(self) -> bool:
        """Whether the body travelled as a sealed box (to this receiver)."""
        return self.header.sealed_to is not None


def nats_headers(header: EnvelopeHeader) -> dict[str, str]:
    headers = {"Nats-Msg-Id": header.nonce.hex(), "Fedbus-Type": header.type}
    if header.trace:
        headers["traceparent"] = header.trace
    return headers


def verifier_for(job: JobSpec, federation: Federation, *, max_tensors: int = DEFAULT_MAX_TENSORS,
                 receiver: Identity | None = None) -> EnvelopeVerifier:
    """The verifier a participant of ``job`` uses, with the job's security limits.

    ``max_tensors``: the most tensors one body may carry; pass the model's count plus its
    extras (e.g. 2 * len(model) + 16) once the model is known.
    ``receiver``: the identity of a participant that reads updates (coordinator,
    aggregator), whose encryption key opens sealed updates. With
    ``security.seal_updates: true`` it refuses plain ones (``unsealed_body``); with
    ``auto`` it accepts them (a worker whose federation file lists no key for it), and
    ``summary.json`` shows how many were sealed.
    """
    return security_verifier(job.job, job.security, federation, max_tensors=max_tensors, receiver=receiver)


def security_verifier(job_id: str, sec: SecuritySpec, federation: Federation, *,
                      max_tensors: int = DEFAULT_MAX_TENSORS, receiver: Identity | None = None) -> EnvelopeVerifier:
    """``verifier_for`` from a job id and its security settings alone (tools that know no more)."""
    return EnvelopeVerifier(federation, job_id, max_age_ms=int(sec.max_age_s * 1000),
                            max_future_ms=int(sec.max_future_s * 1000), max_body_bytes=sec.max_message_bytes,
                            blob_bucket=BLOBS_BUCKET, max_tensors=max_tensors,
                            opener=Opener.of(receiver) if receiver is not None else None,
                            sealed_types=frozenset({Update.TYPE}) if sec.seal_updates is True else frozenset())


class Messenger:
    def __init__(self, nc, js, identity: Identity, subjects: Subjects, *, inline_max_bytes: int):
        self.nc = nc
        self.js = js
        self.identity = identity
        self.subjects = subjects
        self.inline_max_bytes = inline_max_bytes
        self.blobs = BlobStore(nc, js)
        self.models = BlobStore(nc, js, MODELS_BUCKET)

    def _pieces(self, fields: Body, tensors: Mapping[str, Tensor] | None, seal_to: SealTarget | None
                ) -> tuple[int, Iterable[bytes | memoryview]]:
        """(body length, the body in pieces): tensor bytes are views, sealing is lazy."""
        pieces = body_pieces(fields, tensors)
        if seal_to is None:
            return pieces_length(pieces), pieces
        return seal_pieces(pieces, seal_to.key, sender_secret=self.identity.encryption_key)

    async def seal(self, fields: Body, tensors: Mapping[str, Tensor] | None = None, *,
                   round: int, trace: str | None = None, run: str | None = None,
                   seal_to: SealTarget | None = None) -> tuple[bytes, EnvelopeHeader]:
        """Encode (and with ``seal_to`` encrypt), store out of line if large, and sign.

        A large body is never built in one buffer: its pieces (views of the tensors, or
        sealed chunks made one at a time) go straight into the Object Store, hashed once
        on the way (the header signs that SHA-256). The tensors must not change until
        this returns."""
        if seal_to is not None and not fields.SEALABLE:
            raise ValueError(f"{fields.TYPE} bodies are never sealed")
        if fields.HAS_TENSORS:  # (sealing hashes the plaintext first: a thread)
            length, pieces = await asyncio.to_thread(self._pieces, fields, tensors, seal_to)
        else:
            length, pieces = self._pieces(fields, tensors, seal_to)
        sealed_to = seal_to.recipient if seal_to is not None else None
        if length <= self.inline_max_bytes:
            return seal(self.identity, fields.TYPE, job=self.subjects.job, round=round, body=b"".join(pieces),
                        trace=trace, run=run, sealed_to=sealed_to)
        name = f"{self.subjects.job}/{self.identity.id}/{fields.TYPE}/{round}/{os.urandom(8).hex()}"
        ref = await self.blobs.put_stream(name, pieces)  # the name is new: no lookup (permissions.py)
        if ref.size != length:
            raise RuntimeError(f"{name}: wrote {ref.size} bytes, expected {length}")
        blob = BlobPointer(bucket=ref.bucket, name=ref.name, size=ref.size, digest=ref.digest)
        return seal(self.identity, fields.TYPE, job=self.subjects.job, round=round, body=None, trace=trace, blob=blob,
                    run=run, sealed_to=sealed_to)

    async def publish(self, subject: str, fields: Body, tensors: Mapping[str, Tensor] | None = None, *,
                      round: int, trace: str | None = None, persist: bool = True,
                      run: str | None = None, seal_to: SealTarget | None = None) -> EnvelopeHeader:
        wire, header = await self.seal(fields, tensors, round=round, trace=trace, run=run, seal_to=seal_to)
        if persist:
            await publish_with_retry(self.js, subject, wire, headers=nats_headers(header), msg_id=header.nonce.hex())
        else:
            await self.nc.publish(subject, wire, headers=nats_headers(header))
        metrics().sent(fields.TYPE, len(wire) + (header.blob.size if header.blob is not None else 0))
        return header

    async def receive(self, verifier: EnvelopeVerifier, wire: bytes, *, round_ok: RoundCheck | None = None,
                      sender_token: str | None = None, stored_ms: int | None = None,
                      offload: bool = False) -> Received:
        """Verify a message fully; raises Rejection with a named reason (nothing else).

        ``stored_ms``: the JetStream stored time of the message (``msg.metadata.timestamp``
        in ms); freshness is then judged against it, so redelivered held messages pass.
        ``offload``: digest and decode bodies over OFFLOAD_MIN_BYTES in a worker thread,
        so heartbeats and ack keep-alives are not starved by a large update.
        """
        metrics().received(len(wire))  # counted before verification: junk costs bandwidth too
        opened = verifier.open(wire, round_ok=round_ok, sender_token=sender_token, stored_ms=stored_ms)
        body = await self._body_of(opened, verifier)
        fetched = opened.header.blob is not None  # read and checked by BlobStore.get (_body_of)
        if offload and len(body) > OFFLOAD_MIN_BYTES:
            fields, tensors = await asyncio.to_thread(verifier.decode_body, opened, body, fetched=fetched)
        else:
            fields, tensors = verifier.decode_body(opened, body, fetched=fetched)
        del body
        if getattr(fields, "model", None) is not None:
            tensors = await self._with_model(fields, tensors, verifier, opened.header)
        verifier.remember(opened)  # on the loop's thread: the replay guard is not shared
        return Received(opened.header, fields, tensors)

    async def _with_model(self, fields: Body, tensors: dict[str, Tensor] | None, verifier: EnvelopeVerifier,
                          header: EnvelopeHeader) -> dict[str, Tensor]:
        """The body's tensors plus the model its signed ``model`` pointer names: only the
        models bucket, only this job's objects, no larger than the type's body limit, and
        the size and SHA-256 checked as it is read (``BlobStore.get``)."""
        ref: BlobPointer = fields.model  # type: ignore[attr-defined]
        if ref.bucket != MODELS_BUCKET or not ref.name.startswith(f"{self.subjects.job}/v"):
            raise Rejection("pointer_not_allowed", f"model at {ref.bucket[:64]}/{ref.name[:80]}", header)
        limit = body_limit(type(fields), verifier.max_body_bytes)
        if ref.size > limit:
            raise Rejection("oversize", f"model object of {ref.size} bytes, limit {limit}", header)
        try:
            data = await self.models.get(ref.name, expected_size=ref.size, expected_digest=ref.digest)
        except Exception as exc:  # missing (retention took an old version), tampered, timed out
            raise Rejection("blob_unavailable", f"{ref.name[:80]}: {exc!r:.200}", header) from None
        metrics().received(len(data))
        try:
            stored = decode_tensors(data, max_tensors=verifier.max_tensors, allow_numpy=False, copy=False)
        except CodecError as exc:
            raise Rejection("malformed_body", f"model object: {exc}", header) from None
        del data  # the tensors are views over it
        out = dict(tensors or {})
        for name, value in stored.items():
            if not name.startswith(MODEL_PREFIX) or name[len(MODEL_PREFIX):] in out:
                raise Rejection("malformed_body", f"model object tensor {name[:80]!r}", header)
            out[name[len(MODEL_PREFIX):]] = value
        return out

    async def _body_of(self, opened: Opened, verifier: EnvelopeVerifier):
        header = opened.header
        pointer = header.blob
        if pointer is None:
            return opened.inline_body
        # open() checked these already; checked again here because this is where the
        # fetch happens: only our own bucket, the sender's names, within the type's limit.
        check_pointer(header, self.blobs.bucket)
        limit = body_limit(opened.body_cls, verifier.max_body_bytes)
        if pointer.size > limit or pointer.size != header.length:
            raise Rejection("oversize", f"claim check of {pointer.size} bytes, limit {limit}", header)
        try:
            # BlobStore.get compares the stored size and digest with these before reading.
            body = await self.blobs.get(pointer.name, expected_size=pointer.size, expected_digest=pointer.digest)
        except Exception as exc:  # missing, tampered, timed out, or a name the server refuses
            raise Rejection("blob_unavailable", f"{pointer.name[:80]}: {exc!r:.200}", header) from None
        metrics().received(len(body))
        return body
