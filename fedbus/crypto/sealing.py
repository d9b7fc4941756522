"""Sealed bodies: a worker's update readable only by its recipient (X25519 + secretstream).

(Not to be confused with ``fedbus.crypto.envelopes.seal``, which *signs* an envelope.)

An update body is encrypted to the recipient's X25519 public key from the federation file
(the coordinator, or with ``topology: regional`` the worker's region's aggregator), so
neither the broker operator, nor anyone who may read the update stream or the blob bucket,
nor another member can read it. The envelope is otherwise unchanged: its header carries the
digest and length of the *ciphertext* and names the recipient (``sealed_to``), and the
Ed25519 signature covers that header.

The construction streams, so a large update is never sealed or opened as one buffer
(docs/data-path.md). Like a sealed box, it is anonymous public-key encryption: an
ephemeral X25519 key pair, its shared secret with the recipient hashed (BLAKE2b, with
both public keys) into a 32-byte key and a 24-byte header, and libsodium's secretstream
(XChaCha20-Poly1305) over the plaintext in SEAL_CHUNK pieces, the last one tagged final::

    b"FBS2" | ephemeral public key (32) | secretstream header (24) | chunk | ... | final chunk

Every chunk carries its own Poly1305 tag (17 bytes of overhead each) and the stream state
chains them, so a body cut short, extended, or with chunks reordered does not open.

Why anonymous encryption is enough. It gives confidentiality and integrity but says
nothing about who sealed it. Here the sender is authenticated by the envelope signature:
the signed header holds the ciphertext's digest, so the ciphertext a receiver opens is
exactly the one the listed sender signed, for this job, round, run and nonce. Anyone else
can seal their own bytes to the recipient, but cannot make them pass as another
participant's without that participant's signing key; and they cannot splice a sealed
body under another header, since the digest binds it.

Verification order and cost stay as before until the body is needed: size, header,
sender, signature, freshness, nonce, job and round, declared length, recipient (a body
sealed to someone else is refused before any blob is fetched), then the ciphertext's
digest, then the stream is opened, then the plaintext is decoded. A body that does not
open is rejected as ``unsealable_body``; a plain body where the receiver requires sealing
as ``unsealed_body``.

Resends stay recognisable. The coordinator tells an identical resend of an update from a
second update by the body digest, and a worker resends its stored update after a
coordinator resume. So the ephemeral key is not random but derived (keyed BLAKE2b) from
the sender's own X25519 secret, the plaintext's SHA-256 and the recipient: the same update
to the same recipient seals to the same bytes, a different update never reuses an
ephemeral key (a fresh key, and so a fresh stream key, per plaintext: no keystream is ever
reused), and nobody without the sender's secret can predict or recompute it. libsodium's
``init_push`` picks the secretstream header at random; here the header is derived too and
the state set up with ``init_pull``, which computes exactly the state ``init_push`` would
for that header. What leaks is only that two sealed bodies from one sender are the same
update. Determinism costs one SHA-256 pass over the plaintext before sealing. A sender
without an encryption key (an old key file) seals with a random ephemeral key.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from nacl.bindings import (
    crypto_box_seed_keypair,
    crypto_scalarmult,
    crypto_secretstream_xchacha20poly1305_ABYTES,
    crypto_secretstream_xchacha20poly1305_init_pull,
    crypto_secretstream_xchacha20poly1305_pull,
    crypto_secretstream_xchacha20poly1305_push,
    crypto_secretstream_xchacha20poly1305_state,
    crypto_secretstream_xchacha20poly1305_TAG_FINAL,
    crypto_secretstream_xchacha20poly1305_TAG_MESSAGE,
)
from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, PublicKey

from fedbus.chunking import regroup
from fedbus.crypto.federation import Federation
from fedbus.crypto.keys import Identity

SEAL_MAGIC = b"FBS2"
# magic, ephemeral X25519 public key, secretstream header
SEAL_HEADER = len(SEAL_MAGIC) + 32 + 24
# Plaintext per secretstream chunk: big enough that per-call costs vanish, small enough
# that sealing and opening stream (a chunk in flight, not a body).
SEAL_CHUNK = 1024 * 1024
_ABYTES = crypto_secretstream_xchacha20poly1305_ABYTES  # 17: tag byte + Poly1305 MAC
_TAG_MESSAGE = crypto_secretstream_xchacha20poly1305_TAG_MESSAGE
_TAG_FINAL = crypto_secretstream_xchacha20poly1305_TAG_FINAL
# The overhead of the smallest sealed body (empty plaintext).
SEAL_OVERHEAD = SEAL_HEADER + _ABYTES
_EPHEMERAL_PERSON = b"fedbus-seal-eph1"  # BLAKE2b personalisation: at most 16 bytes
_STREAM_PERSON = b"fedbus-seal-str2"

SealMode = bool | Literal["auto"]


class SealError(ValueError):
    """A sealed body that does not open with this key (wrong recipient or tampered)."""


class SealingUnavailable(ValueError):
    """``security.seal_updates: true`` but a recipient has no encryption key (or this
    process, a recipient, has no private key to open with)."""


@dataclass(frozen=True)
class SealTarget:
    """Whom a body is sealed to: the recipient's id (goes into the signed header) and key."""

    recipient: str
    key: PublicKey


