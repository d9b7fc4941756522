"""The receive path is bounded: what a signed but hostile body can cost, and which
rejection it gets. Each test here failed on the code before the limits (f8acf68)."""

from __future__ import annotations

import base64

import hashlib

import asyncio
import struct
import threading
import time
import tracemalloc

import msgpack
import numpy as np
import pytest
import torch

from fedbus.bus import BLOBS_BUCKET, Subjects
from fedbus.crypto.envelopes import REASONS, EnvelopeVerifier, Rejection, check_tensors, seal
from fedbus.crypto.federation import Federation, FederationFile
from fedbus.crypto.keys import Identity
from fedbus.messaging import OFFLOAD_MIN_BYTES, Messenger
from fedbus.protocol.codec import ALIGN, MAGIC, CodecError, TensorSpec, decode_tensors, encode_tensors, spec_of
from fedbus.protocol.envelope import BlobPointer, EnvelopeHeader, decode_header, encode_header, frame, split_frame
from fedbus.protocol.messages import (
    MESSAGE_TYPES,
    EvalOpen,
    EvalReport,
    KeyEvent,
    ModelCommand,
    Heartbeat,
    JobDone,
    Partial,
    RoundClose,
    RoundOpen,
    Update,
    encode_body,
)
from fedbus.protocol.secagg import SECAGG_TYPES

JOB = "job-1"
NOW = 1_700_000_000_000
MAX_AGE = 120_000
MAX_FUTURE = 30_000
JOB_MAX = 64 << 20  # the job's max_message_bytes: generous, so the per-type limits are what bites

COORD = Identity.generate("coord", "coordinator")
W1 = Identity.generate("w1", "worker")
W2 = Identity.generate("w2", "worker")
FED = Federation(FederationFile.model_validate({"participants": [p.participant_entry() for p in (COORD, W1, W2)]}))

STATE = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.zeros(3)}
SPEC = spec_of(STATE)


def verifier(**kw) -> EnvelopeVerifier:
    kw.setdefault("max_body_bytes", JOB_MAX)
    return EnvelopeVerifier(FED, JOB, max_age_ms=MAX_AGE, max_future_ms=MAX_FUTURE, **kw)


def packed_body(fields: dict, tensors: bytes | None = None) -> bytes:
    """A body with arbitrary fields (bypassing the models, as an attacker would)."""
    packed = msgpack.packb(fields, use_bin_type=True)
    return struct.pack("<I", len(packed)) + packed + (tensors or b"")


def update_fields(**over) -> dict:
    return {"round": 1, "base_version": 0, "num_samples": 10, "num_steps": 1, **over}


def wire_of(identity: Identity, msg_type: str, body: bytes, **kw) -> bytes:
    kw.setdefault("job", JOB)
    kw.setdefault("round", 1)
    kw.setdefault("ts_ms", NOW)
    return seal(identity, msg_type, body=body, **kw)[0]


def reason(v: EnvelopeVerifier, wire: bytes, *, body: bytes | None = None, **kw) -> str:
    try:
        opened = v.open(wire, now=NOW, **kw)
        v.accept_body(opened, opened.inline_body if body is None else body, now=NOW)
    except Rejection as rej:
        assert rej.reason in REASONS
        return rej.reason
    return "accepted"


def section(entries: list, data: bytes) -> bytes:
    h = msgpack.packb(entries, use_bin_type=True)
    start = (8 + len(h) + ALIGN - 1) // ALIGN * ALIGN
    return MAGIC + struct.pack("<I", len(h)) + h + b"\0" * (start - 8 - len(h)) + data


# ---- 1. per-type body limits, on the declared length -----------------------------------

