"""Sealed bodies: a worker's update readable only by its recipient (X25519 + STREAM over AES-256-GCM).

(Not to be confused with ``fedbus.crypto.envelopes.seal``, which *signs* an envelope.)

An update body is encrypted to the recipient's X25519 public key from the federation file
(the coordinator, or with ``topology: regional`` the worker's region's aggregator), so
neither the broker operator, nor anyone who may read the update stream or the blob bucket,
nor another member can read it. The envelope is otherwise unchanged: its header carries the
digest and length of the *ciphertext* and names the recipient (``sealed_to``), and the
Ed25519 signature covers that header.

The construction streams, so a large update is never sealed or opened as one buffer
(docs/data-path.md). Like a sealed box, it is anonymous public-key encryption: an
ephemeral X25519 key pair whose shared secret with the recipient is hashed (BLAKE2b, with
both public keys) into a 32-byte AES-256-GCM key, then the STREAM construction (Hoang,
Reyhanitabar, Rogaway, Vizár 2015, "Online Authenticated-Encryption and its Nonce-Reuse
Misuse-Resistance"; the one age uses) over the plaintext in SEAL_CHUNK pieces::

    b"FBS3" | ephemeral public key (32) | chunk 0 | ... | chunk n-1
    chunk i = AES-256-GCM(key, nonce_i, plaintext chunk i, AD = the 36-byte header) (+16-byte tag)
    nonce_i = i as an 11-byte big-endian counter | 0x01 for the last chunk, 0x00 otherwise

Every plaintext chunk is SEAL_CHUNK bytes but the last, which is shorter, or empty only
when the whole plaintext is; so the chunk count and every boundary follow from the
length, and the opener checks the length is exactly a sealed body's before decrypting.

Why it is secure. One key per body: the key hashes the ephemeral public key, and the
ephemeral key is fresh for every plaintext (below), so a (key, nonce) pair is never used
twice and the counter nonces need no randomness. The counter in the nonce puts each chunk
at its position: a chunk moved, swapped, dropped from the middle or repeated fails its
tag. The last-chunk flag stops truncation at a chunk boundary (the new last chunk was
sealed as not last) and extension (the old last chunk is no longer last, and anything
after it would need the key). A chunk from another body was sealed under another key.
The header is the associated data of every chunk, so it cannot be swapped either (it
also names the key). And above all of this, the signed envelope header holds the
ciphertext's SHA-256, which binds the whole ciphertext to its sender.

Why not libsodium's secretstream any more (format FBS2, XChaCha20-Poly1305; the issue
that brought sealing in suggested it): it was measured as the slow part. For 200 MB in
1 MiB chunks on the 2-core machine: secretstream push 0.155 s and pull about the same,
OpenSSL's ChaCha20-Poly1305 0.056 s, OpenSSL's AES-GCM (AES-NI, PyCA ``cryptography``)
0.022 s. With ``benchmarks/sealing_speed.py`` (200 MB, medians of 3): sealing went from
0.27 s to 0.145 s, of which 0.11 s is now the SHA-256 pass below (the cipher itself from
0.16 s to 0.03 s), and opening in place from 0.17 s to 0.03 s. Secretstream's chained
state bought nothing the counter and the flag do not give. What AES-GCM asks for instead
is that a key never meets the same nonce twice, which one fresh key per body gives by
construction; its limit of 2^32 blocks (64 GiB) per nonce is far above a 1 MiB chunk,
and the 11-byte counter allows 2^88 chunks.

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
digest, then the body is opened, then the plaintext is decoded. A body that does not
open is rejected as ``unsealable_body``; a plain body where the receiver requires sealing
as ``unsealed_body``.

Resends stay recognisable. The coordinator tells an identical resend of an update from a
second update by the body digest, and a worker resends its stored update after a
coordinator resume. So the ephemeral key is not random but derived (keyed BLAKE2b) from
the sender's own X25519 secret, the plaintext's SHA-256 and the recipient: the same update
to the same recipient seals to the same bytes, a different update never reuses an
ephemeral key (a fresh key, and so a fresh AES-GCM key, per plaintext: no key and nonce
pair is ever reused), and nobody without the sender's secret can predict or recompute it.
What leaks is only that two sealed bodies from one sender are the same update.
Determinism costs one SHA-256 pass over the plaintext before sealing (now most of the
cost of sealing). A sender without an encryption key (an old key file) seals with a
random ephemeral key.

Copies. Sealing encrypts each chunk straight from the body's pieces (tensor views) when
the chunk lies within one piece, and gathers it into a 1 MiB scratch buffer only where it
straddles two; each ciphertext chunk is a new ``bytes`` (the consumer, ``put_stream``,
may still hold a view of the previous one, so the output buffer is not reused). Opening
into a new buffer decrypts each chunk straight into place; opening in place decrypts
into a 1 MiB scratch buffer and copies that down (decrypting over the overlapping
source region is not guaranteed safe by OpenSSL or ``cryptography``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

# OpenSSL's AES-256-GCM (AES-NI): ~9 GB/s here, 7x libsodium's secretstream (module docstring).
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from nacl.bindings import crypto_box_seed_keypair, crypto_scalarmult
from nacl.public import PrivateKey, PublicKey

from fedbus.crypto.federation import Federation
from fedbus.crypto.keys import Identity

SEAL_MAGIC = b"FBS3"
# magic, ephemeral X25519 public key: also every chunk's associated data
SEAL_HEADER = len(SEAL_MAGIC) + 32
# Plaintext per chunk: big enough that per-call costs vanish, small enough that sealing
# and opening stream (a chunk in flight, not a body).
SEAL_CHUNK = 1024 * 1024
SEAL_TAG = 16  # AES-GCM's tag, on every chunk
# The overhead of the smallest sealed body (empty plaintext: one empty, final chunk).
SEAL_OVERHEAD = SEAL_HEADER + SEAL_TAG
_COUNTER_BYTES = 11  # the 12-byte nonce: counter, then the last-chunk flag
_MAX_CHUNKS = 1 << (8 * _COUNTER_BYTES)
_EPHEMERAL_PERSON = b"fedbus-seal-eph1"  # BLAKE2b personalisation: at most 16 bytes
_KEY_PERSON = b"fedbus-seal-str3"

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


def _body_key(shared: bytes, eph_public: bytes, recipient: bytes) -> bytes:
    """The body's AES-256-GCM key: the X25519 shared secret hashed with both public keys."""
    return hashlib.blake2b(shared + eph_public + recipient, person=_KEY_PERSON, digest_size=32).digest()


