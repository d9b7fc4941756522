"""Messenger: sign-and-publish and receive-and-verify, shared by every service.

This is the only place where envelopes meet the bus: bodies larger than the inline limit
go to the Object Store (claim check) and the signed header names them; on receipt the
header is verified first and the blob is fetched only for a message that passed every
header check.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import structlog

from fedbus.bus import BlobIntegrityError, BlobNotFound, BlobStore, Subjects, publish_with_retry
from fedbus.crypto.envelopes import EnvelopeVerifier, Opened, Rejection, RoundCheck, seal
from fedbus.crypto.federation import Federation
from fedbus.crypto.keys import Identity
from fedbus.jobspec import JobSpec
from fedbus.protocol.codec import Tensor
from fedbus.protocol.envelope import BlobPointer, EnvelopeHeader
from fedbus.protocol.messages import Body, encode_body

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Received:
    header: EnvelopeHeader
    fields: Body
    tensors: dict[str, Tensor] | None


def nats_headers(header: EnvelopeHeader) -> dict[str, str]:
    headers = {"Nats-Msg-Id": header.nonce.hex(), "Fedbus-Type": header.type}
    if header.trace:
        headers["traceparent"] = header.trace
    return headers


def verifier_for(job: JobSpec, federation: Federation) -> EnvelopeVerifier:
    """The verifier a participant of ``job`` uses, with the job's security limits."""
    sec = job.security
    return EnvelopeVerifier(federation, job.job, max_age_ms=int(sec.max_age_s * 1000),
                            max_future_ms=int(sec.max_future_s * 1000), max_body_bytes=sec.max_message_bytes)


class Messenger:
    def __init__(self, nc, js, identity: Identity, subjects: Subjects, *, inline_max_bytes: int):
        self.nc = nc
        self.js = js
        self.identity = identity
        self.subjects = subjects
        self.inline_max_bytes = inline_max_bytes
        self.blobs = BlobStore(nc, js)

    async def seal(self, fields: Body, tensors: Mapping[str, Tensor] | None = None, *,
                   round: int, trace: str | None = None, run: str | None = None) -> tuple[bytes, EnvelopeHeader]:
        body = encode_body(fields, tensors)
        blob = None
        if len(body) > self.inline_max_bytes:
            name = f"{self.subjects.job}/{self.identity.id}/{fields.TYPE}/{round}/{os.urandom(8).hex()}"
            ref = await self.blobs.put(name, body)
            blob = BlobPointer(bucket=ref.bucket, name=ref.name, size=ref.size, digest=ref.digest)
        return seal(self.identity, fields.TYPE, job=self.subjects.job, round=round, body=body, trace=trace, blob=blob,
                    run=run)

    async def publish(self, subject: str, fields: Body, tensors: Mapping[str, Tensor] | None = None, *,
                      round: int, trace: str | None = None, persist: bool = True,
                      run: str | None = None) -> EnvelopeHeader:
        wire, header = await self.seal(fields, tensors, round=round, trace=trace, run=run)
        if persist:
            await publish_with_retry(self.js, subject, wire, headers=nats_headers(header), msg_id=header.nonce.hex())
        else:
            await self.nc.publish(subject, wire, headers=nats_headers(header))
        return header

    async def receive(self, verifier: EnvelopeVerifier, wire: bytes, *, round_ok: RoundCheck | None = None,
                      sender_token: str | None = None) -> Received:
        """Verify a message fully; raises Rejection with a named reason."""
        opened = verifier.open(wire, round_ok=round_ok, sender_token=sender_token)
        body = await self._body_of(opened)
        fields, tensors = verifier.accept_body(opened, body)
        return Received(opened.header, fields, tensors)

    async def _body_of(self, opened: Opened):
        pointer = opened.header.blob
        if pointer is None:
            return opened.inline_body
        try:
            store = self.blobs if pointer.bucket == self.blobs.bucket else BlobStore(self.nc, self.js, pointer.bucket)
            return await store.get(pointer.name, expected_size=pointer.size, expected_digest=pointer.digest)
        except (BlobNotFound, BlobIntegrityError, TimeoutError) as exc:
            raise Rejection("blob_unavailable", f"{pointer.name}: {exc!r}", opened.header) from None
