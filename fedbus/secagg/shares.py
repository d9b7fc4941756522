"""Commitments and the encrypted share envelope between a dealer and one holder.

A dealer sends each holder, through the server, one Box ciphertext holding the holder's
share of the dealer's pairwise key and of its self-mask seed. Box (X25519 +
XSalsa20-Poly1305 between the dealer's and the holder's ``enc`` keys) must give:
- confidentiality against the server that relays it;
- integrity and origin to the holder (only the two of them know the Box key, and the
  dealer's ``enc_pk`` came in its signed secagg.advertise).
It need not give replay protection or non-repudiation: the outer signed envelope has a
nonce and a timestamp, and the plaintext carries a digest binding job, round, dealer
and holder, so a ciphertext cannot be moved to another round or holder.

Next to each ciphertext the dealer publishes (in its signed secagg.shares) one commitment
per share, BLAKE2b over the binding, the share value and a 128-bit salt. A holder
checks what it decrypted against them; the server checks every share revealed in the
unmasking phase against them, so a holder cannot substitute a share, and a share that
passes is the one the dealer signed for.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey

from fedbus.protocol.secagg import SALT_BYTES, SHARE_PLAINTEXT_BYTES, Y_BYTES
from fedbus.secagg.prg import digest
from fedbus.secagg.spec import RoundParams

_X = struct.Struct("<I")


def self_commitment(params: RoundParams, worker: str, seed: bytes) -> bytes:
    return digest(b"fedbus-sa-self", params.job, params.round, worker, seed)


def share_commitment(params: RoundParams, dealer: str, holder: str, kind: str, y: bytes, salt: bytes) -> bytes:
    return digest(b"fedbus-sa-share", params.job, params.round, dealer, holder, kind, y, salt)


def _binding(params: RoundParams, dealer: str, holder: str) -> bytes:
    return digest(b"fedbus-sa-bind", params.job, params.round, dealer, holder)


class SealedShare(NamedTuple):
    """One dealer-to-holder share pair as the server relays it."""

    pair_commit: bytes
    self_commit: bytes
    ciphertext: bytes


@dataclass(frozen=True)
class HeldShares:
    """What a holder keeps of one dealer: both share values (wire bytes) and their salt."""

    x: int
    pair_y: bytes
    self_y: bytes
    salt: bytes

    def y(self, kind: str) -> bytes:
        return self.pair_y if kind == "pair" else self.self_y

    def commitments(self, params: RoundParams, dealer: str, holder: str) -> tuple[bytes, bytes]:
        return (share_commitment(params, dealer, holder, "pair", self.pair_y, self.salt),
                share_commitment(params, dealer, holder, "self", self.self_y, self.salt))


def seal(params: RoundParams, dealer: str, holder: str, held: HeldShares, enc_sk: bytes, holder_pk: bytes) -> bytes:
    plaintext = _X.pack(held.x) + held.pair_y + held.self_y + held.salt + _binding(params, dealer, holder)
    assert len(plaintext) == SHARE_PLAINTEXT_BYTES
    return bytes(Box(PrivateKey(enc_sk), PublicKey(holder_pk)).encrypt(plaintext))


def open_sealed(params: RoundParams, dealer: str, holder: str, ciphertext: bytes, enc_sk: bytes,
                dealer_pk: bytes) -> HeldShares | None:
    """The shares in ``ciphertext``, or None when it does not decrypt or is bound elsewhere."""
    try:
        plaintext = Box(PrivateKey(enc_sk), PublicKey(dealer_pk)).decrypt(ciphertext)
    except CryptoError:
        return None
    if len(plaintext) != SHARE_PLAINTEXT_BYTES or plaintext[-32:] != _binding(params, dealer, holder):
        return None
    (x,) = _X.unpack_from(plaintext)
    o = _X.size
    return HeldShares(x, plaintext[o:o + Y_BYTES], plaintext[o + Y_BYTES:o + 2 * Y_BYTES],
                      plaintext[o + 2 * Y_BYTES:o + 2 * Y_BYTES + SALT_BYTES])
