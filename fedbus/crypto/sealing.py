"""Sealed bodies: a worker's update readable only by its recipient (X25519 sealed box).

(Not to be confused with ``fedbus.crypto.envelopes.seal``, which *signs* an envelope.)

An update body is encrypted to the recipient's X25519 public key from the federation file
(the coordinator, or with ``topology: regional`` the worker's region's aggregator), so
neither the broker operator, nor anyone who may read the update stream or the blob bucket,
nor another member can read it. The envelope is otherwise unchanged: its header carries the
digest and length of the *ciphertext* and names the recipient (``sealed_to``), and the
Ed25519 signature covers that header.

Why an anonymous sealed box is enough. A sealed box (libsodium ``crypto_box_seal``) gives
confidentiality and integrity but says nothing about who sealed it. Here the sender is
authenticated by the envelope signature: the signed header holds the ciphertext's digest,
so the ciphertext a receiver opens is exactly the one the listed sender signed, for this
job, round, run and nonce. Anyone else can seal their own bytes to the recipient, but
cannot make them pass as another participant's without that participant's signing key;
and they cannot splice a sealed body under another header, since the digest binds it.
Authenticated encryption between sender and recipient (``crypto_box`` with the sender's
static key) would add nothing but a second sender identity to keep consistent.

Verification order and cost stay as before until the body is needed: size, header,
sender, signature, freshness, nonce, job and round, declared length, recipient (a body
sealed to someone else is refused before any blob is fetched), then the ciphertext's
digest, then the box is opened, then the plaintext is decoded. A box that does not open
is rejected as ``unsealable_body``; a plain body where the receiver requires sealing as
``unsealed_body``.

Resends stay recognisable. The coordinator tells an identical resend of an update from a
second update by the body digest, and a worker resends its stored update after a
coordinator resume. So the ephemeral key is not random but derived (keyed BLAKE2b) from
the sender's own X25519 secret, the plaintext's digest and the recipient: the same update
to the same recipient seals to the same bytes, a different update never reuses an
ephemeral key (a fresh key per plaintext, so no keystream is ever reused), and nobody
without the sender's secret can predict or recompute it. What leaks is only that two
sealed bodies from one sender are the same update. A sender without an encryption key
(an old key file) seals with a random ephemeral key, as ``crypto_box_seal`` does. The
bytes are a standard sealed box either way: ``nacl.public.SealedBox(private).decrypt``
opens them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from nacl.bindings import crypto_box_easy, crypto_box_seal, crypto_box_seal_open, crypto_box_seed_keypair
from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, PublicKey

from fedbus.crypto.federation import Federation
from fedbus.crypto.keys import Identity

# 32-byte ephemeral public key + 16-byte Poly1305 tag.
SEAL_OVERHEAD = 48
_NONCE_LEN = 24
_EPHEMERAL_PERSON = b"fedbus-seal-eph1"  # BLAKE2b personalisation: at most 16 bytes

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

    def open(self, recipient: str, ciphertext: bytes | bytearray | memoryview) -> bytes:
        key = self.keys.get(recipient)
        if key is None:
            raise SealError(f"no key to open bodies sealed to {recipient[:64]!r}")
        return open_body(ciphertext, key)


def seal_body(plaintext: bytes | bytearray | memoryview, target: PublicKey, *,
              sender_secret: PrivateKey | None = None) -> bytes:
    """Encrypt ``plaintext`` to ``target`` (a standard sealed box). With ``sender_secret``
    the ephemeral key is derived from it and the plaintext (see the module docstring), so
    the same plaintext always seals to the same bytes."""
    recipient = bytes(target)
    if sender_secret is None:
        return crypto_box_seal(bytes(plaintext), recipient)
    seed = hashlib.blake2b(hashlib.blake2b(plaintext, digest_size=32).digest() + recipient,
                           key=bytes(sender_secret), person=_EPHEMERAL_PERSON, digest_size=32).digest()
    eph_public, eph_secret = crypto_box_seed_keypair(seed)
    # crypto_box_seal's construction: nonce = BLAKE2b-192(ephemeral pk || recipient pk).
    nonce = hashlib.blake2b(eph_public + recipient, digest_size=_NONCE_LEN).digest()
    return eph_public + crypto_box_easy(bytes(plaintext), nonce, recipient, eph_secret)


def open_body(ciphertext: bytes | bytearray | memoryview, key: PrivateKey) -> bytes:
    """Decrypt a sealed box addressed to ``key``; raises SealError."""
    if len(ciphertext) < SEAL_OVERHEAD:
        raise SealError(f"{len(ciphertext)} bytes is shorter than a sealed box")
    try:
        return crypto_box_seal_open(bytes(ciphertext), bytes(key.public_key), bytes(key))
    except CryptoError:
        raise SealError("the sealed box does not open with this recipient's key") from None


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
