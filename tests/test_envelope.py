"""Sealing and opening envelopes: every rejection reason, the order of the checks, and the
replay guard (a tampered copy must never burn the nonce of the genuine message)."""

from __future__ import annotations

import base64
import hashlib

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from fedbus.crypto.envelopes import REASONS, EnvelopeVerifier, Rejection, check_tensors, seal
from fedbus.crypto.federation import Federation, FederationFile
from fedbus.crypto.keys import Identity
from fedbus.crypto.replay import ReplayGuard
from fedbus.protocol.codec import TensorSpec, encode_tensors, spec_of
from fedbus.protocol.envelope import (
    MAGIC,
    PREFIX_LEN,
    SIGNATURE_LEN,
    BlobPointer,
    EnvelopeHeader,
    body_digest,
    decode_header,
    encode_header,
    frame,
    split_frame,
)
from fedbus.protocol.messages import Heartbeat, RoundOpen, Update, encode_body

JOB = "job-1"
NOW = 1_700_000_000_000
MAX_AGE = 120_000
MAX_FUTURE = 30_000
MAX_BODY = 64 * 1024

COORD = Identity.generate("coord", "coordinator")
W1 = Identity.generate("w1", "worker", "eu")
W2 = Identity.generate("w2", "worker", "us")
AGG = Identity.generate("agg-eu", "aggregator", "eu")
GONE = Identity.generate("gone", "worker")
OUTSIDER = Identity.generate("mallory", "worker")
IMPOSTOR = Identity("w1", "worker", "eu", SigningKey.generate())  # w1's id, someone else's key


def federation() -> Federation:
    entries = [p.participant_entry() for p in (COORD, W1, W2, AGG)]
    entries.append(dict(GONE.participant_entry(), revoked=True))
    return Federation(FederationFile.model_validate({"participants": entries}))


@pytest.fixture
def verifier() -> EnvelopeVerifier:
    return EnvelopeVerifier(federation(), JOB, max_age_ms=MAX_AGE, max_future_ms=MAX_FUTURE, max_body_bytes=MAX_BODY)


STATE = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.zeros(3)}


def update_body(round_: int = 1, state=None) -> bytes:
    fields = Update(round=round_, base_version=round_ - 1, num_samples=10, num_steps=5, train_metrics={"loss": 0.5})
    return encode_body(fields, STATE if state is None else state)


def sealed(identity: Identity = W1, msg_type: str = "update", body: bytes | None = None, **kw) -> bytes:
    kw.setdefault("job", JOB)
    kw.setdefault("round", 1)
    kw.setdefault("ts_ms", NOW)
    wire, _ = seal(identity, msg_type, body=update_body() if body is None else body, **kw)
    return wire


def accept(v: EnvelopeVerifier, wire: bytes, *, now: int = NOW, body: bytes | None = None, **kw):
    opened = v.open(wire, now=now, **kw)
    return opened, v.accept_body(opened, opened.inline_body if body is None else body, now=now)


def rejected(v: EnvelopeVerifier, wire: bytes, **kw) -> str:
    with pytest.raises(Rejection) as info:
        accept(v, wire, **kw)
    assert info.value.reason in REASONS
    return info.value.reason


def resign(identity: Identity, header: EnvelopeHeader, body: bytes) -> bytes:
    """Frame an arbitrary header, validly signed by ``identity``."""
    hb = encode_header(header)
    return frame(hb, identity.sign(hb), body)


def header_of(wire: bytes) -> EnvelopeHeader:
    return decode_header(split_frame(wire)[0])


# ---- the happy path ------------------------------------------------------------------

def test_seal_open_round_trip(verifier):
    body = update_body()
    wire, header = seal(W1, "update", job=JOB, round=1, body=body, ts_ms=NOW, trace="00-" + "a" * 32 + "-" + "b" * 16 + "-01")
    opened, (fields, tensors) = accept(verifier, wire)
    assert opened.header == header
    assert opened.sender.id == "w1" and opened.sender.region == "eu"
    assert opened.body_cls is Update
    assert bytes(opened.inline_body) == body
    assert header.digest == body_digest(body) and header.length == len(body)
    assert header.trace.startswith("00-")
    assert isinstance(fields, Update) and fields.num_samples == 10 and fields.train_metrics == {"loss": 0.5}
    assert set(tensors) == set(STATE)
    for k, v in STATE.items():
        assert torch.equal(tensors[k], v)
    check_tensors(tensors, spec_of(STATE))