def test_every_type_declares_its_body_limit():
    assert Heartbeat.MAX_BODY_BYTES == 4 * 1024
    assert KeyEvent.MAX_BODY_BYTES == 4 * 1024
    assert ModelCommand.MAX_BODY_BYTES == 4 * 1024
    for cls in (EvalReport, JobDone, RoundClose):
        assert cls.MAX_BODY_BYTES == 256 * 1024
    for cls in (Update, RoundOpen, EvalOpen, Partial):
        assert cls.MAX_BODY_BYTES is None  # the job's max_message_bytes
    assert set(MESSAGE_TYPES.values()) == {Heartbeat, EvalReport, JobDone, RoundClose, Update, RoundOpen, EvalOpen,
                                           Partial, KeyEvent, ModelCommand, *SECAGG_TYPES}
    for cls in SECAGG_TYPES:  # secure aggregation: bounded by the group's roster, or model-sized (the masked input)
        assert cls.MAX_BODY_BYTES is None if cls.HAS_TENSORS else cls.MAX_BODY_BYTES <= 1024 * 1024


def test_heartbeat_over_4kib_is_oversize():
    body = packed_body({"num_samples": 5, "partition": 0, "region": "x" * 5000})
    assert reason(verifier(), wire_of(W1, "heartbeat", body)) == "oversize"


def test_eval_report_over_256kib_is_oversize():
    body = packed_body({"round": 1, "model_version": 0, "num_samples": 1, "metrics": {}}) + b"\0" * (300 << 10)
    assert reason(verifier(), wire_of(W1, "eval.report", body)) == "oversize"


def test_oversize_is_decided_on_the_claimed_length_before_any_body_work(monkeypatch):
    """A claim check for a 60 MiB heartbeat is refused on the signed header alone."""
    import fedbus.crypto.envelopes as env

    monkeypatch.setattr(env, "decode_body", lambda *a, **k: pytest.fail("decoded"))
    monkeypatch.setattr(env, "header_digest_of", lambda *a, **k: pytest.fail("digested"))
    pointer = BlobPointer(bucket=BLOBS_BUCKET, name=f"{JOB}/w1/heartbeat/1/x", size=60 << 20, digest="SHA-256=x")
    hdr = EnvelopeHeader(type="heartbeat", job=JOB, round=1, sender="w1", nonce=b"n" * 16, ts=NOW,
                         digest=b"d" * 32, length=60 << 20, blob=pointer)
    hb = encode_header(hdr)
    assert reason(verifier(), frame(hb, W1.sign(hb), b"")) == "oversize"
    inline = hdr.model_copy(update={"blob": None, "length": 5000})
    hb = encode_header(inline)
    assert reason(verifier(), frame(hb, W1.sign(hb), b"\0" * 5000)) == "oversize"


# ---- fields section: size, msgpack bounds, nesting --------------------------------------

def test_fields_section_over_256kib_is_oversize():
    metrics = {f"m{i}": 0.5 for i in range(30_000)}  # ~330 KiB of fields
    body = packed_body(update_fields(train_metrics=metrics), encode_tensors(STATE))
    assert reason(verifier(), wire_of(W1, "update", body)) == "oversize"


def _peak_mb(fn) -> float:
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak / 2**20


@pytest.mark.parametrize("nested", [
    b"\x91" * 200_000 + b"\x80",  # [[[[...{}...]]]]: 200k deep
    b"\xdd" + struct.pack(">I", 100_000) + b"\x80" * 100_000,  # a list of 100k empty maps
    (b"\xdd" + struct.pack(">I", 100_000)) * 1000,  # nested claims of 100k elements each, never filled
    b"\xdf" + struct.pack(">I", 60_000) + b"".join(b"\xa1" + bytes([65 + i % 26]) + b"\x80" for i in range(60_000)),
    b"\xdd" + struct.pack(">I", 1 << 20) + b"\x80" * (1 << 20),  # 1 MiB of empty maps (64 MB as dicts)
], ids=["deep", "wide-empty-maps", "nested-claims", "map-of-maps", "wide-1MiB"])
def test_nested_containers_in_fields_cost_no_memory(nested):
    """The 32 MiB field of nested empty maps that cost 1.7 GB: any nesting past one level,
    and any claimed count past the bounds, is refused before msgpack builds it."""
    fields = msgpack.packb({"round": 1, "base_version": 0, "num_samples": 1, "num_steps": 0})
    # splice an extra field "train_metrics": <nested> into the map (5 entries instead of 4)
    packed = b"\x85" + fields[1:] + msgpack.packb("train_metrics") + nested
    body = struct.pack("<I", len(packed)) + packed + encode_tensors(STATE)
    wire = wire_of(W1, "update", body)
    v = verifier()
    got = []
    t0 = time.process_time()
    peak = _peak_mb(lambda: got.append(reason(v, wire)))
    assert got[0] in ("malformed_body", "oversize", "invalid_metrics")
    assert peak < 10, f"{peak:.1f} MB"
    assert time.process_time() - t0 < 1.0


