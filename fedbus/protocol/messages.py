"""Message bodies: the pydantic models are the single source of truth for the wire.

A body on the wire is ``u32 fields_len | msgpack(fields) | tensor section``; the tensor
section (``fedbus.protocol.codec``) is present only for types that carry tensors.
Each model names its type and the roles allowed to send it; the verifier enforces both.

Every body is hostile until proven otherwise, so each type also carries its size limit
(``MAX_BODY_BYTES``, checked on the signed header's declared length before anything is
fetched or decoded), and decoding bounds the fields section, every msgpack container
and string, and the nesting depth (no field of any message is nested deeper than a
list or map of scalars) before pydantic sees it.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from typing import Annotated, ClassVar, Literal

import msgpack
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from fedbus.protocol.envelope import BlobPointer
from fedbus.protocol.codec import (
    DEFAULT_MAX_TENSORS,
    CodecError,
    Tensor,
    container_header,
    decode_tensors,
    tensor_pieces,
    unpack_values,
)

_LEN = struct.Struct("<I")

Role = Literal["coordinator", "aggregator", "worker", "operator"]

KIB = 1024
# Bounds on what any body may contain. A cohort of 100k ids is the largest list; no
# field is nested deeper than a list or map of scalars.
MAX_FIELDS_BYTES = 256 * KIB  # the msgpack fields section (tensors excluded), unless a type says otherwise
MAX_LIST_LEN = 100_000
MAX_MAP_LEN = 1024
MAX_STR_BYTES = 4096
# Tensor names in a committed model object (round.open/eval.open ``model``): "model/<name>".
MODEL_PREFIX = "model/"
MAX_COUNT = 2**53 - 1  # integers that are added, weighted or averaged stay exact as floats
MAX_METRICS = 64
MAX_METRIC_NAME = 64

WorkerId = Annotated[str, StringConstraints(min_length=1, max_length=128)]  # as EnvelopeHeader.sender
ShortStr = Annotated[str, StringConstraints(max_length=64)]
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
# The one metrics type: finite values, bounded count and name length. Violations are
# rejected as invalid_metrics (see decode_body), so summary.json stays valid JSON.
Metrics = Annotated[dict[Annotated[str, StringConstraints(max_length=MAX_METRIC_NAME)], FiniteFloat],
                    Field(max_length=MAX_METRICS)]
Cohort = Annotated[list[WorkerId], Field(max_length=MAX_LIST_LEN)]


def finite_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """What a sender puts in a metrics field: finite values only (a diverged loss is NaN),
    at most MAX_METRICS names of at most MAX_METRIC_NAME characters. Receivers reject
    anything else as invalid_metrics, and constructing a body with it raises."""
    out: dict[str, float] = {}
    for name, value in metrics.items():
        if len(out) >= MAX_METRICS:
            break
        if isinstance(name, str) and len(name) <= MAX_METRIC_NAME and isinstance(value, (int, float)) \
                and math.isfinite(value):
            out[name] = float(value)
    return out


class BodyError(ValueError):
    """The body does not decode into its declared type; ``reason`` is the rejection name."""

    def __init__(self, message: str, reason: str = "malformed_body"):
        super().__init__(message)
        self.reason = reason


class Body(BaseModel):
    """Base class of every message body."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    TYPE: ClassVar[str]
    SENDER_ROLES: ClassVar[frozenset[str]]
    HAS_TENSORS: ClassVar[bool] = False
    # Whether the body may travel sealed to its recipient (fedbus.crypto.sealing); a sealed
    # body of any other type is refused as unsealable_body.
    SEALABLE: ClassVar[bool] = False
    # Largest body (fields + tensors) of this type; None: the job's max_message_bytes.
    MAX_BODY_BYTES: ClassVar[int | None] = 256 * KIB
    # Largest msgpack fields section of this type.
    MAX_FIELDS_BYTES: ClassVar[int] = MAX_FIELDS_BYTES
    # Fields whose violations are reported as invalid_metrics rather than malformed_body.
    METRIC_FIELDS: ClassVar[frozenset[str]] = frozenset()


