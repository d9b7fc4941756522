"""Secure-aggregation (SecAgg+) messages: the four phases as signed fedbus bodies.

    secagg.setup    server -> all      the round's parameters: group, roster, graph seed, k, t, length, bits
    secagg.advertise worker -> server  two X25519 public keys + a commitment to its self-mask seed
    secagg.keys     server -> all      the keys of every worker that advertised (U1)
    secagg.shares   worker -> server   per holder: one encrypted share pair + a commitment to each share
    secagg.bundle   server -> holder   the shares addressed to that holder (dealers in U2)
    secagg.input    worker -> server   the masked input: ``length`` residues modulo 2^bits (tensor "masked")
    secagg.unmask   server -> all      who survived (U3) and who dropped (U2 minus U3)
    secagg.reveal   worker -> server   self-seed shares of survivors, key shares of the dropped
    secagg.failed   server -> all      the round ended without a sum, and why (nothing more is asked)

"server" is the coordinator, or a region's aggregator for its region (``group``). The
envelope authenticates the sender and binds job and round; these models bound every
size. Fields are flat (parallel lists of scalars), as every fedbus body is, and byte
strings travel as base64 text of an exact length.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, ClassVar, Literal

from pydantic import BeforeValidator, Field, PlainSerializer, StringConstraints, WithJsonSchema, model_validator

from fedbus.protocol.messages import KIB, MAX_COUNT, MESSAGE_TYPES, Body, ShortStr, WorkerId

MAX_ROSTER = 2000  # workers in one secure-aggregation group; a larger cohort uses regions
MAX_DEGREE = 256
MAX_LENGTH = 100_000_000  # coordinates of one masked vector
MIN_ROSTER = 3  # with fewer, the sum and one's own input reveal the other's
KEY_BYTES = 32
DIGEST_BYTES = 32
SALT_BYTES = 16
Y_BYTES = 66  # a Shamir share value in GF(2^521 - 1)
# A share pair in a Box: x (u32) | pairwise-key share | self-seed share | salt | binding digest
SHARE_PLAINTEXT_BYTES = 4 + 2 * Y_BYTES + SALT_BYTES + DIGEST_BYTES
SHARE_CIPHERTEXT_BYTES = 24 + 16 + SHARE_PLAINTEXT_BYTES  # Box nonce + MAC + plaintext
ROSTER_FIELDS_BYTES = 768 * KIB  # types that list the whole group: MAX_ROSTER ids and keys


def _from_base64(value: object) -> object:
    if isinstance(value, str):
        try:
            return base64.b64decode(value.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise ValueError("not base64") from None
    return value


def _raw(n: int):
    """Exactly ``n`` bytes; base64 text on the wire (and in the JSON Schema)."""
    b64_len = 4 * ((n + 2) // 3)
    return Annotated[bytes, Field(min_length=n, max_length=n), BeforeValidator(_from_base64),
                     PlainSerializer(lambda b: base64.b64encode(b).decode("ascii"), return_type=str, when_used="json"),
                     WithJsonSchema({"type": "string", "contentEncoding": "base64", "minLength": b64_len,
                                     "maxLength": b64_len})]


Key = _raw(KEY_BYTES)
Digest = _raw(DIGEST_BYTES)
Salt = _raw(SALT_BYTES)
ShareValue = _raw(Y_BYTES)
Ciphertext = _raw(SHARE_CIPHERTEXT_BYTES)
Round = Annotated[int, Field(ge=1, le=MAX_COUNT)]
Group = Annotated[ShortStr, Field(description="the secure-aggregation group: a region, or '' for the whole cohort")]
SERVERS = frozenset({"coordinator", "aggregator"})
WORKERS = frozenset({"worker"})


def _roster_list(item, cap: int = MAX_ROSTER):
    return Annotated[list[item], Field(max_length=cap)]


class _SecAggBody(Body):
    # Fields that are columns of one table (one entry per worker): they must be equally long.
    PARALLEL: ClassVar[tuple[str, ...]] = ()
    round: Round
    group: Group = ""

    @model_validator(mode="after")
    def _parallel(self):
        if len({len(getattr(self, name)) for name in self.PARALLEL}) > 1:
            raise ValueError(f"{', '.join(self.PARALLEL)} must have the same length")
        return self


class SecAggSetup(_SecAggBody):
    """The round's parameters; every party derives the graph, t and the modulus from them."""

    TYPE: ClassVar[str] = "secagg.setup"
    SENDER_ROLES: ClassVar[frozenset[str]] = SERVERS
    MAX_BODY_BYTES: ClassVar[int | None] = ROSTER_FIELDS_BYTES + 4
    MAX_FIELDS_BYTES: ClassVar[int] = ROSTER_FIELDS_BYTES
    job: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    roster: Annotated[list[WorkerId], Field(min_length=MIN_ROSTER, max_length=MAX_ROSTER)]
    seed: Key = Field(description="public randomness for the graph, drawn after the roster was fixed")
    degree: int = Field(ge=2, le=MAX_DEGREE)
    threshold: int = Field(ge=2, le=MAX_DEGREE + 1, description="shares (of k + 1 holders) that rebuild a secret")
    length: int = Field(ge=1, le=MAX_LENGTH)
    bits: int = Field(ge=8, le=62, description="residues modulo 2^bits; chosen so the sum cannot wrap")
    bound: float = Field(gt=0, allow_inf_nan=False, description="per-coordinate range of an input (the clip)")
    scale: float = Field(gt=0, le=2.0**40, allow_inf_nan=False, description="fixed-point steps per unit")

    @model_validator(mode="after")
    def _consistent(self):
        n = len(self.roster)
        if len(set(self.roster)) != n or self.roster != sorted(self.roster):
            raise ValueError("roster must be sorted and without duplicates")
        if self.degree > n - 1 or (self.degree < n - 1 and self.degree % 2):
            raise ValueError("degree must be even and below n - 1, or n - 1 (the complete graph)")
        if not (self.degree + 1) // 2 + 1 <= self.threshold <= self.degree + 1:
            raise ValueError("threshold must be a strict majority of the k + 1 holders")
        return self