def test_fields_nested_deeper_than_one_level_are_malformed():
    body = packed_body(update_fields(train_metrics={"loss": [0.5]}), encode_tensors(STATE))
    assert reason(verifier(), wire_of(W1, "update", body)) == "malformed_body"  # nested: refused by msgpack bounds
    body = packed_body(update_fields(num_steps=[[1]]), encode_tensors(STATE))
    assert reason(verifier(), wire_of(W1, "update", body)) == "malformed_body"
    body = packed_body(update_fields(num_steps={"a": {"b": 1}}), encode_tensors(STATE))
    assert reason(verifier(), wire_of(W1, "update", body)) == "malformed_body"


def test_unknown_and_repeated_fields_are_refused_before_their_values_are_built():
    body = packed_body(update_fields(junk=list(range(50_000))), encode_tensors(STATE))
    assert reason(verifier(), wire_of(W1, "update", body)) == "malformed_body"
    packed = msgpack.packb(update_fields())
    dup = b"\x85" + packed[1:] + msgpack.packb("round") + msgpack.packb(1)
    body = struct.pack("<I", len(dup)) + dup + encode_tensors(STATE)
    assert reason(verifier(), wire_of(W1, "update", body)) == "malformed_body"


def test_ext_types_and_long_strings_are_malformed():
    packed = msgpack.packb(update_fields(train_metrics={"x": msgpack.ExtType(5, b"abc")}))
    body = struct.pack("<I", len(packed)) + packed + encode_tensors(STATE)
    assert reason(verifier(), wire_of(W1, "update", body)) == "malformed_body"
    body = packed_body({"round": 1, "model_version": 0, "num_samples": 1, "metrics": {},
                        "x" * 10_000: 1})
    assert reason(verifier(), wire_of(W1, "eval.report", body)) == "malformed_body"


# ---- 2. tensor section: count, layout, names --------------------------------------------

def zero_size_flood(n: int) -> bytes:
    entries = [[f"t{i}", "t", "float32", [0], 0, 0] for i in range(n)]
    return section(entries, b"")


def test_zero_size_tensor_flood_is_rejected_cheaply():
    """The 39 MB body of zero-size tensors that took 25 s of CPU: refused on the count."""
    body = packed_body(update_fields(), zero_size_flood(200_000))
    wire = wire_of(W1, "update", body)
    t0 = time.process_time()
    assert reason(verifier(), wire) == "malformed_body"
    assert time.process_time() - t0 < 0.5
    # a caller that knows the model passes a much tighter bound
    body = packed_body(update_fields(), zero_size_flood(100))
    t0 = time.process_time()
    assert reason(verifier(max_tensors=8), wire_of(W1, "update", body)) == "malformed_body"
    assert time.process_time() - t0 < 0.05


def test_tensor_count_bound_is_checked_on_the_claim():
    data = section([], b"")
    # claim 2**32-1 entries in a 5-byte array header: refused before anything is built
    h = b"\xdd\xff\xff\xff\xff"
    claim = MAGIC + struct.pack("<I", len(h)) + h + b"\0" * (ALIGN - 8 - len(h))
    with pytest.raises(CodecError, match="at most"):
        decode_tensors(claim)
    with pytest.raises(CodecError):
        decode_tensors(encode_tensors(STATE), max_tensors=1)
    assert decode_tensors(encode_tensors(STATE), max_tensors=2).keys() == STATE.keys()
    assert decode_tensors(data, max_tensors=0) == {}


def test_tensor_header_length_is_bounded_by_the_count():
    entries = [["w", "t", "float32", [2], 0, 8]]
    h = msgpack.packb(entries) + b"\xc0" * 10_000  # padding inside the declared header
    data = MAGIC + struct.pack("<I", len(h)) + h
    data += b"\0" * ((-len(data)) % ALIGN) + b"\0" * 64
    with pytest.raises(CodecError, match="too long"):
        decode_tensors(data, max_tensors=1)