class Heartbeat(Body):
    """A worker says it is alive and what it can offer (core NATS, not persisted)."""

    TYPE: ClassVar[str] = "heartbeat"
    SENDER_ROLES: ClassVar[frozenset[str]] = frozenset({"worker"})
    MAX_BODY_BYTES: ClassVar[int | None] = 4 * KIB  # the most frequent message: tiny
    region: ShortStr = "default"
    num_samples: Count
    partition: Count
    status: Literal["idle", "training", "done"] = "idle"
    capabilities: Annotated[dict[Annotated[str, StringConstraints(max_length=32)],
                                 Annotated[str, StringConstraints(max_length=128)]],
                            Field(max_length=16)] = Field(default_factory=dict)


class RoundOpen(Body):
    """The coordinator opens a round: cohort, deadline, settings and the model to start from."""

    TYPE: ClassVar[str] = "round.open"
    SENDER_ROLES: ClassVar[frozenset[str]] = frozenset({"coordinator"})
    HAS_TENSORS: ClassVar[bool] = True
    MAX_BODY_BYTES: ClassVar[int | None] = None  # carries the model
    MAX_FIELDS_BYTES: ClassVar[int] = 1024 * KIB  # a cohort of 100k short worker ids
    round: int = Field(ge=1, le=MAX_COUNT)
    model_version: Count
    cohort: Cohort
    deadline_ms: Count = Field(description="absolute, ms since the Unix epoch")
    train: Annotated[dict[ShortStr, FiniteFloat | int | Annotated[str, StringConstraints(max_length=256)] | bool],
                     Field(max_length=MAX_METRICS)] = Field(default_factory=dict, description="local training settings")
    evaluate: bool = Field(True, description="workers evaluate the received model on their held-out split")
    declared: Annotated[list[Count], Field(max_length=MAX_LIST_LEN)] = Field(
        default_factory=list, description="each cohort member's committed sample count, in cohort order: the cap on "
                                          "its update's claim (regional aggregators apply it); empty when unknown")
    model: BlobPointer | None = Field(
        None, description="the model by reference: the coordinator's committed object of model_version in the models "
                          "bucket (its tensors named 'model/<name>', checked against this size and SHA-256 as it is "
                          "read). Set for models above the inline limit: a version's model is stored once, not once "
                          "more per announcement. Absent: the model's tensors are in the body")


class Update(Body):
    """A worker's locally trained weights for one round."""

    TYPE: ClassVar[str] = "update"
    SENDER_ROLES: ClassVar[frozenset[str]] = frozenset({"worker"})
    HAS_TENSORS: ClassVar[bool] = True
    SEALABLE: ClassVar[bool] = True
    MAX_BODY_BYTES: ClassVar[int | None] = None  # carries the model
    METRIC_FIELDS: ClassVar[frozenset[str]] = frozenset({"train_metrics", "eval_metrics", "extra_scalars"})
    round: int = Field(ge=1, le=MAX_COUNT)
    base_version: Count
    # < 2**53: a claim must not reach float weighting as a huge int. How many samples a
    # worker may claim (its heartbeat, the caps) is the coordinator's policy.
    num_samples: int = Field(ge=1, le=MAX_COUNT)
    num_steps: Count
    train_metrics: Metrics = Field(default_factory=dict)
    eval_metrics: Metrics = Field(default_factory=dict, description="the received global model on the worker's held-out split")
    eval_samples: Count = 0
    extra_scalars: Metrics = Field(default_factory=dict, description="strategy inputs, e.g. FedNova's fednova_a")


class RoundClose(Body):
    """The coordinator closes a round and reports what it aggregated."""

    TYPE: ClassVar[str] = "round.close"
    SENDER_ROLES: ClassVar[frozenset[str]] = frozenset({"coordinator"})
    MAX_BODY_BYTES: ClassVar[int | None] = MAX_FIELDS_BYTES  # a 10k-worker accepted list fits
    METRIC_FIELDS: ClassVar[frozenset[str]] = frozenset({"metrics"})
    round: int = Field(ge=1, le=MAX_COUNT)
    model_version: Count
    status: Literal["aggregated", "failed", "rolled_back"]
    accepted: Cohort
    rejected: Annotated[dict[ShortStr, Count], Field(max_length=MAX_METRICS)] = Field(default_factory=dict)
    seconds: float = Field(ge=0, allow_inf_nan=False)
    metrics: Metrics = Field(default_factory=dict)