@dataclass(frozen=True)
class Opener:
    """The X25519 keys a receiver opens with, by the participant id ``sealed_to`` names:
    its own one (a coordinator or an aggregator), or every recipient's for an auditor
    holding all of them (tests that check aggregation against the raw updates)."""

    keys: Mapping[str, PrivateKey]

    @classmethod
    def of(cls, *identities: Identity) -> Opener:
        return cls({i.id: i.encryption_key for i in identities if i.encryption_key is not None})

    def opens_for(self, recipient: str) -> bool:
        return recipient in self.keys

    def open(self, recipient: str, ciphertext: bytes | bytearray | memoryview, *,
             in_place: bool = False) -> bytearray | memoryview:
        key = self.keys.get(recipient)
        if key is None:
            raise SealError(f"no key to open bodies sealed to {recipient[:64]!r}")
        return open_body(ciphertext, key, in_place=in_place)


def _stream_keys(plaintext_digest: bytes, recipient: bytes, sender_secret: PrivateKey | None
                 ) -> tuple[bytes, bytes, bytes]:
    """(ephemeral public key, stream key, stream header) for one body (module docstring)."""
    if sender_secret is None:
        seed = os.urandom(32)
    else:
        seed = hashlib.blake2b(plaintext_digest + recipient, key=bytes(sender_secret), person=_EPHEMERAL_PERSON,
                               digest_size=32).digest()
    eph_public, eph_secret = crypto_box_seed_keypair(seed)
    shared = crypto_scalarmult(eph_secret, recipient)
    material = hashlib.blake2b(shared + eph_public + recipient, person=_STREAM_PERSON, digest_size=56).digest()
    return eph_public, material[:32], material[32:]