@pytest.mark.parametrize("entries,data_len", [
    ([["a", "t", "float32", [2], 0, 8], ["b", "t", "float32", [2], 0, 8]], 64),  # same bytes twice
    ([["a", "t", "float32", [16], 0, 64], ["b", "t", "float32", [2], 32, 8]], 128),  # overlaps a
    ([["a", "t", "float32", [2], 64, 8], ["b", "t", "float32", [2], 0, 8]], 128),  # out of order
    ([["a", "t", "float32", [2], 0, 8], ["b", "t", "float32", [2], 128, 8]], 192),  # a gap
    ([["a", "t", "float32", [2], 8, 8]], 64),  # not aligned / not at the start
    ([["a", "t", "float32", [2], 0, 8]], 128),  # trailing bytes no tensor accounts for
    ([], 64),  # data without any tensor
], ids=["aliased", "overlap", "out-of-order", "gap", "unaligned", "trailing", "no-tensors"])
def test_tensor_layout_must_be_exactly_the_encoders(entries, data_len):
    with pytest.raises(CodecError):
        decode_tensors(section(entries, b"\0" * data_len))
    body = packed_body(update_fields(), section(entries, b"\0" * data_len))
    assert reason(verifier(), wire_of(W1, "update", body)) == "malformed_body"


def test_the_encoders_layout_is_accepted_with_or_without_final_padding():
    sd = {"a": torch.ones(3), "z": torch.empty(0), "b": torch.ones(2, dtype=torch.float64)}
    enc = encode_tensors(sd)
    assert decode_tensors(enc).keys() == sd.keys()
    assert decode_tensors(enc[:-(ALIGN - 16)]).keys() == sd.keys()  # trimmed padding only


def test_tensor_names_are_bounded():
    with pytest.raises(CodecError):
        decode_tensors(encode_tensors({"n" * 600: torch.ones(1)}))
    assert decode_tensors(encode_tensors({"n" * 500: torch.ones(1)}))


# ---- 3. tensor kinds ------------------------------------------------------------------

def test_numpy_kind_tensors_in_a_body_are_malformed():
    tensors = encode_tensors({"w": STATE["w"].numpy(), "b": STATE["b"]})
    body = packed_body(update_fields(), tensors)
    assert reason(verifier(), wire_of(W1, "update", body)) == "malformed_body"
    ro = packed_body({"round": 1, "model_version": 0, "cohort": ["w1"], "deadline_ms": NOW},
                     encode_tensors({"w": STATE["w"], "b": STATE["b"].numpy()}))
    assert reason(verifier(), wire_of(COORD, "round.open", ro)) == "malformed_body"


def test_check_tensors_rejects_numpy_and_never_raises_anything_else():
    for bad in ({"w": STATE["w"].numpy(), "b": STATE["b"]},
                {"w": [1.0] * 6, "b": STATE["b"]},
                {"w": "junk", "b": STATE["b"]},
                {"w": torch.zeros(2, 3, dtype=torch.complex32), "b": STATE["b"]},
                [("w", 1)]):
        with pytest.raises(Rejection) as info:
            check_tensors(bad, SPEC)  # type: ignore[arg-type]
        assert info.value.reason == "tensor_mismatch"
    f8 = torch.tensor([1.0, float("nan")]).to(torch.float8_e4m3fn)
    with pytest.raises(Rejection) as info:
        check_tensors({"f": f8}, spec_of({"f": f8}))
    assert info.value.reason == "non_finite"


def test_check_tensors_rejects_a_dtype_other_than_the_models():
    with pytest.raises(Rejection, match="tensor_mismatch"):
        check_tensors({"w": STATE["w"].to(torch.bfloat16), "b": STATE["b"]}, SPEC)


def test_tensor_spec_carries_the_kind():
    assert spec_of({"a": np.zeros(2, np.float32)})["a"] == TensorSpec("float32", (2,), "n")
    assert spec_of({"a": torch.zeros(2)})["a"] == TensorSpec("float32", (2,))