class EvalOpen(Body):
    """The coordinator asks workers to evaluate the final model on their held-out split."""

    TYPE: ClassVar[str] = "eval.open"
    SENDER_ROLES: ClassVar[frozenset[str]] = frozenset({"coordinator"})
    HAS_TENSORS: ClassVar[bool] = True
    MAX_BODY_BYTES: ClassVar[int | None] = None  # carries the model
    MAX_FIELDS_BYTES: ClassVar[int] = 1024 * KIB  # a cohort of 100k short worker ids
    round: int = Field(ge=1, le=MAX_COUNT)
    model_version: Count
    cohort: Cohort
    deadline_ms: Count
    model: BlobPointer | None = Field(
        None, description="the model by reference: the coordinator's committed object of model_version in the models "
                          "bucket (its tensors named 'model/<name>', checked against this size and SHA-256 as it is "
                          "read). Set for models above the inline limit: a version's model is stored once, not once "
                          "more per announcement. Absent: the model's tensors are in the body")


class EvalReport(Body):
    """A worker's evaluation of a model on its own held-out split."""

    TYPE: ClassVar[str] = "eval.report"
    SENDER_ROLES: ClassVar[frozenset[str]] = frozenset({"worker"})
    METRIC_FIELDS: ClassVar[frozenset[str]] = frozenset({"metrics"})
    round: int = Field(ge=1, le=MAX_COUNT)
    model_version: Count
    num_samples: Count
    metrics: Metrics


class JobDone(Body):
    """The job is over; workers may exit."""

    TYPE: ClassVar[str] = "job.done"
    SENDER_ROLES: ClassVar[frozenset[str]] = frozenset({"coordinator"})
    METRIC_FIELDS: ClassVar[frozenset[str]] = frozenset({"metrics"})
    rounds_completed: Count
    model_version: Count
    metrics: Metrics = Field(default_factory=dict)
    reason: Annotated[str, StringConstraints(max_length=256)] = "completed"


MAX_CONTRIBUTORS = 10_000  # updates one partial aggregate may stand for
MAX_PROOF_BYTES = 2 * KIB  # a worker's signed update header (msgpack header + 64-byte signature)


class Partial(Body):
    """A regional aggregator's partial aggregate of one round: the mergeable statistics
    (tensors: ``sums/<key>``, ``carry/<key>``, ``groups/<group>/<key>``, see
    ``aggregation.partial``) and who is inside it. Each contributor comes with its update's
    digest, weight and base version, and the worker's own signed update header (``proofs``:
    header bytes followed by the 64-byte signature), so the coordinator and an auditor can
    check that every listed update was really sent, for this round, with this digest."""

    TYPE: ClassVar[str] = "partial"
    SENDER_ROLES: ClassVar[frozenset[str]] = frozenset({"aggregator"})
    HAS_TENSORS: ClassVar[bool] = True
    MAX_BODY_BYTES: ClassVar[int | None] = None  # model-sized sums
    MAX_FIELDS_BYTES: ClassVar[int] = 32 * 1024 * KIB  # MAX_CONTRIBUTORS proofs
    METRIC_FIELDS: ClassVar[frozenset[str]] = frozenset({"scalars", "train_metrics"})
    round: int = Field(ge=1, le=MAX_COUNT)
    region: ShortStr
    base_version: Count
    rule: Annotated[str, StringConstraints(max_length=256)]
    total_weight: float = Field(ge=0, allow_inf_nan=False)
    workers: Annotated[list[WorkerId], Field(max_length=MAX_CONTRIBUTORS)]
    # Base64 strings (message fields travel as JSON-able values; base64 costs 4/3, hex 2x).
    digests: Annotated[list[Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9+/]{43}=$")]],
                       Field(max_length=MAX_CONTRIBUTORS)]
    weights: Annotated[list[Annotated[float, Field(gt=0, allow_inf_nan=False)]], Field(max_length=MAX_CONTRIBUTORS)]
    base_versions: Annotated[list[Count], Field(max_length=MAX_CONTRIBUTORS)]
    proofs: Annotated[list[Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9+/]*={0,2}$",
                                                            max_length=4 * MAX_PROOF_BYTES // 3 + 4)]],
                      Field(max_length=MAX_CONTRIBUTORS)]
    scalars: Metrics = Field(default_factory=dict)
    groups: Annotated[list[ShortStr], Field(max_length=16)] = Field(default_factory=list)
    train_metrics: Metrics = Field(default_factory=dict, description="the region's sample-weighted training metrics")
    metrics_weight: float = Field(0.0, ge=0, allow_inf_nan=False)