def _seal_keys(plaintext_digest: bytes, recipient: bytes, sender_secret: PrivateKey | None) -> tuple[bytes, bytes]:
    """(ephemeral public key, AES-256-GCM key) for one body (module docstring)."""
    if sender_secret is None:
        seed = os.urandom(32)
    else:
        seed = hashlib.blake2b(plaintext_digest + recipient, key=bytes(sender_secret), person=_EPHEMERAL_PERSON,
                               digest_size=32).digest()
    eph_public, eph_secret = crypto_box_seed_keypair(seed)
    return eph_public, _body_key(crypto_scalarmult(eph_secret, recipient), eph_public, recipient)


def _nonce(index: int, last: bool) -> bytes:
    return index.to_bytes(_COUNTER_BYTES, "big") + (b"\x01" if last else b"\x00")


def _chunk_count(plaintext_length: int) -> int:
    """Chunks of a plaintext: full SEAL_CHUNKs and a shorter last one; one empty chunk
    for an empty plaintext."""
    return max(1, -(-plaintext_length // SEAL_CHUNK))


def sealed_length(plaintext_length: int) -> int:
    """Bytes of the sealed form of a plaintext of this length."""
    return SEAL_HEADER + plaintext_length + _chunk_count(plaintext_length) * SEAL_TAG


def _plaintext_chunks(views: Sequence[memoryview], total: int) -> Iterator[memoryview]:
    """The bytes of ``views`` as ``_chunk_count(total)`` chunks, without a copy where a chunk
    lies within one view; one that straddles views is gathered into a scratch buffer, so
    each chunk is valid only until the next one is asked for."""
    scratch: bytearray | None = None
    index, pos, left = 0, 0, total
    for _ in range(_chunk_count(total)):
        size = min(SEAL_CHUNK, left)
        left -= size
        while index < len(views) and pos == views[index].nbytes:  # (skips empty views too)
            index, pos = index + 1, 0
        if size == 0 or views[index].nbytes - pos >= size:
            yield views[index][pos:pos + size] if size else memoryview(b"")
            pos += size
            continue
        if scratch is None:
            scratch = bytearray(SEAL_CHUNK)
        filled = 0
        while filled < size:
            if pos == views[index].nbytes:
                index, pos = index + 1, 0
                continue
            take = min(size - filled, views[index].nbytes - pos)
            scratch[filled:filled + take] = views[index][pos:pos + take]
            filled, pos = filled + take, pos + take
        yield memoryview(scratch)[:size]


def seal_pieces(pieces: Sequence[bytes | bytearray | memoryview], target: PublicKey, *,
                sender_secret: PrivateKey | None = None) -> tuple[int, Iterator[bytes]]:
    """Encrypt the plaintext made of ``pieces`` to ``target`` as a stream: (length of the
    sealed body, its bytes in pieces, produced lazily, SEAL_CHUNK of plaintext at a time).

    With ``sender_secret`` the same plaintext always seals to the same bytes; that costs
    one SHA-256 pass over the plaintext first (module docstring). The pieces must not
    change until the iterator is exhausted."""
    views = [memoryview(p).cast("B") for p in pieces]
    total = sum(v.nbytes for v in views)
    if _chunk_count(total) > _MAX_CHUNKS:
        raise ValueError(f"{total} bytes is too large to seal")
    recipient = bytes(target)
    digest = b""
    if sender_secret is not None:
        hasher = hashlib.sha256()
        for v in views:
            hasher.update(v)
        digest = hasher.digest()
    eph_public, key = _seal_keys(digest, recipient, sender_secret)
    header = SEAL_MAGIC + eph_public

    def stream() -> Iterator[bytes]:
        yield header
        aead = AESGCM(key)
        last = _chunk_count(total) - 1
        for i, chunk in enumerate(_plaintext_chunks(views, total)):
            yield aead.encrypt(_nonce(i, i == last), chunk, header)  # a new bytes: consumers may keep it

    return sealed_length(total), stream()


def seal_body(plaintext: bytes | bytearray | memoryview, target: PublicKey, *,
              sender_secret: PrivateKey | None = None) -> bytes:
    """The sealed form of ``plaintext`` in one buffer (``seal_pieces`` joined)."""
    _, stream = seal_pieces([plaintext], target, sender_secret=sender_secret)
    return b"".join(stream)


def open_body(ciphertext: bytes | bytearray | memoryview, key: PrivateKey, *,
              in_place: bool = False) -> bytearray | memoryview:
    """Decrypt a sealed body addressed to ``key``, chunk by chunk; raises SealError. Every
    chunk must open at its own position, the last one and only it flagged last, so a body
    cut short, extended, reordered or spliced from another does not open.

    The plaintext goes into a new buffer, or with ``in_place`` (a writable ``ciphertext``
    the caller gives up, e.g. a blob just read) over the ciphertext itself, returned as a
    view of its start: plaintext chunk i lands at i * SEAL_CHUNK, before the start of
    ciphertext chunk i (SEAL_HEADER + i * (SEAL_CHUNK + SEAL_TAG)), so nothing is
    overwritten before it is read, and a large body is held once. On failure the buffer
    is garbage."""
    view = memoryview(ciphertext).cast("B")
    if in_place and view.readonly:
        raise ValueError("in-place opening needs a writable buffer")
    size = view.nbytes
    if size < SEAL_OVERHEAD or bytes(view[:len(SEAL_MAGIC)]) != SEAL_MAGIC:
        raise SealError(f"{size} bytes is not a sealed body")
    # The chunk count and every boundary follow from the length; a length no plaintext
    # seals to (a last chunk shorter than its tag, or an empty one after full chunks) is
    # refused before anything is decrypted.
    step = SEAL_CHUNK + SEAL_TAG
    chunks = -(-(size - SEAL_HEADER) // step)
    plain_len = size - SEAL_HEADER - chunks * SEAL_TAG
    if chunks > _MAX_CHUNKS or plain_len < 0 or sealed_length(plain_len) != size:
        raise SealError(f"{size} bytes is not the length of a sealed body")
    header = bytes(view[:SEAL_HEADER])
    eph_public = header[len(SEAL_MAGIC):]
    try:
        shared = crypto_scalarmult(bytes(key), eph_public)
    except Exception:  # a low-order point (libsodium refuses an all-zero shared secret)
        raise SealError("the sealed body's ephemeral key is not usable") from None
    aead = AESGCM(_body_key(shared, eph_public, bytes(key.public_key)))
    fresh = None if in_place else bytearray(plain_len)
    plain = view[:plain_len] if fresh is None else memoryview(fresh)
    scratch = memoryview(bytearray(min(SEAL_CHUNK, plain_len))) if in_place else None
    pos = SEAL_HEADER
    for i in range(chunks):
        end = min(size, pos + step)
        n, out = end - pos - SEAL_TAG, i * SEAL_CHUNK
        try:
            if scratch is None:
                aead.decrypt_into(_nonce(i, i == chunks - 1), view[pos:end], header, plain[out:out + n])
            else:  # never into the source's own bytes: decrypt aside, then copy down
                aead.decrypt_into(_nonce(i, i == chunks - 1), view[pos:end], header, scratch[:n])
                plain[out:out + n] = scratch[:n]
        except InvalidTag:
            if i == 0:
                raise SealError("the sealed body does not open with this recipient's key") from None
            raise SealError(f"chunk {i} of the sealed body does not open: cut short, reordered or altered") from None
        pos = end
    if fresh is None:
        return plain
    plain.release()  # the caller gets a bytearray it may resize
    return fresh


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
