"""Envelope framing: the signed header and how it sits on the wire.

Wire layout of every fedbus message::

    b"FBE1" | u16 header_len | header (msgpack map) | 64-byte Ed25519 signature | body

The signature covers the exact header bytes that travel, so no re-canonicalisation is
needed on receipt; the header carries the body's digest and length, so the signature
covers the body too. When a body is too large to travel inline it goes to the Object
Store and the header's ``blob`` field names it (claim check); the body digest still
protects it.

This module does no cryptography and no I/O; ``fedbus.crypto`` signs and verifies.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct

import msgpack
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedbus.protocol.runs import RUN_PATTERN

PROTOCOL_VERSION = 1
MAGIC = b"FBE1"
SIGNATURE_LEN = 64
NONCE_LEN = 16
DIGEST_ALG = "blake2b-256"
_HLEN = struct.Struct("<H")
PREFIX_LEN = len(MAGIC) + _HLEN.size
MAX_HEADER_LEN = 4096
_MAX_HEADER_MAP_LEN = 32  # EnvelopeHeader has 13 fields, BlobPointer 4


class EnvelopeError(ValueError):
    """The bytes are not a well-formed envelope."""


class BlobPointer(BaseModel):
    """Where an out-of-line body lives in the Object Store."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    bucket: str = Field(max_length=64)
    name: str = Field(max_length=256)
    size: int = Field(ge=0)
    digest: str = Field(max_length=128, description="Object Store digest, 'SHA-256=<base64url>'")


class EnvelopeHeader(BaseModel):
    """The signed header of every fedbus message."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    v: int = Field(PROTOCOL_VERSION, description="protocol version")
    type: str = Field(max_length=64, description="message type, e.g. 'update'")
    job: str = Field(max_length=64)
    round: int = Field(ge=0, description="round number (sync) or model version (async)")
    sender: str = Field(max_length=128)
    nonce: bytes = Field(min_length=NONCE_LEN, max_length=64, description="random, never reused")
    ts: int = Field(ge=0, description="sender's clock, milliseconds since the Unix epoch")
    digest: bytes = Field(min_length=32, max_length=32,
                          description="BLAKE2b-256 of an inline body; of an out-of-line body its SHA-256, the "
                                      "digest its blob pointer names")
    length: int = Field(ge=0, description="body length in bytes")
    blob: BlobPointer | None = Field(None, description="set when the body lives in the Object Store")
    trace: str | None = Field(None, max_length=128, description="W3C traceparent of the sender's span")
    run: str | None = Field(None, pattern=RUN_PATTERN,
                            description="the coordinator run this message belongs to (control messages and updates)")
    sealed_to: str | None = Field(None, max_length=128,
                                  description="set when the body is a sealed box (X25519, fedbus.crypto.sealing) "
                                              "that only this participant can open; digest and length are then "
                                              "the ciphertext's")


def body_digest(body: bytes | bytearray | memoryview) -> bytes:
    """The digest of an inline body (the header's ``digest``)."""
    return hashlib.blake2b(body, digest_size=32).digest()


OBJECT_DIGEST_PREFIX = "SHA-256="


def pointer_digest(pointer: BlobPointer) -> bytes | None:
    """The raw SHA-256 a claim check names ("SHA-256=<base64url>"), None if malformed.

    An out-of-line body's header ``digest`` is this value: the Object Store computes and
    checks SHA-256 anyway, so one digest pass serves both the signature (which covers the
    header, pointer included) and the object check (docs/data-path.md)."""
    text = pointer.digest
    if not text.upper().startswith(OBJECT_DIGEST_PREFIX):
        return None
    encoded = text[len(OBJECT_DIGEST_PREFIX):]
    try:
        raw = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == 32 else None


def header_digest_of(body: bytes | bytearray | memoryview, blob: BlobPointer | None) -> bytes:
    """What a header's ``digest`` must be for ``body``: BLAKE2b-256 inline, SHA-256 out of line."""
    return body_digest(body) if blob is None else hashlib.sha256(body).digest()


def encode_header(header: EnvelopeHeader) -> bytes:
    fields = header.model_dump(exclude_none=True)
    # Sorted keys make the bytes deterministic for the same header.
    return msgpack.packb(dict(sorted(fields.items())), use_bin_type=True)


def frame(header_bytes: bytes, signature: bytes, body: bytes | bytearray | memoryview) -> bytes:
    if len(header_bytes) > MAX_HEADER_LEN:
        raise EnvelopeError("header too large")
    if len(signature) != SIGNATURE_LEN:
        raise EnvelopeError("signature must be 64 bytes")
    return b"".join((MAGIC, _HLEN.pack(len(header_bytes)), header_bytes, signature, body))


def split_frame(wire: bytes | bytearray | memoryview) -> tuple[memoryview, bytes, memoryview]:
    """Cut the wire bytes into (header bytes, signature, inline body) without decoding."""
    buf = memoryview(wire)
    if buf.nbytes < PREFIX_LEN or bytes(buf[:4]) != MAGIC:
        raise EnvelopeError("bad magic")
    (hlen,) = _HLEN.unpack(buf[4:PREFIX_LEN])
    if hlen > MAX_HEADER_LEN:
        raise EnvelopeError("header too large")
    sig_start = PREFIX_LEN + hlen
    body_start = sig_start + SIGNATURE_LEN
    if buf.nbytes < body_start:
        raise EnvelopeError("truncated envelope")
    return buf[PREFIX_LEN:sig_start], bytes(buf[sig_start:body_start]), buf[body_start:]


def decode_header(header_bytes: bytes | memoryview) -> EnvelopeHeader:
    try:
        # Decoded before the sender is known, so every bound is explicit: the header is a
        # map of scalars plus the small blob map, and has no lists. (msgpack preallocates
        # each claimed list length; with its default bounds a 4 KiB nest of list claims
        # from anyone would cost ~26 MB.)
        fields = msgpack.unpackb(header_bytes, raw=False, strict_map_key=True, max_array_len=0,
                                 max_map_len=_MAX_HEADER_MAP_LEN, max_str_len=MAX_HEADER_LEN,
                                 max_bin_len=MAX_HEADER_LEN, max_ext_len=0)
    except Exception as exc:  # msgpack raises several unrelated types
        raise EnvelopeError(f"header is not msgpack: {exc}") from None
    if not isinstance(fields, dict):
        raise EnvelopeError("header is not a map")
    try:
        return EnvelopeHeader.model_validate(fields)
    except ValidationError as exc:
        raise EnvelopeError(f"header fields invalid: {exc.errors()[0]['loc']} {exc.errors()[0]['msg']}") from None
