"""SecAgg messages as signed fedbus envelopes: every phase survives seal -> verify -> decode,
and hostile bodies are refused by the generic verifier with its named reasons."""

from __future__ import annotations

import random

import struct

import msgpack
import numpy as np
import pytest
import torch

from fedbus.crypto.envelopes import EnvelopeVerifier, Rejection, seal
from fedbus.crypto.federation import Federation, FederationFile
from fedbus.crypto.keys import Identity
from fedbus.protocol.messages import encode_body
from fedbus.protocol.secagg import SecAggAdvertise, SecAggInput
from fedbus.secagg.simulate import input_message
from fedbus.secagg.spec import SecureAggregationSpec, quantizer_of
from tests.test_secagg_protocol import _Driver

JOB = "job"
COORD = Identity.generate("coord", "coordinator")
WORKERS = [Identity.generate(f"w{i:02d}", "worker") for i in range(5)]
FED = Federation(FederationFile.model_validate({"participants": [p.participant_entry() for p in (COORD, *WORKERS)]}))


def verifier() -> EnvelopeVerifier:
    return EnvelopeVerifier(FED, JOB, max_age_ms=60_000, max_future_ms=60_000, max_body_bytes=64 << 20)


def over_the_wire(identity: Identity, msg, tensors=None):
    wire, _ = seal(identity, msg.TYPE, job=JOB, round=msg.round, body=encode_body(msg, tensors))
    v = verifier()
    opened = v.open(wire)
    return v.accept_body(opened, opened.inline_body)


def raw_body(fields: dict) -> bytes:
    packed = msgpack.packb(fields, use_bin_type=True)
    return struct.pack("<I", len(packed)) + packed


def rejection(identity: Identity, msg_type: str, body: bytes) -> str:
    wire, _ = seal(identity, msg_type, job=JOB, round=3, body=body)
    v = verifier()
    with pytest.raises(Rejection) as e:
        opened = v.open(wire)
        v.accept_body(opened, opened.inline_body)
    return e.value.reason


def test_a_whole_round_through_signed_envelopes_sums_exactly():
    ids = {w.id: w for w in WORKERS}
    params = SecureAggregationSpec().round_params(job=JOB, round=3, roster=sorted(ids), seed=random.Random(0).randbytes(32),
                                                  length=1000, bound=1.0)
    setup, _ = over_the_wire(COORD, params)
    assert setup == params
    d = _Driver(setup)
    q = quantizer_of(setup)
    quantized = {w: q.quantize(np.random.default_rng(i).uniform(-1, 1, 1000)) for i, w in enumerate(ids)}
    for w, c in d.clients.items():
        d.server.on_advertise(w, over_the_wire(ids[w], c.advertise())[0])
    directory, _ = over_the_wire(COORD, d.server.close_advertise())
    for w, c in d.clients.items():
        d.server.on_share_keys(w, over_the_wire(ids[w], c.on_keys(directory))[0])
    for holder, bundle in d.server.close_share_keys().items():
        assert d.clients[holder].on_shares(over_the_wire(COORD, bundle)[0]) == []
    for w, c in d.clients.items():
        fields, tensors = over_the_wire(ids[w], *input_message(setup, c.masked_input(quantized[w])))
        masked = tensors[SecAggInput.TENSOR]
        assert masked.dtype == torch.uint32 and fields == SecAggInput(round=3)
        d.server.on_masked_input(w, masked.numpy())
    request, _ = over_the_wire(COORD, d.server.close_masked_input())
    for w in request.survivors:
        d.server.on_unmask(w, over_the_wire(ids[w], d.clients[w].on_unmask(request))[0])
    result = d.server.finish()
    expected = np.zeros(1000, dtype=np.uint64)
    for x in quantized.values():
        expected += x
    assert (result.total == expected & np.uint64((1 << setup.bits) - 1)).all()


def test_hostile_secagg_bodies_get_the_verifiers_named_reasons():
    w = WORKERS[0]
    good = SecAggAdvertise(round=3, enc_pk=bytes(32), mask_pk=b"\1" * 32, self_commit=b"\2" * 32).model_dump(mode="json")
    assert rejection(w, "secagg.advertise", raw_body({**good, "enc_pk": "not base64!"})) == "malformed_body"
    assert rejection(w, "secagg.advertise", raw_body({**good, "enc_pk": "AAAA"})) == "malformed_body"  # 3 bytes
    # A worker may not speak for the server, nor the server for a worker
    assert rejection(w, "secagg.unmask", raw_body({"round": 3, "survivors": [], "dropped": []})) == "role_not_allowed"
    assert rejection(COORD, "secagg.advertise", raw_body(good)) == "role_not_allowed"
    # Parallel lists that do not line up, or a list claim over the cap, never reach the machine
    shares = {"round": 3, "peers": ["w00", "w01"], "pair_commits": [good["self_commit"]],
              "self_commits": [good["self_commit"]], "ciphertexts": []}
    assert rejection(w, "secagg.shares", raw_body(shares)) == "malformed_body"
    huge = raw_body({"round": 3, "peers": ["w"] * 300, "pair_commits": [], "self_commits": [], "ciphertexts": []})
    assert rejection(w, "secagg.shares", huge) == "malformed_body"
    # A masked input must be a torch tensor section (numpy sections are refused for model types)
    body = encode_body(SecAggInput(round=3), {"masked": np.zeros(4, dtype=np.uint32)})
    assert rejection(w, "secagg.input", body) == "malformed_body"


def test_the_server_refuses_a_masked_input_larger_than_the_round_needs_before_fetching_it(tmp_path):
    from fedbus.protocol.envelope import EnvelopeHeader
    from fedbus.secagg.service import SecureSumServer
    from tests.e2e_support import small_job

    server = SecureSumServer(small_job(JOB, rounds=1, min_workers=1, min_updates=1), FED, COORD, round=3,
                             roster=[w.id for w in WORKERS], length=1000, bound=1.0, spec=SecureAggregationSpec(),
                             phase_timeout_s=1, out_dir=tmp_path)
    exact = len(encode_body(*input_message(server.params, np.zeros(1000, dtype=np.uint32))))

    def header(length: int, round_: int = 3) -> EnvelopeHeader:
        return EnvelopeHeader(type="secagg.input", job=JOB, round=round_, sender="w00", nonce=b"n" * 16, ts=1,
                              digest=b"d" * 32, length=length)

    assert server._header_ok(header(exact)) and not server._header_ok(header(exact, round_=4))
    with pytest.raises(Rejection) as e:
        server._header_ok(header(exact + 1))
    assert e.value.reason == "oversize"
