"""Key derivation and mask expansion.

- ``pair_seed``: the 256-bit pairwise seed of two workers, BLAKE2b keyed with their
  X25519 shared secret, personalised for this use and bound to the job, the round and
  the (ordered) pair, so a seed never serves two rounds, jobs or pairs.
- ``expand``: the mask itself, the ChaCha20 keystream under the seed. pynacl does not
  expose the bare ``crypto_stream_chacha20``; the IETF ChaCha20-Poly1305 encryption of
  an all-zero plaintext *is* that keystream (from block counter 1) followed by a
  16-byte tag, which is dropped. The 96-bit nonce is a fixed domain label: each seed
  is used for exactly one stream.
- Masks are uniform modulo 2^bits: 64 keystream bits per coordinate, reduced modulo a
  power of two that divides 2^64.
"""

from __future__ import annotations

import hashlib

import msgpack
import numpy as np
from nacl.bindings import crypto_aead_chacha20poly1305_ietf_encrypt, crypto_scalarmult
from nacl.exceptions import RuntimeError as NaclRuntimeError

SEED_BYTES = 32
_MASK_NONCE = b"fedbus-mask\x00"  # 12 bytes: IETF ChaCha20 nonce
_TAG_BYTES = 16


def digest(person: bytes, *parts: object, key: bytes = b"") -> bytes:
    """BLAKE2b-256 of msgpack(parts), personalised (≤ 16 bytes) and optionally keyed."""
    return hashlib.blake2b(msgpack.packb(list(parts), use_bin_type=True), digest_size=32, key=key,
                           person=person).digest()


_PROBE = bytes([8]) + bytes(30) + bytes([64])  # a clamped scalar: any low-order point times it is zero


def usable_public_key(public: bytes) -> bool:
    """False for the X25519 points that agree on no secret (low order: the shared value is all
    zeros, which libsodium refuses). A worker advertising one would make every key agreement
    with it fail, so it is refused when it advertises."""
    try:
        crypto_scalarmult(_PROBE, public)
    except NaclRuntimeError:
        return False
    return True


def pair_seed(my_secret: bytes, their_public: bytes, *, job: str, round: int, a: str, b: str) -> bytes:
    """The seed both ends of the pair (a, b) derive; the order of a and b does not matter."""
    shared = crypto_scalarmult(my_secret, their_public)
    lo, hi = sorted((a, b))
    return digest(b"fedbus-sa-pair", job, round, lo, hi, key=shared)


def expand(seed: bytes, length: int, bits: int) -> np.ndarray:
    """``length`` uint64 values uniform modulo 2^bits, the ChaCha20 keystream under ``seed``."""
    if len(seed) != SEED_BYTES:
        raise ValueError("seed must be 32 bytes")
    stream = crypto_aead_chacha20poly1305_ietf_encrypt(bytes(8 * length), None, _MASK_NONCE, seed)
    # The AND makes the one writable copy (frombuffer over bytes is read-only).
    return np.frombuffer(stream, dtype="<u8", count=length) & np.uint64((1 << bits) - 1)