# A 32-byte public key (Ed25519 or X25519) in standard base64, as in the federation file.
PublicKeyB64 = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9+/]{43}=$")]
ParticipantId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]  # federation.ID_PATTERN


class KeyEvent(Body):
    """Revoke a participant's key, or rotate the participant to a new signing key (and,
    optionally, a new encryption key). Published on ``ctl.keys`` in the control stream by
    the coordinator or an operator; every process replays all of them from the start of
    the stream and applies them in stream order (rules: ``fedbus.crypto.keyevents``).

    A rotation names the key it replaces (``old_key``): it applies only while that key is
    current, so a stale or replayed rotation cannot undo a later one. Key events belong to
    the job, not to a coordinator run: the header carries no run."""

    TYPE: ClassVar[str] = "keys"
    SENDER_ROLES: ClassVar[frozenset[str]] = frozenset({"coordinator", "operator"})
    MAX_BODY_BYTES: ClassVar[int | None] = 4 * KIB
    MAX_FIELDS_BYTES: ClassVar[int] = 4 * KIB
    action: Literal["revoke", "rotate"]
    participant: ParticipantId
    old_key: PublicKeyB64 | None = Field(None, description="rotate: the Ed25519 public key being replaced")
    new_key: PublicKeyB64 | None = Field(None, description="rotate: the new Ed25519 public key")
    new_encryption_key: PublicKeyB64 | None = Field(
        None, description="rotate: the participant's new X25519 encryption public key (optional)")
    reason: Annotated[str, StringConstraints(max_length=256)] = ""

    @model_validator(mode="after")
    def _keys_match_action(self) -> KeyEvent:
        if self.action == "rotate":
            if self.old_key is None or self.new_key is None:
                raise ValueError("a rotation names old_key and new_key")
            if self.old_key == self.new_key:
                raise ValueError("a rotation needs a new key different from the old one")
        elif self.old_key is not None or self.new_key is not None or self.new_encryption_key is not None:
            raise ValueError("a revocation carries no keys")
        return self


class ModelCommand(Body):
    """An operator's command to a running job's model registry, on ``ctl.models`` in the
    control stream (``fedbus models rollback``). ``rollback``: continue the job from
    committed ``version`` (the coordinator verifies that version's model against its signed
    manifest, abandons the open round and commits a new version whose parent is
    ``version``). The header carries the run the command is meant for; the coordinator
    refuses any other run's (wrong_run)."""

    TYPE: ClassVar[str] = "models"
    SENDER_ROLES: ClassVar[frozenset[str]] = frozenset({"coordinator", "operator"})
    MAX_BODY_BYTES: ClassVar[int | None] = 4 * KIB
    MAX_FIELDS_BYTES: ClassVar[int] = 4 * KIB
    action: Literal["rollback"]
    version: Count
    reason: Annotated[str, StringConstraints(max_length=256)] = ""


MESSAGE_TYPES: dict[str, type[Body]] = {
    cls.TYPE: cls for cls in (Heartbeat, RoundOpen, Update, RoundClose, EvalOpen, EvalReport, JobDone, Partial,
                              KeyEvent, ModelCommand)
}


def body_pieces(fields: Body, tensors: Mapping[str, Tensor] | None = None) -> list[bytes | memoryview]:
    """The body as consecutive pieces, tensor bytes as views of the tensors (no copy):
    streamed to the Object Store or a file as is, or joined by ``encode_body``."""
    if fields.HAS_TENSORS != (tensors is not None):
        raise ValueError(f"{fields.TYPE} {'needs' if fields.HAS_TENSORS else 'takes no'} tensors")
    packed = msgpack.packb(fields.model_dump(mode="json"), use_bin_type=True)
    parts: list[bytes | memoryview] = [_LEN.pack(len(packed)) + packed]
    if tensors is not None:
        parts.extend(tensor_pieces(tensors))
    return parts


def pieces_length(pieces) -> int:
    return sum(memoryview(p).nbytes for p in pieces)


def encode_body(fields: Body, tensors: Mapping[str, Tensor] | None = None) -> bytes:
    return b"".join(body_pieces(fields, tensors))  # one copy of the tensor bytes


def body_limit(cls: type[Body], job_max_bytes: int) -> int:
    """The largest body of this type a receiver with the job's limit accepts."""
    return job_max_bytes if cls.MAX_BODY_BYTES is None else min(cls.MAX_BODY_BYTES, job_max_bytes)