# ---- 4. header/body agreement ---------------------------------------------------------

@pytest.mark.parametrize("msg_type,identity,fields,tensors", [
    ("update", W1, update_fields(round=2), True),
    ("eval.report", W1, {"round": 2, "model_version": 1, "num_samples": 1, "metrics": {}}, False),
    ("round.open", COORD, {"round": 2, "model_version": 1, "cohort": ["w1"], "deadline_ms": NOW}, True),
    ("round.close", COORD, {"round": 2, "model_version": 1, "status": "aggregated", "accepted": [], "seconds": 1.0},
     False),
    ("eval.open", COORD, {"round": 2, "model_version": 1, "cohort": ["w1"], "deadline_ms": NOW}, True),
])
def test_header_and_body_round_must_agree(msg_type, identity, fields, tensors):
    body = packed_body(fields, encode_tensors(STATE) if tensors else None)
    v = verifier()
    assert reason(v, wire_of(identity, msg_type, body, round=1)) == "header_mismatch"
    assert reason(v, wire_of(identity, msg_type, body, round=2)) == "accepted"


def test_header_mismatch_does_not_burn_the_nonce():
    v = verifier()
    nonce = b"n" * 16
    body = packed_body(update_fields(round=2), encode_tensors(STATE))
    assert reason(v, wire_of(W1, "update", body, round=1, nonce=nonce)) == "header_mismatch"
    assert len(v.replay_guard) == 0


# ---- 5. metrics and bounded claims ----------------------------------------------------

@pytest.mark.parametrize("metrics", [
    {"loss": float("nan")}, {"loss": float("inf")}, {"loss": float("-inf")},
    {f"m{i}": 1.0 for i in range(65)},  # too many keys
    {"k" * 65: 1.0},  # key too long
    {"loss": "low"},
    {f"m{i}": 1.0 for i in range(5000)},  # more than any msgpack map we build
])
def test_invalid_metrics_in_every_metrics_field(metrics):
    v = verifier()
    for field in ("train_metrics", "eval_metrics", "extra_scalars"):
        body = packed_body(update_fields(**{field: metrics}), encode_tensors(STATE))
        assert reason(v, wire_of(W1, "update", body)) == "invalid_metrics", field
    rep = packed_body({"round": 1, "model_version": 0, "num_samples": 1, "metrics": metrics})
    assert reason(v, wire_of(W1, "eval.report", rep)) == "invalid_metrics"
    rc = packed_body({"round": 1, "model_version": 1, "status": "aggregated", "accepted": [], "seconds": 1.0,
                      "metrics": metrics})
    assert reason(v, wire_of(COORD, "round.close", rc)) == "invalid_metrics"
    jd = packed_body({"rounds_completed": 1, "model_version": 1, "metrics": metrics})
    assert reason(v, wire_of(COORD, "job.done", jd)) == "invalid_metrics"


def test_64_finite_metrics_with_64_char_names_are_fine():
    metrics = {f"{i:02d}" + "k" * 62: float(i) for i in range(64)}
    body = packed_body(update_fields(train_metrics=metrics), encode_tensors(STATE))
    assert reason(verifier(), wire_of(W1, "update", body)) == "accepted"


def test_other_errors_stay_malformed_body_even_with_bad_metrics():
    body = packed_body(update_fields(num_samples=0, train_metrics={"loss": float("nan")}), encode_tensors(STATE))
    assert reason(verifier(), wire_of(W1, "update", body)) == "malformed_body"


@pytest.mark.parametrize("over", [
    {"num_samples": 2**63}, {"num_samples": 2**53}, {"num_steps": 2**63}, {"eval_samples": 2**60},
    {"base_version": 2**64 - 1}, {"round": 2**62},
])
def test_huge_integers_never_reach_float_math(over):
    body = packed_body(update_fields(**over), encode_tensors(STATE))
    assert reason(verifier(), wire_of(W1, "update", body, round=over.get("round", 1))) == "malformed_body"
    ok = packed_body(update_fields(num_samples=2**53 - 1), encode_tensors(STATE))
    assert reason(verifier(), wire_of(W1, "update", ok)) == "accepted"