def test_every_role_can_send_its_own_types(verifier):
    hb = encode_body(Heartbeat(num_samples=5, partition=0))
    _, (fields, tensors) = accept(verifier, sealed(W2, "heartbeat", body=hb))
    assert isinstance(fields, Heartbeat) and tensors is None
    ro = encode_body(RoundOpen(round=1, model_version=0, cohort=["w1"], deadline_ms=NOW + 1), STATE)
    _, (fields, _) = accept(verifier, sealed(COORD, "round.open", body=ro))
    assert fields.cohort == ["w1"]


def test_nonces_are_random_and_headers_deterministic():
    body = update_body()
    (a, ha), (b, hb) = (seal(W1, "update", job=JOB, round=1, body=body, ts_ms=NOW) for _ in range(2))
    assert ha.nonce != hb.nonce and len(ha.nonce) >= 16
    h2 = encode_header(EnvelopeHeader.model_validate(ha.model_dump()))
    assert h2 == encode_header(ha)


def object_digest(body: bytes) -> str:
    return "SHA-256=" + base64.urlsafe_b64encode(hashlib.sha256(body).digest()).decode()


def test_blob_body_travels_out_of_line(verifier):
    body = update_body()
    pointer = BlobPointer(bucket="fedbus-blobs", name="job-1/w1/1", size=len(body), digest=object_digest(body))
    wire, header = seal(W1, "update", job=JOB, round=1, body=body, ts_ms=NOW, blob=pointer)
    assert len(split_frame(wire)[2]) == 0
    opened = verifier.open(wire, now=NOW)
    assert opened.header.blob == pointer
    fields, _ = verifier.accept_body(opened, body, now=NOW)
    assert fields.num_samples == 10


def test_blob_body_from_the_store_is_digest_checked(verifier):
    body = update_body()
    pointer = BlobPointer(bucket="fedbus-blobs", name="job-1/w1/x", size=len(body), digest=object_digest(body))
    wire, header = seal(W1, "update", job=JOB, round=1, body=body, ts_ms=NOW, blob=pointer)
    # One digest for both: the header signs the SHA-256 the claim check names.
    assert header.digest == hashlib.sha256(body).digest()
    assert seal(W1, "update", job=JOB, round=1, body=None, ts_ms=NOW, blob=pointer)[1].digest == header.digest
    other = pointer.model_copy(update={"digest": object_digest(body + b"x")})
    assert rejected(verifier, seal(W1, "update", job=JOB, round=1, body=body, ts_ms=NOW, blob=other)[0]) \
        == "digest_mismatch"  # a header digest that is not its pointer's is refused on the header
    forged = bytearray(body)
    forged[-1] ^= 1
    assert rejected(verifier, wire, body=bytes(forged)) == "digest_mismatch"
    assert rejected(verifier, wire, body=body + b"\0") == "digest_mismatch"
    accept(verifier, wire, body=body)  # the failed attempts did not burn the nonce


# ---- one test per rejection reason the verifier produces -----------------------------

def test_oversize_on_the_wire():
    v = EnvelopeVerifier(federation(), JOB, max_age_ms=MAX_AGE, max_future_ms=MAX_FUTURE, max_body_bytes=1000)
    big = update_body(state={"w": torch.zeros(20_000, dtype=torch.uint8)})
    assert rejected(v, sealed(body=big)) == "oversize"
    # Nothing is decoded: even garbage of that size is "oversize", not "malformed_header".
    assert rejected(v, b"\0" * 20_000) == "oversize"


def test_oversize_declared_body():
    v = EnvelopeVerifier(federation(), JOB, max_age_ms=MAX_AGE, max_future_ms=MAX_FUTURE, max_body_bytes=1000)
    body = update_body(state={"w": torch.zeros(3000, dtype=torch.uint8)})  # < 1000 + 8192 on the wire
    assert rejected(v, sealed(body=body)) == "oversize"
    pointer = BlobPointer(bucket="b", name="n", size=10**9, digest="d")
    wire, _ = seal(W1, "update", job=JOB, round=1, body=b"", ts_ms=NOW, blob=pointer)
    hdr = header_of(wire).model_copy(update={"length": 10**9})
    assert rejected(v, resign(W1, hdr, b"")) == "oversize"


