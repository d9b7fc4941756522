"""Sealing (sign) and opening (verify) fedbus envelopes.

Verification runs cheapest check first and stops at the first failure, before any body
is decoded: size -> header decode -> known, unrevoked sender -> role allowed for the type
-> signature -> timestamp freshness -> nonce unseen -> job -> round -> body size (the
type's own limit) -> claim-check pointer allowed -> sealed to me / sealed when required
-> body digest -> open the sealed box -> body decode -> header/body agreement. Tensor
checks against the model follow in ``check_tensors``.
Every failure is a ``Rejection`` with a stable reason name; nothing else escapes.

``accept_body`` is ``decode_body`` (pure: digest, decode, agreement; safe to run in a
worker thread for large bodies) followed by ``remember`` (the replay guard, which only
the event loop's thread touches).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from nacl.exceptions import BadSignatureError

from fedbus.crypto.federation import Federation, Participant
from fedbus.crypto.replay import ReplayGuard
from fedbus.crypto.signing import now_ms, seal  # noqa: F401  (re-exported: the send side of this module)
from fedbus.crypto.sealing import Opener, SealError
from fedbus.protocol.codec import DEFAULT_MAX_TENSORS, CodecError, Tensor, TensorSpec, spec_of
from fedbus.protocol.envelope import (
    PROTOCOL_VERSION,
    EnvelopeError,
    EnvelopeHeader,
    decode_header,
    header_digest_of,
    pointer_digest,
    split_frame,
)
from fedbus.protocol.messages import MESSAGE_TYPES, Body, BodyError, body_limit, decode_body

# Stable rejection reasons, in verification order. Metrics, logs and audit use these names.
REASONS = (
    "oversize",
    "malformed_header",
    "unknown_type",
    "unknown_sender",
    "revoked_sender",
    "role_not_allowed",
    "subject_mismatch",
    "bad_signature",
    "stale_timestamp",
    "future_timestamp",
    "replayed_nonce",
    "wrong_job",
    "wrong_round",
    "blob_unavailable",
    "digest_mismatch",
    "malformed_body",
    "not_in_cohort",
    "duplicate_update",
    "tensor_mismatch",
    "non_finite",
    "invalid_update",
    "rate_limited",
    # added with run binding, bounded claims and bounded bodies
    "wrong_run",            # a message of another coordinator run of this job
    "header_mismatch",      # header and body disagree on job, run or round
    "pointer_not_allowed",  # a claim check where the type has none, or outside the job's bucket/namespace
    "excessive_samples",    # num_samples above what the worker declared or the caps allow
    "invalid_metrics",      # non-finite, too many, or too long metric names
    "too_stale",            # (async) an update whose base version is too old
    "wrong_region",         # an aggregator's partial for another region, or with a worker of another region
    "invalid_key_event",    # a verified key event that the key rules refuse (fedbus.crypto.keyevents)
    # added with sealed updates (fedbus.crypto.sealing)
    "unsealed_body",        # a plain body of a type this receiver requires sealed
    "unsealable_body",      # sealed to someone else, of a type never sealed, or a box that does not open
    # compressed updates (fedbus.compression.codecs), checked before the dense delta is built
    "excessive_k",          # top-k: more entries than the tensor has or the job's fraction allows
    "index_out_of_range",   # top-k: an index outside the tensor
    "duplicate_indices",    # top-k: one index sent twice
    "bad_scale",            # int8: a chunk scale that is negative or not finite
    # model commands (fedbus models rollback): verified, but not applicable
    "unknown_version",      # the registry keeps no such version (dropped by retention, or never committed)
    "invalid_version",      # its manifest is forged, or its model object is missing or does not match it
    "rollback_unsupported",  # the job's mode cannot roll back (async)
    "model_mismatch",       # the version's tensors do not fit the task's model
    "job_done",             # the job has finished
)


class Rejection(Exception):
    """A message failed verification; ``reason`` is one of REASONS."""

    def __init__(self, reason: str, detail: str = "", header: EnvelopeHeader | None = None):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.header = header


@dataclass(frozen=True)
class Opened:
    """A message whose header passed every check; its body is not yet verified."""

    header: EnvelopeHeader
    sender: Participant
    inline_body: memoryview

    @property
    def body_cls(self) -> type[Body]:
        return MESSAGE_TYPES[self.header.type]


RoundCheck = Callable[[EnvelopeHeader], bool]


def check_pointer(header: EnvelopeHeader, bucket: str | None) -> None:
    """A claim check is allowed only where a body can be large (types with tensors), only
    in the job's bucket (``bucket``; None: not checked here) and only under the sender's
    own names ("<job>/<sender>/...", as Messenger.seal writes them), so a sender cannot
    make a receiver fetch other objects. Raises Rejection("pointer_not_allowed")."""
    pointer = header.blob
    if pointer is None:
        return
    cls = MESSAGE_TYPES.get(header.type)
    if cls is None or not cls.HAS_TENSORS:
        raise Rejection("pointer_not_allowed", f"{header.type} has no claim checks", header)
    if bucket is not None and pointer.bucket != bucket:
        raise Rejection("pointer_not_allowed", f"bucket {pointer.bucket[:64]!r}", header)
    if not pointer.name.startswith(f"{header.job}/{header.sender}/"):
        raise Rejection("pointer_not_allowed", f"object {pointer.name[:80]!r} outside {header.job}/{header.sender}/",
                        header)


class EnvelopeVerifier:
    """Opens envelopes for one job on behalf of one receiving participant."""

    def __init__(self, federation: Federation, job: str, *, max_age_ms: int, max_future_ms: int,
                 max_body_bytes: int, replay_guard: ReplayGuard | None = None,
                 blob_bucket: str | None = None, max_tensors: int = DEFAULT_MAX_TENSORS,
                 opener: Opener | None = None, sealed_types: frozenset[str] = frozenset()):
        self.federation = federation
        self.job = job
        self.max_age_ms = max_age_ms
        self.max_future_ms = max_future_ms
        self.max_body_bytes = max_body_bytes
        # The only bucket a claim check may name (None: any; Messenger still insists on
        # its own store). Object names must lie under "<job>/<sender>/".
        self.blob_bucket = blob_bucket
        # Bound on tensors in one body: set it to what the model (plus extras) needs
        # once known, so a hostile tensor header costs little.
        self.max_tensors = max_tensors
        # This receiver's own X25519 key (None: it opens no sealed bodies), and the message
        # types it accepts only sealed.
        self.opener = opener
        self.sealed_types = sealed_types
        # `is not None`: an empty guard is falsy (it has __len__).
        self.replay_guard = replay_guard if replay_guard is not None else ReplayGuard(max_age_ms + max_future_ms)

    def open(self, wire: bytes | bytearray | memoryview, *, now: int | None = None,
             round_ok: RoundCheck | None = None, sender_token: str | None = None,
             stored_ms: int | None = None) -> Opened:
        """Check everything up to (not including) the body. Raises Rejection.

        ``stored_ms``: when the stream stored the message (JetStream metadata). Freshness
        is then judged against it rather than now, so a message held across a crash is
        still fresh when redelivered; nonce bookkeeping always uses the real now.
        """
        now = now_ms() if now is None else now
        reference = now if stored_ms is None else stored_ms
        # 1. size, before decoding anything
        if len(wire) > self.max_body_bytes + 8192:
            raise Rejection("oversize", f"{len(wire)} bytes on the wire")
        # 2. header decode
        try:
            header_bytes, signature, inline_body = split_frame(wire)
            header = decode_header(header_bytes)
        except EnvelopeError as exc:
            raise Rejection("malformed_header", str(exc)) from None
        if header.v != PROTOCOL_VERSION:
            raise Rejection("malformed_header", f"unsupported protocol version {header.v}", header)
        if header.type not in MESSAGE_TYPES:
            raise Rejection("unknown_type", header.type, header)
        # 3. known sender allowed to send this type
        sender = self.federation.get(header.sender)
        if sender is None:
            raise Rejection("unknown_sender", header.sender, header)
        if sender.revoked:
            raise Rejection("revoked_sender", header.sender, header)
        if sender.role not in MESSAGE_TYPES[header.type].SENDER_ROLES:
            raise Rejection("role_not_allowed", f"{sender.role} may not send {header.type}", header)
        if sender_token is not None and sender_token != header.sender:
            raise Rejection("subject_mismatch", f"subject names {sender_token}, header {header.sender}", header)
        # 4. signature over the exact header bytes
        try:
            self.federation.verify_key(sender.id).verify(bytes(header_bytes), signature)
        except BadSignatureError:
            raise Rejection("bad_signature", header.sender, header) from None
        # 5. freshness
        if header.ts < reference - self.max_age_ms:
            raise Rejection("stale_timestamp", f"{reference - header.ts} ms old", header)
        if header.ts > reference + self.max_future_ms:
            raise Rejection("future_timestamp", f"{header.ts - reference} ms ahead", header)
        # 6. nonce: only looked up here; remembered once the whole message verified, so a
        # tampered copy cannot burn the nonce of the genuine message.
        if self.replay_guard.seen(header.nonce, now):
            raise Rejection("replayed_nonce", header.nonce.hex(), header)
        if self.replay_guard.full:
            # Fail closed: forgetting live nonces to make room would let a flood enable replays.
            raise Rejection("rate_limited", "replay guard at capacity", header)
        # 7. job and round
        if header.job != self.job:
            raise Rejection("wrong_job", header.job, header)
        if round_ok is not None and not round_ok(header):
            raise Rejection("wrong_round", f"round {header.round}", header)
        # 8. body size as declared, against the type's own limit (a heartbeat is tiny),
        # and consistency of inline vs out-of-line
        cls = MESSAGE_TYPES[header.type]
        limit = body_limit(cls, self.max_body_bytes)
        if header.length > limit:
            raise Rejection("oversize", f"{header.type} body of {header.length} bytes, limit {limit}", header)
        if header.blob is None and len(inline_body) != header.length:
            raise Rejection("digest_mismatch", "inline body length differs from header", header)
        if header.blob is not None:
            if len(inline_body) != 0 or header.blob.size != header.length:
                raise Rejection("malformed_header", "blob pointer inconsistent with header", header)
            check_pointer(header, self.blob_bucket)
            if pointer_digest(header.blob) != header.digest:  # one digest serves both (pointer_digest)
                raise Rejection("digest_mismatch", "the header's digest is not the claim check's", header)
        # 9. sealing, on the header alone: a body this receiver cannot open is refused before
        # any blob is fetched for it.
        if header.sealed_to is not None:
            if not cls.SEALABLE:
                raise Rejection("unsealable_body", f"{header.type} bodies are never sealed", header)
            if self.opener is None or not self.opener.opens_for(header.sealed_to):
                raise Rejection("unsealable_body", f"sealed to {header.sealed_to[:64]!r}", header)
        elif header.type in self.sealed_types:
            raise Rejection("unsealed_body", f"{header.type} bodies must be sealed", header)
        return Opened(header, sender, inline_body)

    def decode_body(self, opened: Opened, body: bytes | bytearray | memoryview, *, fetched: bool = False
                    ) -> tuple[Body, dict[str, Tensor] | None]:
        """Digest, decode and header/body agreement: pure, touches no shared state, so it
        may run in a worker thread. Raises Rejection. Does not remember the nonce.

        ``fetched``: ``body`` is the claim check's object as ``BlobStore.get`` returned it
        (its SHA-256, the header's digest, already checked while it was read; a buffer
        nobody else holds). It is then not hashed again, and its tensors are views over it
        instead of a copy."""
        header = opened.header
        if len(body) != header.length:
            raise Rejection("digest_mismatch", header.sender, header)
        if not (fetched and header.blob is not None) and header_digest_of(body, header.blob) != header.digest:
            raise Rejection("digest_mismatch", header.sender, header)
        owned = fetched and header.blob is not None
        if header.sealed_to is not None:  # the digest was the ciphertext's: open it only now
            if self.opener is None:
                raise Rejection("unsealable_body", "this receiver opens no sealed bodies", header)
            try:
                # A fetched body is ours: opened over itself, so a large update is held once.
                body = self.opener.open(header.sealed_to, body, in_place=owned and not memoryview(body).readonly)
            except SealError as exc:
                raise Rejection("unsealable_body", str(exc), header) from None
            owned = True  # a buffer of its own (new, or the fetched one)
        try:
            fields, tensors = decode_body(opened.body_cls, body, max_tensors=self.max_tensors, copy=not owned)
        except BodyError as exc:
            raise Rejection(exc.reason, str(exc), header) from None
        # The machine acts on the body's round and the checks above on the header's:
        # they must be the same round.
        body_round = getattr(fields, "round", None)
        if body_round is not None and body_round != header.round:
            raise Rejection("header_mismatch", f"header round {header.round}, body round {body_round}", header)
        return fields, tensors

    def remember(self, opened: Opened, *, now: int | None = None) -> None:
        """Record the nonce of a fully verified message (event-loop thread only)."""
        header = opened.header
        now = now_ms() if now is None else now
        if not self.replay_guard.check_and_remember(header.nonce, header.ts, now):
            raise Rejection("replayed_nonce", header.nonce.hex(), header)

    def accept_body(self, opened: Opened, body: bytes | bytearray | memoryview, *,
                    now: int | None = None) -> tuple[Body, dict[str, Tensor] | None]:
        """Digest and decode the body; on success the nonce is remembered."""
        fields, tensors = self.decode_body(opened, body)
        self.remember(opened, now=now)
        return fields, tensors


def check_tensors(tensors: Mapping[str, Tensor], expected: Mapping[str, TensorSpec],
                  header: EnvelopeHeader | None = None) -> None:
    """Names, kinds, dtypes and shapes must match the model; float values must be finite.

    Raises only Rejection: a value that is not a tensor of a supported dtype is a
    tensor_mismatch, whatever it is.
    """
    if not isinstance(tensors, Mapping):
        raise Rejection("tensor_mismatch", f"tensors are a {type(tensors).__name__}", header)
    try:
        got = spec_of(tensors)
    except CodecError as exc:
        raise Rejection("tensor_mismatch", str(exc)[:200], header) from None
    missing = sorted(set(expected) - set(got), key=str)
    extra = sorted(set(got) - set(expected), key=str)
    if missing or extra:
        raise Rejection("tensor_mismatch", f"missing {missing[:3]} unexpected {extra[:3]}", header)
    for name, spec in expected.items():
        if got[name] != spec:
            raise Rejection("tensor_mismatch", f"{name}: {got[name]} != {spec}", header)
    for name, value in tensors.items():
        if not _all_finite(value):
            raise Rejection("non_finite", name, header)


def _all_finite(value: Tensor) -> bool:
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex():
            if value.element_size() == 1:  # float8: torch has no isfinite for every variant
                value = value.to(torch.float16)
            # A sum reads the tensor once without a mask as large as it (NaN and inf propagate);
            # only a non-finite sum (or an overflow of finite values) needs the exact check.
            flat = torch.view_as_real(value) if value.is_complex() else value
            acc = torch.float64 if flat.dtype == torch.float64 else torch.float32
            if flat.numel() and math.isfinite(float(flat.sum(dtype=acc))):
                return True
            return bool(torch.isfinite(value).all())
        return True
    if np.issubdtype(value.dtype, np.inexact):
        return bool(np.isfinite(value).all())
    return True