def test_cohort_lists_strings_and_capabilities_are_bounded():
    v = verifier()
    big = packed_body({"round": 1, "model_version": 0, "cohort": ["w"] * 100_001, "deadline_ms": NOW},
                      encode_tensors(STATE))
    assert reason(v, wire_of(COORD, "round.open", big)) == "malformed_body"
    fine = packed_body({"round": 1, "model_version": 0, "cohort": [f"w{i}" for i in range(100_000)],
                        "deadline_ms": NOW}, encode_tensors(STATE))
    assert reason(v, wire_of(COORD, "round.open", fine)) == "accepted"
    hb = packed_body({"num_samples": 1, "partition": 0, "capabilities": {f"c{i}": "x" for i in range(17)}})
    assert reason(v, wire_of(W1, "heartbeat", hb)) == "malformed_body"
    hb = packed_body({"num_samples": 1, "partition": 0, "capabilities": {"task": "y" * 129}})
    assert reason(v, wire_of(W1, "heartbeat", hb)) == "malformed_body"
    hb = packed_body({"num_samples": 1, "partition": 0, "region": "r" * 65})
    assert reason(v, wire_of(W1, "heartbeat", hb)) == "malformed_body"
    rc = packed_body({"round": 1, "model_version": 1, "status": "aggregated", "accepted": [""], "seconds": 1.0})
    assert reason(v, wire_of(COORD, "round.close", rc)) == "malformed_body"  # empty worker id
    jd = packed_body({"rounds_completed": 1, "model_version": 1, "reason": "r" * 257})
    assert reason(v, wire_of(COORD, "job.done", jd)) == "malformed_body"
    ro = packed_body({"round": 1, "model_version": 0, "cohort": [], "deadline_ms": NOW,
                      "train": {"lr": float("inf")}}, encode_tensors(STATE))
    assert reason(v, wire_of(COORD, "round.open", ro)) == "malformed_body"


def test_honest_messages_of_every_type_still_pass():
    v = verifier()
    cases = [
        (W1, Heartbeat(num_samples=5, partition=0, capabilities={"task": "digits"}), None),
        (W1, Update(round=1, base_version=0, num_samples=2**40, num_steps=3, train_metrics={"loss": 0.1}), STATE),
        (W1, EvalReport(round=1, model_version=0, num_samples=3, metrics={"accuracy": 0.9}), None),
        (COORD, RoundOpen(round=1, model_version=0, cohort=["w1", "w2"], deadline_ms=NOW,
                          train={"lr": 0.1, "epochs": 3, "optimizer": "sgd", "nesterov": False}), STATE),
        (COORD, RoundClose(round=1, model_version=1, status="aggregated", accepted=["w1"],
                           rejected={"stale_timestamp": 2}, seconds=0.5, metrics={"loss": 0.2}), None),
        (COORD, EvalOpen(round=1, model_version=1, cohort=["w1"], deadline_ms=NOW), STATE),
        (COORD, JobDone(rounds_completed=1, model_version=1, metrics={"accuracy": 0.95}), None),
    ]
    for identity, fields, tensors in cases:
        assert reason(v, wire_of(identity, fields.TYPE, encode_body(fields, tensors))) == "accepted", fields.TYPE


# ---- 6. claim checks --------------------------------------------------------------------

def pointer_wire(identity: Identity, msg_type: str, body: bytes, *, bucket: str = BLOBS_BUCKET,
                 name: str | None = None) -> bytes:
    name = f"{JOB}/{identity.id}/{msg_type}/1/abc" if name is None else name
    digest = "SHA-256=" + base64.urlsafe_b64encode(hashlib.sha256(body).digest()).decode()
    pointer = BlobPointer(bucket=bucket, name=name, size=len(body), digest=digest)
    return wire_of(identity, msg_type, body, blob=pointer)