@pytest.mark.parametrize("wire", [
    b"",
    b"FBE1",
    b"XXXX" + b"\0" * 100,
    MAGIC + b"\xff\xff" + b"\0" * 100,  # header longer than allowed
    MAGIC + b"\x10\x00" + b"\0" * 20,  # truncated before the signature ends
    frame(b"\xc1", b"\0" * SIGNATURE_LEN, b""),  # not msgpack
    frame(msgpack.packb([1, 2]), b"\0" * SIGNATURE_LEN, b""),  # not a map
    frame(msgpack.packb({"type": "update"}), b"\0" * SIGNATURE_LEN, b""),  # fields missing
    frame(msgpack.packb({1: 2}), b"\0" * SIGNATURE_LEN, b""),  # int keys
], ids=["empty", "magic-only", "bad-magic", "header-too-long", "truncated", "not-msgpack", "not-map",
        "missing-fields", "int-keys"])
def test_malformed_header(verifier, wire):
    assert rejected(verifier, wire) == "malformed_header"


def test_malformed_header_extra_or_invalid_fields(verifier):
    good = header_of(sealed()).model_dump()
    for fields in (dict(good, extra=1), dict(good, nonce=b"short"), dict(good, digest=b"\0" * 31),
                   dict(good, round=-1), dict(good, ts="now")):
        hb = msgpack.packb(fields, use_bin_type=True)
        assert rejected(verifier, frame(hb, W1.sign(hb), update_body())) == "malformed_header", fields


def test_malformed_header_inconsistent_blob_pointer(verifier):
    body = update_body()
    hdr = header_of(sealed(body=body))
    wrong_size = hdr.model_copy(update={"blob": BlobPointer(bucket="b", name="n", size=len(body) + 1, digest="d")})
    assert rejected(verifier, resign(W1, wrong_size, b"")) == "malformed_header"
    inline_too = hdr.model_copy(update={"blob": BlobPointer(bucket="b", name="n", size=len(body), digest="d")})
    assert rejected(verifier, resign(W1, inline_too, body)) == "malformed_header"


def test_unknown_type(verifier):
    assert rejected(verifier, sealed(msg_type="update.v2")) == "unknown_type"


def test_unknown_sender(verifier):
    assert rejected(verifier, sealed(OUTSIDER)) == "unknown_sender"


def test_revoked_sender(verifier):
    assert rejected(verifier, sealed(GONE)) == "revoked_sender"


@pytest.mark.parametrize("identity,msg_type", [
    (W1, "round.open"), (W1, "job.done"), (COORD, "update"), (AGG, "update"), (COORD, "heartbeat"),
])
def test_role_not_allowed(verifier, identity, msg_type):
    assert rejected(verifier, sealed(identity, msg_type)) == "role_not_allowed"


def test_subject_mismatch(verifier):
    wire = sealed(W1)
    assert rejected(verifier, wire, sender_token="w2") == "subject_mismatch"
    accept(verifier, wire, sender_token="w1")


def test_bad_signature_other_key(verifier):
    assert rejected(verifier, sealed(IMPOSTOR)) == "bad_signature"


def test_bad_signature_flipped_header_byte(verifier):
    wire = bytearray(sealed())
    hb, _, _ = split_frame(bytes(wire))
    nonce = header_of(bytes(wire)).nonce
    at = bytes(wire).index(nonce)  # flip a byte inside the nonce: still a valid header
    assert PREFIX_LEN <= at < PREFIX_LEN + len(hb)
    wire[at] ^= 0x01
    assert rejected(verifier, bytes(wire)) == "bad_signature"


def test_bad_signature_flipped_signature_byte(verifier):
    wire = bytearray(sealed())
    hlen = len(split_frame(bytes(wire))[0])
    wire[PREFIX_LEN + hlen + 5] ^= 0x80
    assert rejected(verifier, bytes(wire)) == "bad_signature"


def test_bad_signature_header_swapped_between_messages(verifier):
    a, b = sealed(round=1), sealed(round=2)
    ha, sa, body = split_frame(a)
    hb, sb, _ = split_frame(b)
    assert rejected(verifier, frame(bytes(ha), sb, bytes(body))) == "bad_signature"


def test_stale_timestamp(verifier):
    assert rejected(verifier, sealed(ts_ms=NOW - MAX_AGE - 1)) == "stale_timestamp"
    accept(verifier, sealed(ts_ms=NOW - MAX_AGE))  # boundary: exactly max_age old is fresh