def sealed_length(plaintext_length: int) -> int:
    """Bytes of the sealed form of a plaintext of this length."""
    chunks = max(1, -(-plaintext_length // SEAL_CHUNK))
    return SEAL_HEADER + plaintext_length + chunks * _ABYTES


def seal_pieces(pieces: Sequence[bytes | bytearray | memoryview], target: PublicKey, *,
                sender_secret: PrivateKey | None = None) -> tuple[int, Iterator[bytes]]:
    """Encrypt the plaintext made of ``pieces`` to ``target`` as a stream: (length of the
    sealed body, its bytes in pieces, produced lazily, SEAL_CHUNK of plaintext at a time).

    With ``sender_secret`` the same plaintext always seals to the same bytes; that costs
    one SHA-256 pass over the plaintext first (module docstring). The pieces must not
    change until the iterator is exhausted."""
    views = [memoryview(p).cast("B") for p in pieces]
    total = sum(v.nbytes for v in views)
    recipient = bytes(target)
    digest = b""
    if sender_secret is not None:
        hasher = hashlib.sha256()
        for v in views:
            hasher.update(v)
        digest = hasher.digest()
    eph_public, key, header = _stream_keys(digest, recipient, sender_secret)

    def stream() -> Iterator[bytes]:
        state = crypto_secretstream_xchacha20poly1305_state()
        # init_pull sets up exactly the state init_push would for this header: the header is
        # ours (derived, so resends are identical) instead of libsodium's random one.
        crypto_secretstream_xchacha20poly1305_init_pull(state, header, key)
        yield SEAL_MAGIC + eph_public + header
        chunks = regroup(views, SEAL_CHUNK)
        pending = next(chunks, b"")
        for following in chunks:
            yield crypto_secretstream_xchacha20poly1305_push(state, pending, None, _TAG_MESSAGE)
            pending = following
        yield crypto_secretstream_xchacha20poly1305_push(state, pending, None, _TAG_FINAL)

    return sealed_length(total), stream()


def seal_body(plaintext: bytes | bytearray | memoryview, target: PublicKey, *,
              sender_secret: PrivateKey | None = None) -> bytes:
    """The sealed form of ``plaintext`` in one buffer (``seal_pieces`` joined)."""
    _, stream = seal_pieces([plaintext], target, sender_secret=sender_secret)
    return b"".join(stream)


def open_body(ciphertext: bytes | bytearray | memoryview, key: PrivateKey, *,
              in_place: bool = False) -> bytearray | memoryview:
    """Decrypt a sealed body addressed to ``key``, chunk by chunk; raises SealError. Every
    chunk must open, in order, the last one and only it marked final, so a body cut
    short, extended or reordered does not open.

    The plaintext goes into a new buffer, or with ``in_place`` (a writable ``ciphertext``
    the caller gives up, e.g. a blob just read) over the ciphertext itself, returned as a
    view of its start: plaintext chunk i lands at i * SEAL_CHUNK, never past the start of
    ciphertext chunk i (SEAL_HEADER + i * (SEAL_CHUNK + 17)), so nothing is overwritten
    before it is read, and a large body is held once. On failure the buffer is garbage."""
    view = memoryview(ciphertext).cast("B")
    if in_place and view.readonly:
        raise ValueError("in-place opening needs a writable buffer")
    if view.nbytes < SEAL_HEADER + _ABYTES or bytes(view[:len(SEAL_MAGIC)]) != SEAL_MAGIC:
        raise SealError(f"{view.nbytes} bytes is not a sealed body")
    eph_public = bytes(view[len(SEAL_MAGIC):len(SEAL_MAGIC) + 32])
    header = bytes(view[len(SEAL_MAGIC) + 32:SEAL_HEADER])
    body = view.nbytes - SEAL_HEADER
    chunks = -(-body // (SEAL_CHUNK + _ABYTES))
    plain_len = body - chunks * _ABYTES
    plain = view[:plain_len] if in_place else bytearray(plain_len)
    try:
        shared = crypto_scalarmult(bytes(key), eph_public)
    except Exception:  # a low-order point (libsodium refuses an all-zero shared secret)
        raise SealError("the sealed body's ephemeral key is not usable") from None
    recipient = bytes(key.public_key)
    material = hashlib.blake2b(shared + eph_public + recipient, person=_STREAM_PERSON, digest_size=56).digest()
    if material[32:] != header:  # not derived from this key pair: cannot be ours
        raise SealError("the sealed body does not open with this recipient's key")
    state = crypto_secretstream_xchacha20poly1305_state()
    crypto_secretstream_xchacha20poly1305_init_pull(state, header, material[:32])
    pos, out = SEAL_HEADER, 0
    for i in range(chunks):
        end = min(view.nbytes, pos + SEAL_CHUNK + _ABYTES)
        try:
            piece, tag = crypto_secretstream_xchacha20poly1305_pull(state, bytes(view[pos:end]), None)
        except (CryptoError, RuntimeError, ValueError):
            raise SealError("the sealed body does not open with this recipient's key") from None
        if tag != (_TAG_FINAL if i == chunks - 1 else _TAG_MESSAGE):
            raise SealError("the sealed body's chunks are cut short or out of order")
        plain[out:out + len(piece)] = piece
        out += len(piece)
        pos = end
    if out != len(plain):
        raise SealError("the sealed body's chunks do not add up")
    return plain


# ---- who seals to whom (the job's policy over the federation file) ----------------------

def update_recipient(federation: Federation, worker_id: str, *, regional: bool) -> str | None:
    """Who reads a worker's updates: the coordinator, or its region's aggregator (None:
    the region has no aggregator, so nobody reads them)."""
    if not regional:
        return federation.coordinator().id
    worker = federation.get(worker_id)
    region = worker.region if worker is not None else None
    return next((a.id for a in federation.aggregators() if a.region == region), None)


def update_seal_target(mode: SealMode, federation: Federation, worker_id: str, *,
                       regional: bool) -> SealTarget | None:
    """What a worker seals its updates to, or None to send them in the clear.

    ``True``: always, and SealingUnavailable when the recipient has no encryption key.
    ``"auto"``: when the recipient has one. ``False``: never.
    """
    if mode is False:
        return None
    recipient = update_recipient(federation, worker_id, regional=regional)
    key = federation.encryption_key(recipient) if recipient is not None else None
    if key is None:
        if mode is True:
            raise SealingUnavailable(f"security.seal_updates is true but {recipient or 'the region aggregator'} "
                                     f"(recipient of {worker_id}'s updates) has no encryption_key in the "
                                     f"federation file")
        return None
    return SealTarget(recipient, key)


def unsealed_recipients(mode: SealMode, federation: Federation, *, regional: bool) -> list[str]:
    """The recipients whose workers will send updates in the clear under ``mode`` (sorted);
    every role checks this at start, so with ``True`` each refuses alike
    (SealingUnavailable) when any recipient lacks an encryption key."""
    if mode is False:
        return []
    missing = set()
    unsealed: dict[str | None, bool] = {}  # by recipient: checked once each, not once per worker
    for worker in federation.workers():
        recipient = update_recipient(federation, worker.id, regional=regional)
        if recipient not in unsealed:
            unsealed[recipient] = update_seal_target(mode, federation, worker.id, regional=regional) is None
        if unsealed[recipient]:
            missing.add(recipient or f"aggregator of {worker.region}")
    return sorted(missing)