def test_pointer_only_for_types_that_carry_tensors():
    v = verifier(blob_bucket=BLOBS_BUCKET)
    hb = encode_body(Heartbeat(num_samples=1, partition=0))
    assert reason(v, pointer_wire(W1, "heartbeat", hb), body=hb) == "pointer_not_allowed"
    rep = encode_body(EvalReport(round=1, model_version=0, num_samples=1, metrics={}))
    assert reason(v, pointer_wire(W1, "eval.report", rep), body=rep) == "pointer_not_allowed"
    upd = encode_body(Update(round=1, base_version=0, num_samples=1, num_steps=0), STATE)
    assert reason(v, pointer_wire(W1, "update", upd), body=upd) == "accepted"


@pytest.mark.parametrize("bucket,name", [
    ("fedbus-models", f"{JOB}/w1/update/1/abc"),  # another bucket of ours
    ("not a bucket!", f"{JOB}/w1/update/1/abc"),  # a name the server would refuse
    (BLOBS_BUCKET, f"{JOB}/w2/update/1/abc"),  # another worker's object
    (BLOBS_BUCKET, "job-2/w1/update/1/abc"),  # another job's object
    (BLOBS_BUCKET, f"{JOB}/w1"),  # not under the sender's prefix
    (BLOBS_BUCKET, f"{JOB}/w1x/update"),
], ids=["models-bucket", "invalid-bucket", "other-sender", "other-job", "prefix-only", "prefix-lookalike"])
def test_pointer_outside_the_jobs_bucket_or_senders_namespace(bucket, name):
    upd = encode_body(Update(round=1, base_version=0, num_samples=1, num_steps=0), STATE)
    v = verifier(blob_bucket=BLOBS_BUCKET)
    assert reason(v, pointer_wire(W1, "update", upd, bucket=bucket, name=name), body=upd) == "pointer_not_allowed"


def test_messenger_refuses_pointers_before_any_fetch(monkeypatch):
    """No broker needed: every one of these is refused before the blob store is asked."""
    messenger = Messenger(None, None, W2, Subjects(JOB), inline_max_bytes=1024)
    fetched = []

    async def record(*args, **kwargs):
        fetched.append(args)
        raise AssertionError("fetched")

    monkeypatch.setattr(messenger.blobs, "get", record)
    upd = encode_body(Update(round=1, base_version=0, num_samples=1, num_steps=0), STATE)
    hb = encode_body(Heartbeat(num_samples=1, partition=0))
    any_bucket = verifier()  # even a verifier that does not know the bucket
    cases = [pointer_wire(W1, "update", upd, bucket="elsewhere"),
             pointer_wire(W1, "update", upd, name=f"{JOB}/w2/update/1/x"),
             pointer_wire(W1, "heartbeat", hb)]
    for wire in cases:
        with pytest.raises(Rejection) as info:
            asyncio.run(messenger.receive(any_bucket, wire, stored_ms=NOW))
        assert info.value.reason == "pointer_not_allowed"
    # oversized claim for the type: refused on the header, before the store is asked
    v = verifier(max_body_bytes=1 << 20)
    hdr = decode_header(split_frame(pointer_wire(W1, "update", upd))[0])
    big = hdr.model_copy(update={"length": 2 << 20, "blob": hdr.blob.model_copy(update={"size": 2 << 20})})
    hb_bytes = encode_header(big)
    with pytest.raises(Rejection) as info:
        asyncio.run(messenger.receive(v, frame(hb_bytes, W1.sign(hb_bytes), b""), stored_ms=NOW))
    assert info.value.reason == "oversize"
    assert fetched == []


def test_messenger_maps_every_fetch_failure_to_blob_unavailable(monkeypatch):
    messenger = Messenger(None, None, W2, Subjects(JOB), inline_max_bytes=1024)

    async def broken(*args, **kwargs):
        raise RuntimeError("some client error")

    monkeypatch.setattr(messenger.blobs, "get", broken)
    upd = encode_body(Update(round=1, base_version=0, num_samples=1, num_steps=0), STATE)
    with pytest.raises(Rejection) as info:
        asyncio.run(messenger.receive(verifier(), pointer_wire(W1, "update", upd), stored_ms=NOW))
    assert info.value.reason == "blob_unavailable"


# ---- 7. freshness against the stream's stored time, and decoding off the loop -----------