def test_future_timestamp(verifier):
    assert rejected(verifier, sealed(ts_ms=NOW + MAX_FUTURE + 1)) == "future_timestamp"
    accept(verifier, sealed(ts_ms=NOW + MAX_FUTURE))  # boundary


def test_replayed_nonce_second_accept(verifier):
    wire = sealed()
    accept(verifier, wire)
    assert rejected(verifier, wire) == "replayed_nonce"
    assert rejected(verifier, wire, now=NOW + 1000) == "replayed_nonce"


def test_replayed_nonce_two_copies_in_flight(verifier):
    """Both copies pass open() before either is accepted: the second accept_body refuses."""
    wire = sealed()
    first, second = verifier.open(wire, now=NOW), verifier.open(wire, now=NOW)
    verifier.accept_body(first, first.inline_body, now=NOW)
    with pytest.raises(Rejection) as info:
        verifier.accept_body(second, second.inline_body, now=NOW)
    assert info.value.reason == "replayed_nonce"


def test_replayed_nonce_in_a_new_message(verifier):
    wire = sealed()
    nonce = header_of(wire).nonce
    accept(verifier, wire)
    again = sealed(round=1, nonce=nonce, body=update_body(state={"w": STATE["w"] + 1, "b": STATE["b"]}))
    assert rejected(verifier, again) == "replayed_nonce"


def test_wrong_job(verifier):
    assert rejected(verifier, sealed(job="job-2")) == "wrong_job"


def test_wrong_round(verifier):
    wire = sealed(round=3, body=update_body(3))
    assert rejected(verifier, wire, round_ok=lambda h: h.round == 2) == "wrong_round"
    accept(verifier, wire, round_ok=lambda h: h.round == 3)  # the rejection burned nothing


def test_digest_mismatch_flipped_body_byte(verifier):
    wire = bytearray(sealed())
    wire[-1] ^= 0x01
    assert rejected(verifier, bytes(wire)) == "digest_mismatch"


def test_digest_mismatch_inline_length(verifier):
    wire = sealed()
    assert rejected(verifier, wire + b"\0") == "digest_mismatch"
    assert rejected(verifier, wire[:-1]) == "digest_mismatch"


@pytest.mark.parametrize("body", [
    b"garbage",
    b"",
    b"\x03\x00\x00\x00\xc1\xc1\xc1",  # fields are not msgpack
    encode_body(Heartbeat(num_samples=1, partition=0)),  # a heartbeat is not an update
    update_body()[:-100],  # tensor section cut inside the tensor bytes
    encode_body(Update(round=1, base_version=0, num_samples=1, num_steps=0), {})[:-60],  # section cut short
], ids=["garbage", "empty", "not-msgpack", "other-type", "truncated-tensors", "tensor-header-cut"])
def test_malformed_body(verifier, body):
    """A valid signature over a body that does not decode into the declared type."""
    assert rejected(verifier, sealed(body=body)) == "malformed_body"


def test_malformed_body_trailing_bytes(verifier):
    body = encode_body(Heartbeat(num_samples=1, partition=0)) + b"\0"
    assert rejected(verifier, sealed(W1, "heartbeat", body=body)) == "malformed_body"


@pytest.mark.parametrize("fields", [
    {"round": 1, "base_version": 0, "num_samples": 0, "num_steps": 0},  # num_samples >= 1
    {"round": 1, "base_version": 0, "num_samples": 3, "num_steps": 0, "secret": 1},  # extra field
    {"round": 1, "base_version": 0, "num_steps": 0},  # missing field
    [1, 0, 3, 0],
])
def test_malformed_body_invalid_fields(verifier, fields):
    packed = msgpack.packb(fields)
    body = len(packed).to_bytes(4, "little") + packed + encode_tensors(STATE)
    assert rejected(verifier, sealed(body=body)) == "malformed_body"


# ---- tensor checks ---------------------------------------------------------------------

EXPECTED = spec_of(STATE)


