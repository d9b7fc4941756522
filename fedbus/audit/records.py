"""Audit records and the checks of a writer's chain (pure: no I/O, no clock but what is passed in).

A record is a fedbus envelope of type ``audit.record`` whose body is the record as
canonical JSON (sorted keys, no spaces): the writer's Ed25519 signature covers the
header, and through its body digest the record, exactly as for every other message.
There is no second signature format.

Each writer (coordinator, aggregator, worker) keeps its own chain on
``<prefix>.<job>.audit.<writer>``: record ``seq`` n names in ``prev`` the hash of the
writer's record n-1 (``GENESIS`` for n = 1). A record's hash is BLAKE2b-256 of its
exact wire bytes (header, signature, body), so a predecessor that was altered,
re-signed or replaced no longer matches the link its successor carries.

``ChainVerifier`` replays a whole audit stream in stream order and names every record
that breaks something: a bad or foreign signature, altered content, a broken link, a
gap in a writer's numbering, or a hole in the stream's own sequence numbers (a removed
record, including a writer's last one, which no link could show).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey
from pydantic import ValidationError

from fedbus.crypto.signing import seal
from fedbus.crypto.federation import Federation
from fedbus.crypto.keys import Identity
from fedbus.protocol.audit import AUDIT_TYPE, AuditRecord
from fedbus.protocol.envelope import EnvelopeError, EnvelopeHeader, body_digest, decode_header, split_frame

GENESIS = "0" * 64
# A record's body; the audit stream refuses messages over 64 KiB (fedbus.bus.layout), and
# the envelope header and NATS headers need the rest.
MAX_RECORD_BYTES = 48 * 1024
MAX_WIRE_BYTES = 64 * 1024
# Problems listed by one verification; the first is what matters, the rest are context.
MAX_PROBLEMS = 50


def record_hash(wire: bytes | bytearray | memoryview) -> str:
    return hashlib.blake2b(wire, digest_size=32).hexdigest()


def canonical_json(record: dict) -> bytes:
    # default=str: event fields may hold values JSON has no type for (a Path, an enum).
    return json.dumps(record, sort_keys=True, separators=(",", ":"), default=str,
                      allow_nan=False).encode()


@dataclass(frozen=True)
class SealedRecord:
    wire: bytes
    hash: str
    record: dict  # the body as a dict, plus "hash"
    msg_id: str  # Nats-Msg-Id, one per record (the expected-sequence header is what stops a second copy)


def seal_record(identity: Identity, job: str, *, seq: int, prev: str, event: str, fields: dict,
                ts_ms: int) -> SealedRecord:
    """Sign record ``seq`` of ``identity``'s chain. Raises ValueError if it is too large."""
    reserved = {"seq", "prev", "event", "writer", "ts_ms", "hash"} & set(fields)
    if reserved:
        raise ValueError(f"audit fields {sorted(reserved)} are the chain's own")
    record = {**fields, "seq": seq, "prev": prev, "event": event, "writer": identity.id, "ts_ms": ts_ms}
    AuditRecord.model_validate(record)
    body = canonical_json(record)
    if len(body) > MAX_RECORD_BYTES:
        raise ValueError(f"audit record of {len(body)} bytes, limit {MAX_RECORD_BYTES}")
    wire, header = seal(identity, AUDIT_TYPE, job=job, round=0, body=body, ts_ms=ts_ms)
    digest = record_hash(wire)
    return SealedRecord(wire, digest, {**record, "hash": digest}, f"audit-{header.nonce.hex()}")


