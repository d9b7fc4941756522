"""Message bodies: the pydantic models are the single source of truth for the wire.

A body on the wire is ``u32 fields_len | msgpack(fields) | tensor section``; the tensor
section (``fedbus.protocol.codec``) is present only for types that carry tensors.
Each model names its type and the roles allowed to send it; the verifier enforces both.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import ClassVar, Literal

import msgpack
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedbus.protocol.codec import CodecError, Tensor, decode_tensors, encode_tensors

_LEN = struct.Struct("<I")

Role = Literal["coordinator", "aggregator", "worker"]


class BodyError(ValueError):
    """The body does not decode into its declared type."""


class Body(BaseModel):
    """Base class of every message body."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    TYPE: ClassVar[str]
    SENDER_ROLES: ClassVar[frozenset[str]]
    HAS_TENSORS: ClassVar[bool] = False


class Heartbeat(Body):
    """A worker says it is alive and what it can offer (core NATS, not persisted)."""

    TYPE: ClassVar[str] = "heartbeat"
    SENDER_ROLES: ClassVar[frozenset[str]] = frozenset({"worker"})
    region: str = "default"
    num_samples: int = Field(ge=0)
    partition: int = Field(ge=0)
    status: Literal["idle", "training", "done"] = "idle"
    capabilities: dict[str, str] = Field(default_factory=dict)


class RoundOpen(Body):
    """The coordinator opens a round: cohort, deadline, settings and the model to start from."""

    TYPE: ClassVar[str] = "round.open"
    SENDER_ROLES: ClassVar[frozenset[str]] = frozenset({"coordinator"})
    HAS_TENSORS: ClassVar[bool] = True
    round: int = Field(ge=1)
    model_version: int = Field(ge=0)
    cohort: list[str]
    deadline_ms: int = Field(ge=0, description="absolute, ms since the Unix epoch")
    train: dict[str, float | int | str | bool] = Field(default_factory=dict, description="local training settings")
    evaluate: bool = Field(True, description="workers evaluate the received model on their held-out split")


class Update(Body):
    """A worker's locally trained weights for one round."""

    TYPE: ClassVar[str] = "update"
    SENDER_ROLES: ClassVar[frozenset[str]] = frozenset({"worker"})
    HAS_TENSORS: ClassVar[bool] = True
    round: int = Field(ge=1)
    base_version: int = Field(ge=0)
    num_samples: int = Field(ge=1)
    num_steps: int = Field(ge=0)
    train_metrics: dict[str, float] = Field(default_factory=dict)
    eval_metrics: dict[str, float] = Field(default_factory=dict, description="the received global model on the worker's held-out split")
    eval_samples: int = Field(0, ge=0)
    extra_scalars: dict[str, float] = Field(default_factory=dict, description="strategy inputs, e.g. FedNova's fednova_a")


class RoundClose(Body):
    """The coordinator closes a round and reports what it aggregated."""

    TYPE: ClassVar[str] = "round.close"
    SENDER_ROLES: ClassVar[frozenset[str]] = frozenset({"coordinator"})
    round: int = Field(ge=1)
    model_version: int = Field(ge=0)
    status: Literal["aggregated", "failed"]
    accepted: list[str]
    rejected: dict[str, int] = Field(default_factory=dict)
    seconds: float = Field(ge=0)
    metrics: dict[str, float] = Field(default_factory=dict)


class EvalOpen(Body):
    """The coordinator asks workers to evaluate the final model on their held-out split."""

    TYPE: ClassVar[str] = "eval.open"
    SENDER_ROLES: ClassVar[frozenset[str]] = frozenset({"coordinator"})
    HAS_TENSORS: ClassVar[bool] = True
    round: int = Field(ge=1)
    model_version: int = Field(ge=0)
    cohort: list[str]
    deadline_ms: int = Field(ge=0)


class EvalReport(Body):
    """A worker's evaluation of a model on its own held-out split."""

    TYPE: ClassVar[str] = "eval.report"
    SENDER_ROLES: ClassVar[frozenset[str]] = frozenset({"worker"})
    round: int = Field(ge=1)
    model_version: int = Field(ge=0)
    num_samples: int = Field(ge=0)
    metrics: dict[str, float]


class JobDone(Body):
    """The job is over; workers may exit."""

    TYPE: ClassVar[str] = "job.done"
    SENDER_ROLES: ClassVar[frozenset[str]] = frozenset({"coordinator"})
    rounds_completed: int = Field(ge=0)
    model_version: int = Field(ge=0)
    metrics: dict[str, float] = Field(default_factory=dict)
    reason: str = "completed"


MESSAGE_TYPES: dict[str, type[Body]] = {
    cls.TYPE: cls for cls in (Heartbeat, RoundOpen, Update, RoundClose, EvalOpen, EvalReport, JobDone)
}


def encode_body(fields: Body, tensors: Mapping[str, Tensor] | None = None) -> bytes:
    if fields.HAS_TENSORS != (tensors is not None):
        raise ValueError(f"{fields.TYPE} {'needs' if fields.HAS_TENSORS else 'takes no'} tensors")
    packed = msgpack.packb(fields.model_dump(mode="json"), use_bin_type=True)
    parts = [_LEN.pack(len(packed)), packed]
    if tensors is not None:
        parts.append(encode_tensors(tensors))
    return b"".join(parts)


def decode_body(cls: type[Body], body: bytes | bytearray | memoryview) -> tuple[Body, dict[str, Tensor] | None]:
    buf = memoryview(body)
    if buf.nbytes < _LEN.size:
        raise BodyError("body too short")
    (flen,) = _LEN.unpack(buf[: _LEN.size])
    end = _LEN.size + flen
    if end > buf.nbytes:
        raise BodyError("fields length beyond body")
    try:
        raw = msgpack.unpackb(buf[_LEN.size : end], raw=False, strict_map_key=True)
        fields = cls.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise BodyError(f"{cls.TYPE}: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    except Exception as exc:
        raise BodyError(f"{cls.TYPE}: fields not msgpack: {exc}") from None
    tensors = None
    if cls.HAS_TENSORS:
        try:
            tensors = decode_tensors(buf[end:])
        except CodecError as exc:
            raise BodyError(f"{cls.TYPE}: tensors: {exc}") from None
    elif end != buf.nbytes:
        raise BodyError(f"{cls.TYPE}: trailing bytes")
    return fields, tensors