@pytest.mark.parametrize("tensors", [
    {"w": STATE["w"]},  # missing
    {**STATE, "extra": torch.zeros(1)},  # unexpected
    {"w": STATE["w"], "B": STATE["b"]},  # renamed
    {"w": STATE["w"].double(), "b": STATE["b"]},  # dtype
    {"w": STATE["w"].to(torch.float16), "b": STATE["b"]},
    {"w": STATE["w"].t(), "b": STATE["b"]},  # shape
    {"w": STATE["w"].reshape(-1), "b": STATE["b"]},
    {"w": STATE["w"], "b": STATE["b"][None]},
    # Same names, dtypes and shapes, but numpy: the model is torch and every aggregation
    # rule would crash on these, so the kind is part of the match.
    {"w": STATE["w"].numpy(), "b": STATE["b"].numpy()},
    {"w": STATE["w"], "b": STATE["b"].numpy()},
], ids=["missing", "extra", "renamed", "float64", "float16", "transposed", "flattened", "unsqueezed", "numpy",
        "one-numpy"])
def test_tensor_mismatch(tensors):
    with pytest.raises(Rejection) as info:
        check_tensors(tensors, EXPECTED)
    assert info.value.reason == "tensor_mismatch"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.complex64])
def test_non_finite(bad, dtype):
    w = torch.zeros(2, 3, dtype=dtype)
    w[1, 2] = bad
    expected = {"w": TensorSpec(spec_of({"w": w})["w"].dtype, (2, 3))}
    with pytest.raises(Rejection) as info:
        check_tensors({"w": w}, expected)
    assert info.value.reason == "non_finite" and "w" in str(info.value)
    arr = np.zeros(3, dtype=np.float32)
    arr[0] = bad
    with pytest.raises(Rejection, match="non_finite"):
        check_tensors({"a": arr}, {"a": TensorSpec("float32", (3,), "n")})


def test_integer_and_bool_tensors_are_always_finite():
    t = {"n": torch.tensor([2**62], dtype=torch.int64), "m": torch.tensor([True])}
    check_tensors(t, spec_of(t))


def test_mismatch_is_reported_before_non_finite():
    with pytest.raises(Rejection) as info:
        check_tensors({"w": torch.full((2, 3), float("nan"))}, EXPECTED)
    assert info.value.reason == "tensor_mismatch"


# ---- the order of the checks ---------------------------------------------------------

def test_unknown_sender_with_bad_signature_is_unknown_sender(verifier):
    hdr = header_of(sealed(OUTSIDER))
    assert rejected(verifier, resign(W1, hdr, update_body())) == "unknown_sender"


def test_revoked_sender_with_bad_signature_is_revoked(verifier):
    assert rejected(verifier, resign(W1, header_of(sealed(GONE)), update_body())) == "revoked_sender"


def test_role_is_checked_before_signature(verifier):
    hdr = header_of(sealed(W1)).model_copy(update={"type": "round.open"})
    assert rejected(verifier, resign(IMPOSTOR, hdr, update_body())) == "role_not_allowed"


def test_unknown_type_is_checked_before_sender(verifier):
    assert rejected(verifier, sealed(OUTSIDER, "nonsense")) == "unknown_type"


def test_stale_and_replayed_is_stale(verifier):
    wire = sealed()
    accept(verifier, wire)
    later = NOW + MAX_AGE + 1
    assert verifier.replay_guard.seen(header_of(wire).nonce, later)  # still remembered
    assert rejected(verifier, wire, now=later) == "stale_timestamp"


def test_signature_is_checked_before_freshness(verifier):
    assert rejected(verifier, sealed(IMPOSTOR, ts_ms=NOW - 10 * MAX_AGE)) == "bad_signature"


def test_replay_is_checked_before_job_and_round(verifier):
    wire = sealed()
    accept(verifier, wire)
    other = EnvelopeVerifier(federation(), "job-2", max_age_ms=MAX_AGE, max_future_ms=MAX_FUTURE,
                             max_body_bytes=MAX_BODY, replay_guard=verifier.replay_guard)
    assert rejected(other, wire) == "replayed_nonce"
    assert rejected(verifier, wire, round_ok=lambda h: False) == "replayed_nonce"


def test_job_before_round_before_digest(verifier):
    wire = bytearray(sealed(job="job-2", round=7))
    wire[-1] ^= 1
    assert rejected(verifier, bytes(wire), round_ok=lambda h: False) == "wrong_job"
    wire = bytearray(sealed(round=7))
    wire[-1] ^= 1
    assert rejected(verifier, bytes(wire), round_ok=lambda h: False) == "wrong_round"