class SecAggAdvertise(_SecAggBody):
    TYPE: ClassVar[str] = "secagg.advertise"
    SENDER_ROLES: ClassVar[frozenset[str]] = WORKERS
    MAX_BODY_BYTES: ClassVar[int | None] = 4 * KIB
    enc_pk: Key = Field(description="X25519 key its shares are encrypted to (Box)")
    mask_pk: Key = Field(description="X25519 key its pairwise seeds are agreed with; revealed if it drops")
    self_commit: Digest = Field(description="BLAKE2b commitment to its self-mask seed")


class SecAggKeys(_SecAggBody):
    """Everyone who advertised, in roster order (parallel lists)."""

    TYPE: ClassVar[str] = "secagg.keys"
    SENDER_ROLES: ClassVar[frozenset[str]] = SERVERS
    MAX_BODY_BYTES: ClassVar[int | None] = ROSTER_FIELDS_BYTES + 4
    MAX_FIELDS_BYTES: ClassVar[int] = ROSTER_FIELDS_BYTES
    PARALLEL: ClassVar[tuple[str, ...]] = ("workers", "enc_pks", "mask_pks", "self_commits")
    workers: _roster_list(WorkerId)
    enc_pks: _roster_list(Key)
    mask_pks: _roster_list(Key)
    self_commits: _roster_list(Digest)


