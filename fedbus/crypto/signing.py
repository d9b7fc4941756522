"""Signing envelopes (the send side; ``fedbus.crypto.envelopes`` verifies them).

Kept free of torch and numpy so tools that only sign or check small messages (the audit
trail, ``fedbus audit verify``) start in a fraction of a second.
"""

from __future__ import annotations

import os
import time

from fedbus.crypto.keys import Identity
from fedbus.protocol.envelope import NONCE_LEN, BlobPointer, EnvelopeHeader, body_digest, encode_header, frame


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def seal(identity: Identity, msg_type: str, *, job: str, round: int, body: bytes,
         trace: str | None = None, blob: BlobPointer | None = None, run: str | None = None,
         ts_ms: int | None = None, nonce: bytes | None = None,
         sealed_to: str | None = None) -> tuple[bytes, EnvelopeHeader]:
    """Sign a body into wire bytes. With ``blob``, the body travels out of line. With
    ``sealed_to``, ``body`` is already a sealed box for that participant
    (``fedbus.crypto.sealing``); the header then signs the ciphertext's digest."""
    header = EnvelopeHeader(
        type=msg_type, job=job, round=round, sender=identity.id,
        nonce=nonce if nonce is not None else os.urandom(NONCE_LEN),
        ts=ts_ms if ts_ms is not None else now_ms(),
        digest=body_digest(body), length=len(body), blob=blob, trace=trace, run=run, sealed_to=sealed_to,
    )
    header_bytes = encode_header(header)
    return frame(header_bytes, identity.sign(header_bytes), b"" if blob else body), header