def test_body_is_not_decoded_before_the_digest_matches(verifier, monkeypatch):
    import fedbus.crypto.envelopes as env

    calls = []

    def spy(*args):
        calls.append(args)
        raise AssertionError("decode_body called on a body whose digest does not match")

    monkeypatch.setattr(env, "decode_body", spy)
    wire = bytearray(sealed())
    wire[-1] ^= 1
    assert rejected(verifier, bytes(wire)) == "digest_mismatch"
    assert calls == []


# ---- tampered copies never burn the genuine message's nonce ---------------------------

def test_tampered_body_copy_first_then_genuine(verifier):
    wire = sealed()
    tampered = bytearray(wire)
    tampered[-3] ^= 0x10
    assert rejected(verifier, bytes(tampered)) == "digest_mismatch"
    assert len(verifier.replay_guard) == 0
    _, (fields, tensors) = accept(verifier, wire)
    assert torch.equal(tensors["w"], STATE["w"])
    assert rejected(verifier, wire) == "replayed_nonce"


@pytest.mark.parametrize("how", ["header", "signature", "subject", "round", "truncated-body"])
def test_any_rejected_copy_first_then_genuine(verifier, how):
    wire = sealed()
    kw = {}
    copy = bytearray(wire)
    hlen = len(split_frame(wire)[0])
    if how == "header":  # same header, same nonce, someone else's signature
        copy = bytearray(resign(IMPOSTOR, header_of(wire), bytes(split_frame(wire)[2])))
    elif how == "signature":
        copy[PREFIX_LEN + hlen] ^= 1
    elif how == "subject":
        kw["sender_token"] = "w2"
    elif how == "round":
        kw["round_ok"] = lambda h: False
    else:
        del copy[-1]
    with pytest.raises(Rejection):
        accept(verifier, bytes(copy), **kw)
    accept(verifier, wire)


def test_garbage_body_under_a_forged_signature_does_not_burn(verifier):
    """Even a valid-looking header with the genuine nonce and a forged body is harmless."""
    genuine = sealed()
    hdr = header_of(genuine)
    garbage = b"\x00" * 40
    forged_hdr = hdr.model_copy(update={"digest": body_digest(garbage), "length": len(garbage)})
    assert rejected(verifier, resign(IMPOSTOR, forged_hdr, garbage)) == "bad_signature"
    accept(verifier, genuine)


# ---- fuzz: the verifier only ever raises Rejection -----------------------------------

@st.composite
def mutated_wires(draw):
    wire = bytearray(sealed())
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(wire) - 1))
        op = draw(st.sampled_from(["flip", "insert", "delete"]))
        if op == "flip":
            wire[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            wire[i:i] = draw(st.binary(min_size=1, max_size=4))
        else:
            del wire[i:i + draw(st.integers(1, 4))]
    return bytes(wire)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(mutated_wires())
def test_mutated_wire_is_rejected_never_crashes(verifier, wire):
    try:
        _, (fields, _) = accept(verifier, wire, now=NOW)
    except Rejection as rej:
        assert rej.reason in REASONS
    else:  # only a mutation that changed nothing the signature covers can pass
        assert fields.num_samples == 10
        verifier.replay_guard = ReplayGuard(MAX_AGE + MAX_FUTURE)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["v", "type", "job", "round", "sender", "nonce", "ts", "digest", "length",
                                        "blob", "trace", "x"]),
                       st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.text(max_size=20),
                                 st.binary(max_size=40), st.lists(st.integers(-5, 5), max_size=2),
                                 st.dictionaries(st.text(max_size=5), st.integers(-5, 5), max_size=2))),
       st.binary(max_size=64))
def test_random_headers_are_rejected_never_crash(verifier, fields, body):
    hb = msgpack.packb(fields, use_bin_type=True)
    try:
        accept(verifier, frame(hb, W1.sign(hb), body))
    except Rejection as rej:
        assert rej.reason in REASONS


# ---- ReplayGuard ---------------------------------------------------------------------

def test_replay_guard_remembers_within_the_window_and_expires_after():
    g = ReplayGuard(window_ms=1000)
    assert g.check_and_remember(b"a" * 16, ts_ms=0, now_ms=0)
    assert not g.check_and_remember(b"a" * 16, ts_ms=0, now_ms=500)
    assert g.seen(b"a" * 16, now_ms=999)
    assert not g.seen(b"a" * 16, now_ms=1000)  # expired, and forgotten
    assert len(g) == 0
    assert g.check_and_remember(b"a" * 16, ts_ms=1000, now_ms=1000)


