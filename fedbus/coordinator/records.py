"""JobRecord: the durable state of a job, as committed after every transition.

It is what a resumed coordinator continues from: which round is open (and with which
cohort, so held updates are accepted after a crash), which model version is current, how
many rounds completed, and whether the job is done. The run id and the model's location
are added by the store (``jobstate``); the machine never sees storage.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from nacl.exceptions import BadSignatureError

from fedbus.crypto.keys import b64, unb64

PHASES = ("waiting", "round_open", "evaluating", "done", "async")


@dataclass(frozen=True)
class JobRecord:
    round: int
    phase: str  # one of PHASES
    model_version: int
    rounds_completed: int
    failed_in_a_row: int = 0
    cohort: tuple[str, ...] = ()
    declared: dict[str, int] = field(default_factory=dict)  # the cohort's declared sample counts
    accepted_total: int = 0
    reason: str = ""  # why the job finished, when phase == "done"
    last_close: dict | None = None  # the round this commit closed, as summary.json lists it
    started_ms: int = 0  # when the job's first incarnation started (elapsed_s of every row counts from it)
    # late_updates: next_round: {"round", "eligible" workers, "base_version"} whose late updates are still welcome
    late: dict | None = None
    # mode: async: outstanding assignments, updates accepted but not yet committed, recent folds (versions.py)
    async_state: dict | None = None
    # The version model_version was built on when it is not model_version - 1: the version a
    # rollback restored (fedbus models rollback). None: the usual parent (or none for v0).
    parent_version: int | None = None

    def as_dict(self) -> dict:
        d = asdict(self)
        d["cohort"] = list(self.cohort)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> JobRecord:
        if d.get("phase") not in PHASES:
            raise ValueError(f"unknown phase {d.get('phase')!r}")
        return cls(round=int(d["round"]), phase=d["phase"], model_version=int(d["model_version"]),
                   rounds_completed=int(d["rounds_completed"]), failed_in_a_row=int(d.get("failed_in_a_row", 0)),
                   cohort=tuple(d.get("cohort", ())), declared={str(k): int(v) for k, v in d.get("declared", {}).items()},
                   accepted_total=int(d.get("accepted_total", 0)), reason=str(d.get("reason", "")),
                   last_close=d.get("last_close") if isinstance(d.get("last_close"), dict) else None,
                   started_ms=int(d.get("started_ms", 0)),
                   late=d.get("late") if isinstance(d.get("late"), dict) else None,
                   async_state=d.get("async_state") if isinstance(d.get("async_state"), dict) else None,
                   parent_version=int(d["parent_version"]) if d.get("parent_version") is not None else None)


# The largest signed KV value a reader parses: a cohort of 100k ids and the async bookkeeping
# fit well inside; anything bigger was not written by a coordinator.
MAX_SIGNED_RECORD_BYTES = 8 * 1024 * 1024


class SignedRecordError(ValueError):
    """A KV value that is not a well-formed document signed by the expected key."""


def _canonical(doc: dict) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def sign_record(doc: dict, sign: Callable[[bytes], bytes]) -> bytes:
    """The KV value of ``doc``: the document and a signature over its canonical JSON."""
    return json.dumps({"record": doc, "signature": b64(sign(_canonical(doc)))}).encode()


def open_signed_record(raw: bytes, verify: Callable[[bytes, bytes], object]) -> dict:
    """The document of a value ``sign_record`` wrote; ``verify(body, signature)`` raises on a bad
    signature (nacl's VerifyKey.verify). Size is checked before anything is parsed."""
    if len(raw) > MAX_SIGNED_RECORD_BYTES:
        raise SignedRecordError(f"{len(raw)} bytes, limit {MAX_SIGNED_RECORD_BYTES}")
    try:
        outer = json.loads(raw)
        doc = outer["record"]
        if not isinstance(doc, dict):
            raise TypeError("record is not an object")
        verify(_canonical(doc), unb64(outer["signature"]))
    except (ValueError, KeyError, TypeError, BadSignatureError) as exc:
        raise SignedRecordError(repr(exc)) from None
    return doc