class RecordError(Exception):
    """A record that is not a valid record of the writer; ``reason`` names why."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class OpenedRecord:
    header: EnvelopeHeader
    record: dict  # the body as a dict, plus "hash"
    hash: str


def _signer_among(keys: Iterable[tuple[str, VerifyKey]], header_bytes: bytes, signature: bytes) -> str | None:
    for pid, key in keys:
        try:
            key.verify(header_bytes, signature)
            return pid
        except BadSignatureError:
            continue
    return None


def open_record(wire: bytes | bytearray | memoryview, *, job: str, writer: str, key: VerifyKey | None,
                other_keys: Iterable[tuple[str, VerifyKey]] = ()) -> OpenedRecord:
    """Check one record of ``writer``'s chain, cheapest first: size, framing, type and
    job, the header names the writer, signature with the writer's ``key`` (None: not
    checked), body digest, body. ``other_keys`` (only tried when the signature fails)
    name who signed instead. Raises RecordError."""
    if len(wire) > MAX_WIRE_BYTES:
        raise RecordError("oversize", f"{len(wire)} bytes")
    try:
        header_bytes, signature, body = split_frame(wire)
        header = decode_header(header_bytes)
    except EnvelopeError as exc:
        raise RecordError("malformed", str(exc)[:200]) from None
    if header.type != AUDIT_TYPE or header.blob is not None:
        raise RecordError("malformed", f"a {header.type[:64]} message, not an audit record")
    if header.job != job:
        raise RecordError("wrong_job", header.job[:64])
    if header.sender != writer:
        raise RecordError("wrong_signer", f"record of {header.sender[:64]!r} in {writer!r}'s chain")
    if key is not None:
        try:
            key.verify(bytes(header_bytes), signature)
        except BadSignatureError:
            signer = _signer_among(other_keys, bytes(header_bytes), signature)
            if signer is not None:
                raise RecordError("wrong_signer", f"signed by {signer!r}, not by {writer!r}") from None
            raise RecordError("bad_signature", f"not signed by {writer!r}'s key") from None
    if len(body) != header.length or body_digest(body) != header.digest:
        raise RecordError("altered", "the content does not match the digest its writer signed")
    try:
        record = AuditRecord.model_validate(json.loads(bytes(body))).model_dump()
    except (ValueError, RecursionError, ValidationError) as exc:  # JSONDecodeError is a ValueError
        raise RecordError("malformed_body", str(exc)[:200]) from None
    if record["writer"] != writer:
        raise RecordError("wrong_signer", f"body names writer {record['writer'][:64]!r}")
    digest = record_hash(wire)
    return OpenedRecord(header, {**record, "hash": digest}, digest)


@dataclass(frozen=True)
class Problem:
    """The first thing wrong with one stored message."""

    stream_seq: int
    writer: str | None
    seq: int | None  # the record's position in its writer's chain, when it could be read
    reason: str  # bad_signature, wrong_signer, altered, broken_link, sequence_gap, missing_predecessor, ...
    detail: str

    def describe(self) -> str:
        where = f"stream sequence {self.stream_seq}"
        if self.writer is not None:
            where += f", writer {self.writer}"
        if self.seq is not None:
            where += f", record {self.seq}"
        return f"{where}: {self.reason}: {self.detail}"


@dataclass
class Verdict:
    records: int = 0
    writers: dict[str, int] = field(default_factory=dict)  # writer -> records in its chain
    problems: list[Problem] = field(default_factory=list)
    problems_total: int = 0
    signatures_checked: bool = True

    @property
    def ok(self) -> bool:
        return self.problems_total == 0


@dataclass
class _Head:
    seq: int
    hash: str


class ChainVerifier:
    """Feed every message of a job's audit stream in stream order, then ``finish``.

    Memory is O(writers): only each writer's head is kept. A record that fails its own
    checks (signature, content) does not join its writer's chain, so its honest
    successor shows the gap too; a record that only breaks a link becomes the new head,
    so one break is reported once and the rest of the chain is still checked."""

    def __init__(self, job: str, prefix: str, federation: Federation | None):
        self.job = job
        self._subject_prefix = f"{prefix}.{job}.audit."
        self.federation = federation
        self.verdict = Verdict(signatures_checked=federation is not None)
        self._heads: dict[str, _Head] = {}
        self._next_stream_seq = 1

    def _problem(self, stream_seq: int, writer: str | None, seq: int | None, reason: str, detail: str) -> None:
        self.verdict.problems_total += 1
        if len(self.verdict.problems) < MAX_PROBLEMS:
            self.verdict.problems.append(Problem(stream_seq, writer, seq, reason, detail))

    def _holes(self, upto: int) -> None:
        """Stream sequences below ``upto`` that were never fed were removed from the stream."""
        if upto > self._next_stream_seq:
            first, last = self._next_stream_seq, upto - 1
            span = f"{first}" if first == last else f"{first}-{last}"
            self._problem(first, None, None, "removed", f"stream sequence {span} is missing: a record was deleted")

    def _key_of(self, writer: str) -> tuple[VerifyKey | None, Iterable[tuple[str, VerifyKey]]]:
        fed = self.federation
        if fed is None:
            return None, ()
        # Lazy: the other keys are tried only when a signature fails, to name who signed.
        others = ((p.id, fed.verify_key(p.id)) for p in fed.spec.participants if p.id != writer)
        return fed.verify_key(writer), others

    def feed(self, stream_seq: int, subject: str, wire: bytes | bytearray | memoryview) -> None:
        self._holes(stream_seq)
        self._next_stream_seq = max(self._next_stream_seq, stream_seq + 1)
        self.verdict.records += 1
        writer = subject[len(self._subject_prefix):] if subject.startswith(self._subject_prefix) else ""
        if not writer or "." in writer:
            return self._problem(stream_seq, None, None, "foreign_subject", subject[:200])
        if self.federation is not None and self.federation.get(writer) is None:
            return self._problem(stream_seq, writer, None, "unknown_writer", "not in the federation file")
        key, others = self._key_of(writer)
        try:
            opened = open_record(wire, job=self.job, writer=writer, key=key, other_keys=others)
        except RecordError as err:
            return self._problem(stream_seq, writer, None, err.reason, err.detail)
        self._link(stream_seq, writer, opened.record)

    def _link(self, stream_seq: int, writer: str, record: dict) -> None:
        seq, prev = record["seq"], record["prev"]
        head = self._heads.get(writer)
        self._heads[writer] = _Head(seq, record["hash"])
        self.verdict.writers[writer] = self.verdict.writers.get(writer, 0) + 1
        if head is None:
            if seq != 1 or prev != GENESIS:
                self._problem(stream_seq, writer, seq, "missing_predecessor",
                              f"the chain starts at record {seq}: records 1-{seq - 1} are missing"
                              if seq > 1 else "record 1 does not start from the genesis")
            return
        if seq == head.seq + 1 and prev == head.hash:
            return
        if seq > head.seq + 1:
            missing = f"{head.seq + 1}" if seq == head.seq + 2 else f"{head.seq + 1}-{seq - 1}"
            self._problem(stream_seq, writer, seq, "sequence_gap", f"record(s) {missing} of {writer} are missing")
        elif seq <= head.seq:
            self._problem(stream_seq, writer, seq, "fork", f"record {seq} again, after record {head.seq}")
        else:
            self._problem(stream_seq, writer, seq, "broken_link",
                          f"names predecessor {prev[:16]}..., but record {head.seq} is {head.hash[:16]}...")

    def finish(self, last_stream_seq: int) -> Verdict:
        """``last_stream_seq``: the stream's last sequence, so a removed last record shows too."""
        self._holes(last_stream_seq + 1)
        return self.verdict
