"""What the four SecAgg+ phases exchange (pydantic: the single source of truth).

    server -> all      RoundParams        (spec.py) roster, graph seed, t, k, length, bits
    worker -> server   AdvertiseKeys      two X25519 public keys + commitment to the self-mask seed
    server -> all      KeyDirectory       the keys of every worker that advertised (U1)
    worker -> server   ShareKeys          per holder: the encrypted shares + commitments to each
    server -> holder   ShareBundle        the shares addressed to that holder (dealers in U2)
    worker -> server   masked vector      y_u (numpy, ``length`` residues modulo 2^bits)
    server -> all      UnmaskRequest      who survived (U3) and who dropped (U2 minus U3)
    worker -> server   UnmaskResponse     self-seed shares of survivors, key shares of the dropped

Every message travels in a signed fedbus envelope, which authenticates the sender and
binds job and round; the models here only bound sizes. Every byte string has an exact
length and every list a cap, so a hostile message is refused before anything is
allocated on its behalf.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from fedbus.secagg.shamir import Y_BYTES
from fedbus.secagg.spec import MAX_DEGREE, MAX_ROSTER, WorkerId

KEY_BYTES = 32
DIGEST_BYTES = 32
SALT_BYTES = 16
# Box plaintext: x (u32) | pair-key share y | self-seed share y | salt | binding digest
SHARE_PLAINTEXT_BYTES = 4 + 2 * Y_BYTES + SALT_BYTES + DIGEST_BYTES
SHARE_CIPHERTEXT_BYTES = 24 + 16 + SHARE_PLAINTEXT_BYTES  # Box nonce + MAC + plaintext

Key = Annotated[bytes, Field(min_length=KEY_BYTES, max_length=KEY_BYTES)]
Digest = Annotated[bytes, Field(min_length=DIGEST_BYTES, max_length=DIGEST_BYTES)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AdvertiseKeys(_Model):
    enc_pk: Key = Field(description="X25519 key the worker's shares are encrypted to (Box)")
    mask_pk: Key = Field(description="X25519 key its pairwise mask seeds are agreed with; revealed if it drops")
    self_commit: Digest = Field(description="BLAKE2b commitment to its self-mask seed")


class KeyEntry(AdvertiseKeys):
    worker: WorkerId


class KeyDirectory(_Model):
    entries: Annotated[list[KeyEntry], Field(max_length=MAX_ROSTER)]


class EncryptedShare(_Model):
    """One dealer's shares for one holder: ``peer`` is the holder in ShareKeys, the dealer in ShareBundle."""

    peer: WorkerId
    pair_commit: Digest
    self_commit: Digest
    ciphertext: bytes = Field(min_length=SHARE_CIPHERTEXT_BYTES, max_length=SHARE_CIPHERTEXT_BYTES)


class ShareKeys(_Model):
    shares: Annotated[list[EncryptedShare], Field(max_length=MAX_DEGREE)]


class ShareBundle(_Model):
    shares: Annotated[list[EncryptedShare], Field(max_length=MAX_DEGREE)]


class UnmaskRequest(_Model):
    survivors: Annotated[list[WorkerId], Field(max_length=MAX_ROSTER)]
    dropped: Annotated[list[WorkerId], Field(max_length=MAX_ROSTER)]


class RevealedShare(_Model):
    dealer: WorkerId
    kind: Literal["self", "pair"]
    y: bytes = Field(min_length=Y_BYTES, max_length=Y_BYTES)
    salt: bytes = Field(min_length=SALT_BYTES, max_length=SALT_BYTES)


class UnmaskResponse(_Model):
    request_digest: Digest = Field(description="which UnmaskRequest was answered (audits catch an equivocating server)")
    shares: Annotated[list[RevealedShare], Field(max_length=MAX_DEGREE + 1)]