class _ShareList(_SecAggBody):
    """Encrypted share pairs, one per peer, with the dealer's commitment to each share."""

    MAX_BODY_BYTES: ClassVar[int | None] = 256 * KIB
    PARALLEL: ClassVar[tuple[str, ...]] = ("peers", "pair_commits", "self_commits", "ciphertexts")
    peers: _roster_list(WorkerId, MAX_DEGREE + 1)
    pair_commits: _roster_list(Digest, MAX_DEGREE + 1)
    self_commits: _roster_list(Digest, MAX_DEGREE + 1)
    ciphertexts: _roster_list(Ciphertext, MAX_DEGREE + 1)


class SecAggShares(_ShareList):
    """A dealer's shares; ``peers`` are the holders (its live neighbours and itself)."""

    TYPE: ClassVar[str] = "secagg.shares"
    SENDER_ROLES: ClassVar[frozenset[str]] = WORKERS


class SecAggBundle(_ShareList):
    """The shares for one ``holder``; ``peers`` are the dealers."""

    TYPE: ClassVar[str] = "secagg.bundle"
    SENDER_ROLES: ClassVar[frozenset[str]] = SERVERS
    holder: WorkerId


class SecAggInput(_SecAggBody):
    """The masked input; its one tensor, ``masked``, holds ``length`` residues (uint32 when
    bits <= 32, else uint64)."""

    TYPE: ClassVar[str] = "secagg.input"
    SENDER_ROLES: ClassVar[frozenset[str]] = WORKERS
    HAS_TENSORS: ClassVar[bool] = True
    MAX_BODY_BYTES: ClassVar[int | None] = None  # model-sized
    TENSOR: ClassVar[str] = "masked"


class SecAggUnmask(_SecAggBody):
    TYPE: ClassVar[str] = "secagg.unmask"
    SENDER_ROLES: ClassVar[frozenset[str]] = SERVERS
    MAX_BODY_BYTES: ClassVar[int | None] = ROSTER_FIELDS_BYTES + 4
    MAX_FIELDS_BYTES: ClassVar[int] = ROSTER_FIELDS_BYTES
    survivors: _roster_list(WorkerId)
    dropped: _roster_list(WorkerId)


class SecAggReveal(_SecAggBody):
    """A survivor's answer: per dealer, one share of the kind the request asks for."""

    TYPE: ClassVar[str] = "secagg.reveal"
    SENDER_ROLES: ClassVar[frozenset[str]] = WORKERS
    MAX_BODY_BYTES: ClassVar[int | None] = 64 * KIB
    PARALLEL: ClassVar[tuple[str, ...]] = ("dealers", "kinds", "ys", "salts")
    request_digest: Digest = Field(description="the secagg.unmask answered (audits catch an equivocating server)")
    dealers: _roster_list(WorkerId, MAX_DEGREE + 1)
    kinds: _roster_list(Literal["self", "pair"], MAX_DEGREE + 1)
    ys: _roster_list(ShareValue, MAX_DEGREE + 1)
    salts: _roster_list(Salt, MAX_DEGREE + 1)


class SecAggFailure(_SecAggBody):
    TYPE: ClassVar[str] = "secagg.failed"
    SENDER_ROLES: ClassVar[frozenset[str]] = SERVERS
    MAX_BODY_BYTES: ClassVar[int | None] = 4 * KIB
    reason: ShortStr = Field(description="below_threshold | inconsistent_shares | below_quorum (fedbus.secagg.errors)")
    detail: Annotated[str, StringConstraints(max_length=256)] = ""


SECAGG_TYPES = (SecAggSetup, SecAggAdvertise, SecAggKeys, SecAggShares, SecAggBundle, SecAggInput, SecAggUnmask,
                SecAggReveal, SecAggFailure)

# Registered here, not in messages.MESSAGE_TYPES's literal, because these bodies import
# Body from there; fedbus.protocol's __init__ imports this module, so every user of
# the registry sees them.
for _cls in SECAGG_TYPES:
    assert _cls.TYPE not in MESSAGE_TYPES, _cls.TYPE
    MESSAGE_TYPES[_cls.TYPE] = _cls
