"""Signing envelopes (the send side; ``fedbus.crypto.envelopes`` verifies them).

Kept free of torch and numpy so tools that only sign or check small messages (the audit
trail, ``fedbus audit verify``) start in a fraction of a second.
"""

from __future__ import annotations

import os
import time

from fedbus.crypto.keys import Identity
from fedbus.protocol.envelope import (NONCE_LEN, BlobPointer, EnvelopeHeader, encode_header, frame,
                                      header_digest_of, pointer_digest)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def seal(identity: Identity, msg_type: str, *, job: str, round: int, body: bytes | None,
         trace: str | None = None, blob: BlobPointer | None = None, run: str | None = None,
         ts_ms: int | None = None, nonce: bytes | None = None,
         sealed_to: str | None = None) -> tuple[bytes, EnvelopeHeader]:
    """Sign a body into wire bytes. With ``blob``, the body travels out of line and the
    header signs its SHA-256, the digest the pointer names (pass ``body=None`` to take
    digest and size from the pointer without hashing again: see ``pointer_digest``). With ``sealed_to``, the body is already sealed
    for that participant (``fedbus.crypto.sealing``); the header then signs the
    ciphertext's digest."""
    if body is not None:
        digest, length = header_digest_of(body, blob), len(body)
    elif blob is not None:
        digest, length = pointer_digest(blob), blob.size
        if digest is None:
            raise ValueError(f"blob pointer digest {blob.digest[:80]!r} is not SHA-256=<base64url>")
    else:
        raise ValueError("an inline body is needed without a blob pointer")
    header = EnvelopeHeader(
        type=msg_type, job=job, round=round, sender=identity.id,
        nonce=nonce if nonce is not None else os.urandom(NONCE_LEN),
        ts=ts_ms if ts_ms is not None else now_ms(),
        digest=digest, length=length, blob=blob, trace=trace, run=run, sealed_to=sealed_to,
    )
    header_bytes = encode_header(header)
    return frame(header_bytes, identity.sign(header_bytes), b"" if blob else body), header  # type: ignore[arg-type]