def unpack_fields(cls: type[Body], packed: bytes | bytearray | memoryview) -> dict[str, object]:
    """The msgpack fields section as a dict, nested at most a list or map of scalars deep.

    Walked by hand one level down so every count is checked on its claim before msgpack
    builds anything (msgpack preallocates claimed lengths, and a nest of 100k-element
    claims would cost hundreds of MB from a few KB); the scalars themselves are decoded
    in C. Too many metric keys are reported as invalid_metrics, like pydantic's checks.
    """
    buf = memoryview(packed)
    limits = dict(max_str_len=MAX_STR_BYTES, max_bin_len=MAX_STR_BYTES)
    try:
        top = container_header(buf, 0)
        if top is None or top[0] != "map":
            raise BodyError(f"{cls.TYPE}: fields are not a map")
        _, n, pos = top
        if n > len(cls.model_fields):  # extra fields are forbidden anyway
            raise BodyError(f"{cls.TYPE}: {n} fields")
        out: dict[str, object] = {}
        for _ in range(n):
            (key,), pos = unpack_values(buf, pos, 1, **limits)
            if not isinstance(key, str) or key not in cls.model_fields or key in out:
                # Unknown or repeated fields are refused before their values are built.
                raise BodyError(f"{cls.TYPE}: unexpected field {key!r:.40}")
            inner = container_header(buf, pos)
            if inner is None:
                (value,), pos = unpack_values(buf, pos, 1, **limits)
            else:
                kind, count, pos = inner
                limit = MAX_LIST_LEN if kind == "array" else MAX_MAP_LEN
                if count > limit:
                    reason = "invalid_metrics" if key in cls.METRIC_FIELDS else "malformed_body"
                    raise BodyError(f"{cls.TYPE}: {key[:64]} has {count} entries", reason)
                # max_array_len/max_map_len 0: an element may be an empty container at
                # most (pydantic rejects it); nothing nests deeper.
                items, pos = unpack_values(buf, pos, count if kind == "array" else 2 * count, **limits)
                value = items if kind == "array" else dict(zip(items[::2], items[1::2]))
            out[key] = value
    except BodyError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types
        raise BodyError(f"{cls.TYPE}: fields not msgpack within bounds: {str(exc)[:200]}") from None
    if pos != buf.nbytes:
        raise BodyError(f"{cls.TYPE}: trailing bytes after the fields")
    return out


def decode_body(cls: type[Body], body: bytes | bytearray | memoryview, *,
                max_tensors: int = DEFAULT_MAX_TENSORS, copy: bool = True) -> tuple[Body, dict[str, Tensor] | None]:
    """Fields and (for types that carry them) torch tensors. Raises BodyError with the
    rejection reason: oversize, invalid_metrics or malformed_body. ``copy=False``: the
    tensors are views over ``body`` when it is writable (``decode_tensors``)."""
    buf = memoryview(body)
    if buf.nbytes < _LEN.size:
        raise BodyError("body too short")
    (flen,) = _LEN.unpack(buf[: _LEN.size])
    end = _LEN.size + flen
    if end > buf.nbytes:
        raise BodyError("fields length beyond body")
    if flen > cls.MAX_FIELDS_BYTES:
        raise BodyError(f"{cls.TYPE}: fields section of {flen} bytes, limit {cls.MAX_FIELDS_BYTES}", "oversize")
    raw = unpack_fields(cls, buf[_LEN.size : end])
    try:
        fields = cls.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        err = errors[0]
        metric_errors = all(e["loc"] and e["loc"][0] in cls.METRIC_FIELDS for e in errors)
        raise BodyError(f"{cls.TYPE}: {'.'.join(map(str, err['loc']))[:200]}: {err['msg'][:200]}",
                        "invalid_metrics" if metric_errors else "malformed_body") from None
    tensors = None
    if cls.HAS_TENSORS:
        try:
            # The model is torch: numpy-kind entries would pass the name/dtype/shape
            # checks and then crash every aggregation rule.
            tensors = decode_tensors(buf[end:], max_tensors=max_tensors, allow_numpy=False, copy=copy)
        except CodecError as exc:
            raise BodyError(f"{cls.TYPE}: tensors: {exc}") from None
    elif end != buf.nbytes:
        raise BodyError(f"{cls.TYPE}: trailing bytes")
    return fields, tensors