def test_replay_guard_future_timestamps_are_remembered_longer():
    g = ReplayGuard(window_ms=1000)
    g.check_and_remember(b"f" * 16, ts_ms=5000, now_ms=0)  # 5 s in the future
    assert g.seen(b"f" * 16, now_ms=5999)
    assert not g.seen(b"f" * 16, now_ms=6000)


def test_replay_guard_seen_does_not_remember():
    g = ReplayGuard(window_ms=1000)
    assert not g.seen(b"n" * 16, now_ms=0)
    assert len(g) == 0
    assert g.check_and_remember(b"n" * 16, 0, 0)


def test_replay_guard_is_bounded_and_fails_closed():
    g = ReplayGuard(window_ms=10**9, max_entries=3)
    for i in range(3):
        assert g.check_and_remember(bytes([i]) * 16, ts_ms=i, now_ms=i)
    assert g.full
    # A fourth nonce is refused rather than evicting a live one (which would reopen a replay).
    assert not g.check_and_remember(bytes([9]) * 16, ts_ms=9, now_ms=9)
    assert len(g) == 3
    assert all(g.seen(bytes([i]) * 16, now_ms=10) for i in (0, 1, 2))


def test_verifier_rejects_when_replay_guard_full():
    v = EnvelopeVerifier(federation(), JOB, max_age_ms=MAX_AGE, max_future_ms=MAX_FUTURE, max_body_bytes=MAX_BODY,
                         replay_guard=ReplayGuard(MAX_AGE + MAX_FUTURE, max_entries=1))
    accept(v, sealed())
    assert rejected(v, sealed()) == "rate_limited"


def test_unsupported_protocol_version_is_rejected(verifier):
    header = EnvelopeHeader(v=2, type="update", job=JOB, round=1, sender="w1", nonce=b"n" * 16, ts=NOW,
                            digest=body_digest(update_body()), length=len(update_body()))
    header_bytes = encode_header(header)
    wire = frame(header_bytes, W1.sign(header_bytes), update_body())
    assert rejected(verifier, wire) == "malformed_header"


def test_replay_guard_expires_many_in_order():
    g = ReplayGuard(window_ms=100)
    for i in range(50):
        g.check_and_remember(i.to_bytes(16, "big"), ts_ms=i * 10, now_ms=0)  # expiry i*10 + 100
    assert len(g) == 50
    g.seen(b"x" * 16, now_ms=300)  # entries with expiry <= 300 (i <= 20) are gone
    assert len(g) == 50 - 21
    assert not g.seen((20).to_bytes(16, "big"), now_ms=300) and g.seen((21).to_bytes(16, "big"), now_ms=300)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(skew=st.integers(-MAX_AGE, MAX_FUTURE), later=st.integers(0, 3 * (MAX_AGE + MAX_FUTURE)))
def test_an_accepted_message_is_never_accepted_again(skew, later):
    """The guard's memory outlasts every moment at which the timestamp could still pass."""
    v = EnvelopeVerifier(federation(), JOB, max_age_ms=MAX_AGE, max_future_ms=MAX_FUTURE, max_body_bytes=MAX_BODY)
    wire = sealed(ts_ms=NOW + skew)  # any clock skew the verifier tolerates
    accept(v, wire, now=NOW)  # accepted once ...
    with pytest.raises(Rejection) as info:
        accept(v, wire, now=NOW + later)  # ... and at no later moment
    assert info.value.reason in ("replayed_nonce", "stale_timestamp")


@pytest.mark.parametrize("header", [
    (b"\xdd" + (4095).to_bytes(4, "big")) * 819,  # nested list claims: ~26 MB with msgpack's default bounds
    (b"\xdf" + (4095).to_bytes(4, "big")) * 819,
    b"\x91" * 4096,
    b"\x81\xa1a" * 1365,
], ids=["list-claims", "map-claims", "deep-lists", "deep-maps"])
def test_hostile_header_from_anyone_costs_no_memory(verifier, header):
    """The header is decoded before the sender is known: a 4 KiB nest must stay cheap."""
    import tracemalloc

    wire = MAGIC + len(header).to_bytes(2, "little") + header + b"\0" * SIGNATURE_LEN
    tracemalloc.start()
    try:
        assert rejected(verifier, wire) == "malformed_header"
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 * 2**20, peak