def test_freshness_is_judged_against_the_stored_time():
    v = verifier()
    body = encode_body(Update(round=1, base_version=0, num_samples=1, num_steps=0), STATE)
    late = NOW + 10 * MAX_AGE  # the coordinator comes back long after the worker sent it
    wire = wire_of(W1, "update", body)
    assert reason(v, wire, stored_ms=None) == "accepted"  # at NOW
    v = verifier()
    opened = v.open(wire, now=late, stored_ms=NOW + 1000)
    v.accept_body(opened, opened.inline_body, now=late)
    # the nonce is remembered with the real clock: it is a replay afterwards
    with pytest.raises(Rejection, match="replayed_nonce"):
        v.open(wire, now=late + 1, stored_ms=NOW + 1000)
    with pytest.raises(Rejection, match="stale_timestamp"):
        verifier().open(wire, now=late)  # without the stored time it is stale
    with pytest.raises(Rejection, match="stale_timestamp"):
        verifier().open(wire, now=late, stored_ms=NOW + MAX_AGE + 1)
    with pytest.raises(Rejection, match="future_timestamp"):
        verifier().open(wire, now=NOW, stored_ms=NOW - MAX_FUTURE - 1)


def test_receive_offloads_large_bodies_and_remembers_on_the_loop(monkeypatch):
    messenger = Messenger(None, None, W2, Subjects(JOB), inline_max_bytes=64 << 20)
    v = verifier()
    big = {"w": torch.randn(512, 512), "b": torch.zeros(3)}  # 1 MiB
    wire = wire_of(W1, "update", encode_body(Update(round=1, base_version=0, num_samples=1, num_steps=0), big))
    assert len(wire) > OFFLOAD_MIN_BYTES
    threads = {}
    decode, remember = v.decode_body, v.remember

    def spy_decode(*a, **k):
        threads["decode"] = threading.get_ident()
        return decode(*a, **k)

    def spy_remember(*a, **k):
        threads["remember"] = threading.get_ident()
        return remember(*a, **k)

    monkeypatch.setattr(v, "decode_body", spy_decode)
    monkeypatch.setattr(v, "remember", spy_remember)

    async def run():
        got = await messenger.receive(v, wire, offload=True, stored_ms=NOW)
        threads["loop"] = threading.get_ident()
        return got

    got = asyncio.run(run())
    assert torch.equal(got.tensors["w"], big["w"])
    assert threads["decode"] != threads["loop"] and threads["remember"] == threads["loop"]
    with pytest.raises(Rejection, match="replayed_nonce"):
        asyncio.run(messenger.receive(v, wire, offload=True, stored_ms=NOW))


def test_two_copies_decoded_concurrently_are_accepted_once():
    messenger = Messenger(None, None, W2, Subjects(JOB), inline_max_bytes=64 << 20)
    v = verifier()
    big = {"w": torch.randn(512, 512), "b": torch.zeros(3)}
    wire = wire_of(W1, "update", encode_body(Update(round=1, base_version=0, num_samples=1, num_steps=0), big))

    async def run():
        return await asyncio.gather(*(messenger.receive(v, wire, offload=True, stored_ms=NOW) for _ in range(2)),
                                    return_exceptions=True)

    results = asyncio.run(run())
    assert sum(isinstance(r, Rejection) and r.reason == "replayed_nonce" for r in results) == 1
    assert sum(not isinstance(r, Exception) for r in results) == 1


def test_senders_clean_their_metrics_with_finite_metrics():
    from fedbus.protocol.messages import finite_metrics

    raw = {"loss": float("nan"), "acc": 0.9, "k" * 65: 1.0, **{f"m{i}": float(i) for i in range(100)}}
    clean = finite_metrics(raw)
    assert "loss" not in clean and clean["acc"] == 0.9 and len(clean) == 64
    update = Update(round=1, base_version=0, num_samples=1, num_steps=0, train_metrics=clean)
    assert reason(verifier(), wire_of(W1, "update", encode_body(update, STATE))) == "accepted"
    with pytest.raises(ValueError):
        Update(round=1, base_version=0, num_samples=1, num_steps=0, train_metrics={"loss": float("nan")})
