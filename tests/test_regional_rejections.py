"""Issue 9, acceptance 3 without processes: a regional aggregator's partial is rejected by
name when it publishes for another region, folds a worker of another region, is
tampered with, lists a digest that is not the worker's, or carries a forged or
mismatched proof; and the round machine refuses partials with workers outside the
cohort, a second partial of a region, or a weight above a worker's declared samples.

Every message here is a real signed envelope (Ed25519 keys of ``Identity``): workers'
updates are sealed as a worker seals them, their proofs taken from the wire as the
aggregator takes them (``proof_of``), and the partial is built and sealed by the
aggregator's own publishing code (``AggregatorService._publish``), signed by an
aggregator's key. Each is run
through the same path the coordinator runs: ``Messenger.receive`` (EnvelopeVerifier),
``verified_partial`` and the ``RoundStateMachine``.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch

from fedbus.aggregation.base import Contribution
from fedbus.aggregation.fedavg import FedAvg
from fedbus.bus import Subjects
from fedbus.aggregator.core import PublishPartial
from fedbus.aggregator.service import AggregatorService
from fedbus.coordinator.inline import drive
from fedbus.coordinator.partials import verified_partial
from fedbus.coordinator.rounds import (
    CloseRound,
    DuplicateIgnored,
    OpenRound,
    PartialReceived,
    RejectUpdate,
    RoundPolicy,
    RoundStateMachine,
    Start,
    WorkerSeen,
)
from fedbus.crypto.envelopes import EnvelopeVerifier, Rejection, now_ms, seal
from fedbus.crypto.federation import Federation, FederationFile
from fedbus.crypto.keys import Identity
from fedbus.crypto.proofs import proof_of
from fedbus.messaging import Messenger
from fedbus.protocol.envelope import decode_header, encode_header, frame, split_frame
from fedbus.protocol.messages import Heartbeat, Update, encode_body
from fedbus.protocol.runs import new_run_id
from fedbus.telemetry import get_tracer

JOB = "regional-job"
RUN = new_run_id(now_ms() - 1_000)
DECLARED = 100  # samples every worker declares on its heartbeats

COORD = Identity.generate("coordinator", "coordinator")
# r0: w01, w03 (and w05, listed but never in a cohort); r1: w02, w04 (as LocalFederation lays them out)
WORKERS = {w: Identity.generate(w, "worker", r) for w, r in
           (("w01", "r0"), ("w02", "r1"), ("w03", "r0"), ("w04", "r1"), ("w05", "r0"))}
AGG = {r: Identity.generate(f"agg-{r}", "aggregator", r) for r in ("r0", "r1")}
FED = Federation(FederationFile.model_validate({"participants": [
    p.participant_entry() for p in (COORD, *WORKERS.values(), *AGG.values())]}))

STATE = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.zeros(3),
         "nbt": torch.tensor(5, dtype=torch.int64)}


def verifier() -> EnvelopeVerifier:
    return EnvelopeVerifier(FED, JOB, max_age_ms=120_000, max_future_ms=30_000, max_body_bytes=64 << 20)


def local_state(value: float) -> dict[str, torch.Tensor]:
    return {"w": STATE["w"] + value, "b": STATE["b"] - value, "nbt": STATE["nbt"] + 3}


@dataclasses.dataclass(frozen=True)
class SignedUpdate:
    worker: str
    num_samples: int
    state: dict
    wire: bytes

    @property
    def digest(self) -> bytes:
        return decode_header(split_frame(self.wire)[0]).digest


def signed_update(worker: str, *, value: float = 1.0, num_samples: int = 40, round_: int = 1,
                  run: str | None = RUN, key: Identity | None = None) -> SignedUpdate:
    """A worker's update of ``round_`` as the worker seals it (signed by ``key``, default
    the worker's own)."""
    st = local_state(value)
    body = encode_body(Update(round=round_, base_version=0, num_samples=num_samples, num_steps=1,
                              train_metrics={"loss": 0.5}), st)
    ident = key or WORKERS[worker]
    if ident.id != worker:  # a forgery: the header names the worker, another key signs it
        ident = dataclasses.replace(ident, id=worker)
    wire, _ = seal(ident, "update", job=JOB, round=round_, body=body, run=run)
    return SignedUpdate(worker, num_samples, st, wire)


class CapturingMessenger(Messenger):
    """The aggregator's Messenger, minus the bus: ``publish`` seals exactly as the real one
    does (Messenger.seal) and keeps the wire bytes instead of sending them."""

    def __init__(self, identity: Identity, job: str = JOB):
        super().__init__(None, None, identity, Subjects(job), inline_max_bytes=64 << 20)
        self.sent: list[tuple[str, bytes]] = []

    async def publish(self, subject, fields, tensors=None, *, round, trace=None, persist=True, run=None):
        wire, header = await self.seal(fields, tensors, round=round, trace=trace, run=run)
        self.sent.append((subject, wire))
        return header


async def sign_partial(identity: Identity, updates: list[SignedUpdate], *, job: str, run: str, round_: int,
                       region: str, base: dict, base_version: int, rule=None,
                       proofs: list[bytes] | None = None, digests: list[bytes] | None = None) -> tuple[str, bytes]:
    """(subject, wire) of the partial ``identity`` publishes for ``updates`` (full local
    states trained from ``base``): the rule's partial aggregate of their deltas with each
    contributor's (digest, weight, base version, proof), made into a signed ``partial``
    message by the aggregator's own publishing code (AggregatorService._publish, on a
    service holding only what that method uses). ``region`` is the region the body claims
    (and the subject it names); ``proofs`` and ``digests`` are what a lying aggregator
    would change."""
    acc = (rule or FedAvg()).begin(base, base_version)
    for u in updates:
        acc.fold(Contribution.from_local_state(u.worker, base_version, float(u.num_samples), u.state, base))
    proofs = proofs if proofs is not None else [proof_of(u.wire) for u in updates]
    digests = digests if digests is not None else [u.digest for u in updates]
    contributors = tuple((u.worker, d, float(u.num_samples), base_version, p)
                         for u, d, p in zip(updates, digests, proofs))
    svc = object.__new__(AggregatorService)
    svc.region, svc.subjects, svc.tracer = region, Subjects(job), get_tracer("tests.regional")
    svc.messenger = CapturingMessenger(identity, job)
    svc._feed = lambda event: []
    await svc._publish(PublishPartial(run, round_, acc.partial(), contributors, {"loss": 0.5},
                                      float(sum(u.num_samples for u in updates))))
    [(subject, wire)] = svc.messenger.sent
    return subject, wire


def partial_wire(aggregator: str, updates: list[SignedUpdate], *, region: str | None = None, round_: int = 1,
                 proofs: list[bytes] | None = None, digests: list[bytes] | None = None) -> bytes:
    """The partial ``aggregator`` signs for ``updates`` of this module's job, run and STATE."""
    agg = AGG[aggregator.removeprefix("agg-")]
    subject, wire = asyncio.run(sign_partial(agg, updates, job=JOB, run=RUN, round_=round_, region=region or agg.region,
                                             base=STATE, base_version=0, proofs=proofs, digests=digests))
    assert subject == Subjects(JOB).agg(region or agg.region)
    return wire


def receive(wire: bytes, subject_region: str, *, run: str | None = RUN):
    """What the coordinator does with a message on agg.<subject_region>: the envelope
    (Messenger.receive), then the partial's own checks. Returns (got, partial, contributors)."""
    messenger = Messenger(None, None, COORD, Subjects(JOB), inline_max_bytes=1 << 20)
    got = asyncio.run(messenger.receive(verifier(), wire))
    partial, contributors, _ = verified_partial(FED, JOB, run, got, subject_region)
    return got, partial, contributors


def rejected(wire: bytes, subject_region: str) -> Rejection:
    with pytest.raises(Rejection) as info:
        receive(wire, subject_region)
    return info.value


# ---- the honest partial ------------------------------------------------------------------

def test_an_honest_partial_passes_with_its_contributors():
    u1, u3 = signed_update("w01", value=1.0, num_samples=40), signed_update("w03", value=-2.0, num_samples=60)
    got, partial, contributors = receive(partial_wire("agg-r0", [u1, u3]), "r0")
    assert got.header.sender == "agg-r0" and got.fields.region == "r0"
    assert contributors == (("w01", u1.digest, 40.0), ("w03", u3.digest, 60.0))
    assert partial.count == 2 and partial.total_weight == 100.0 and partial.base_version == 0
    # The sums are the FedAvg numerator: Σ n_i (y_i - x) = 40 * 1 + 60 * (-2) on "w".
    assert torch.allclose(partial.sums["w"], torch.full((2, 3), -80.0, dtype=torch.float64))
    assert [c.worker_id for c in partial.contributors] == ["w01", "w03"]


# ---- (a) an aggregator publishing for another region -------------------------------------

def test_aggregator_of_r1_publishing_its_own_partial_on_agg_r0_is_wrong_region():
    wire = partial_wire("agg-r1", [signed_update("w02")])
    assert receive(wire, "r1")[2][0][0] == "w02"  # the same message is fine on its own subject
    rej = rejected(wire, "r0")
    assert rej.reason == "wrong_region" and rej.header.sender == "agg-r1", rej


def test_aggregator_of_r1_claiming_region_r0_is_wrong_region_on_either_subject():
    # Its body says r0 and it lists r0's workers with their genuine signed updates.
    wire = partial_wire("agg-r1", [signed_update("w01"), signed_update("w03")], region="r0")
    for subject_region in ("r0", "r1"):
        rej = rejected(wire, subject_region)
        assert rej.reason == "wrong_region", (subject_region, rej)


def test_aggregator_of_r0_with_a_body_for_r1_on_agg_r0_is_wrong_region():
    wire = partial_wire("agg-r0", [signed_update("w01")], region="r1")
    assert rejected(wire, "r0").reason == "wrong_region"


# ---- (b) an aggregator folding a worker of another region --------------------------------

def test_partial_of_r0_listing_a_worker_of_r1_is_wrong_region():
    # w02's update is genuine (its own signature, this job, run and round): only its region is wrong.
    u2 = signed_update("w02")
    assert receive(partial_wire("agg-r1", [u2]), "r1")[2][0][1] == u2.digest
    rej = rejected(partial_wire("agg-r0", [signed_update("w01"), u2]), "r0")
    assert rej.reason == "wrong_region" and "w02" in rej.detail and rej.header.sender == "agg-r0", rej



def test_a_partial_listing_more_updates_than_the_federation_has_workers_is_refused_before_any_proof_is_checked():
    # Five workers are listed: six contributors cannot be honest, whatever the proofs say.
    updates = [signed_update(w) for w in ("w01", "w03", "w05")] + [signed_update("w01", value=v) for v in (2., 3.)]
    updates.append(signed_update("w03", value=4.0))
    rej = rejected(partial_wire("agg-r0", updates), "r0")
    assert rej.reason == "malformed_body" and "6 contributors" in rej.detail, rej


# ---- (c) a tampered partial --------------------------------------------------------------

def test_tampered_partial_body_is_digest_mismatch_at_the_envelope():
    wire = bytearray(partial_wire("agg-r0", [signed_update("w01"), signed_update("w03")]))
    header_bytes, _, body = split_frame(bytes(wire))
    # Flip one byte in the middle of the tensors (a sum), after the signature was made.
    offset = len(wire) - len(body) + len(body) * 3 // 4
    wire[offset] ^= 0x01
    messenger = Messenger(None, None, COORD, Subjects(JOB), inline_max_bytes=1 << 20)
    with pytest.raises(Rejection) as info:
        asyncio.run(messenger.receive(verifier(), bytes(wire)))
    assert info.value.reason == "digest_mismatch" and info.value.header.sender == "agg-r0"
    assert rejected(bytes(wire), "r0").reason == "digest_mismatch"


@pytest.mark.parametrize("change", [
    {"round": 2},
    {"run": new_run_id(now_ms())},
    {"digest": bytes(32)},
])
def test_tampered_partial_header_is_bad_signature(change):
    wire = partial_wire("agg-r0", [signed_update("w01")])
    header_bytes, signature, body = split_frame(wire)
    header = decode_header(header_bytes)
    forged = encode_header(header.model_copy(update=change))
    assert forged != bytes(header_bytes)
    rej = rejected(frame(forged, signature, bytes(body)), "r0")
    assert rej.reason == "bad_signature", rej


# ---- (d) a listed digest that is not the worker's ----------------------------------------

def test_partial_listing_a_digest_that_is_not_in_the_workers_signed_header_is_digest_mismatch():
    u1, u3 = signed_update("w01"), signed_update("w03")
    other = signed_update("w01", value=9.0)  # what the aggregator claims w01 sent instead
    assert other.digest != u1.digest
    rej = rejected(partial_wire("agg-r0", [u1, u3], digests=[other.digest, u3.digest]), "r0")
    assert rej.reason == "digest_mismatch" and "w01" in rej.detail, rej


# ---- (e) a forged proof -----------------------------------------------------------------

@pytest.mark.parametrize("signer", ["agg-r0", "w03"])
def test_proof_signed_by_another_key_is_bad_signature(signer):
    key = AGG["r0"] if signer == "agg-r0" else WORKERS["w03"]
    forged = signed_update("w01", key=key)  # header names w01, signed by someone else
    assert decode_header(split_frame(forged.wire)[0]).sender == "w01"
    rej = rejected(partial_wire("agg-r0", [forged, signed_update("w03")]), "r0")
    assert rej.reason == "bad_signature" and "w01" in rej.detail, rej


def test_proof_with_a_flipped_signature_byte_is_bad_signature():
    u1 = signed_update("w01")
    proof = bytearray(proof_of(u1.wire))
    proof[-1] ^= 0x80
    rej = rejected(partial_wire("agg-r0", [u1], proofs=[bytes(proof)]), "r0")
    assert rej.reason == "bad_signature", rej


# ---- (f) a proof of something else -------------------------------------------------------

@pytest.mark.parametrize("what", ["previous_round", "other_run", "other_job"])
def test_genuine_proof_of_another_round_run_or_job_is_header_mismatch(what):
    if what == "previous_round":
        stale = signed_update("w01", round_=1)  # w01's real update of round 1, replayed in round 2
        wire = partial_wire("agg-r0", [stale], round_=2, digests=[stale.digest])
    elif what == "other_run":
        stale = signed_update("w01", run=new_run_id(now_ms() - 86_400_000))
        wire = partial_wire("agg-r0", [stale])
    else:
        body = encode_body(Update(round=1, base_version=0, num_samples=40, num_steps=1), local_state(1.0))
        other_job, _ = seal(WORKERS["w01"], "update", job="another-job", round=1, body=body, run=RUN)
        stale = SignedUpdate("w01", 40, local_state(1.0), other_job)
        wire = partial_wire("agg-r0", [stale])
    rej = rejected(wire, "r0")
    assert rej.reason == "header_mismatch", rej


def test_proof_that_is_a_heartbeat_not_an_update_is_header_mismatch():
    hb, _ = seal(WORKERS["w01"], "heartbeat", job=JOB, round=0, run=RUN,
                 body=encode_body(Heartbeat(region="r0", num_samples=DECLARED, partition=0)))
    u1 = signed_update("w01")
    rej = rejected(partial_wire("agg-r0", [u1], proofs=[proof_of(hb)]), "r0")
    assert rej.reason == "header_mismatch", rej


def test_proof_listed_under_another_workers_name_is_header_mismatch():
    u1, u3 = signed_update("w01"), signed_update("w03")
    # w03's genuine proof listed as w01's (and vice versa): each proof names its own sender.
    rej = rejected(partial_wire("agg-r0", [u1, u3], proofs=[proof_of(u3.wire), proof_of(u1.wire)]), "r0")
    assert rej.reason == "header_mismatch", rej


# ---- the round machine -------------------------------------------------------------------

def opened_machine() -> tuple[RoundStateMachine, OpenRound]:
    """Round 1 open with cohort w01..w04 (w05 is listed but never heartbeats)."""
    policy = RoundPolicy(rounds=1, min_workers=4, min_updates=4, round_deadline_ms=60_000,
                         wait_for_workers_ms=60_000, liveness_ms=600_000, final_eval=False)
    m = RoundStateMachine(policy, STATE, rule=FedAvg())
    t = now_ms()
    actions = drive(m, Start(t))
    for w in ("w01", "w02", "w03", "w04"):
        actions += drive(m, WorkerSeen(w, DECLARED, t))
    [opened] = [a for a in actions if isinstance(a, OpenRound)]
    assert sorted(opened.cohort) == ["w01", "w02", "w03", "w04"] and opened.round == 1
    return m, opened


def partial_event(wire: bytes, subject_region: str) -> PartialReceived:
    """PartialReceived as the coordinator service builds it from a verified partial."""
    got, partial, contributors = receive(wire, subject_region)
    return PartialReceived(got.header.sender, subject_region, got.header.round, partial, contributors, now_ms(),
                           digest=got.header.digest, train_metrics=dict(got.fields.train_metrics),
                           metrics_weight=got.fields.metrics_weight)


def rejections(actions) -> list[tuple[str, str]]:
    return [(a.worker_id, a.reason) for a in actions if isinstance(a, RejectUpdate)]


def test_machine_rejects_outside_cohort_duplicate_region_and_excessive_samples_then_closes_on_honest_partials():
    m, _ = opened_machine()
    u = {w: signed_update(w, value=v, num_samples=n) for w, v, n in
         (("w01", 1.0, 40), ("w02", 2.0, 30), ("w03", -1.0, 60), ("w04", 0.5, 50))}

    # w05 is a genuine worker of r0 with a genuine update, but not in round 1's cohort.
    outsider = partial_event(partial_wire("agg-r0", [u["w01"], signed_update("w05")]), "r0")
    assert rejections(drive(m, outsider)) == [("agg-r0", "not_in_cohort")]

    # w03 claims 500 samples, above the 100 it declared: the whole partial is refused.
    greedy = partial_event(partial_wire("agg-r0", [u["w01"], signed_update("w03", num_samples=500)]), "r0")
    assert rejections(drive(m, greedy)) == [("agg-r0", "excessive_samples")]
    assert m.accepted_total == 0  # all or nothing: w01 of the refused partials is not in

    honest_r0 = partial_event(partial_wire("agg-r0", [u["w01"], u["w03"]]), "r0")
    assert rejections(drive(m, honest_r0)) == [] and m.accepted_total == 2

    # The very same partial redelivered is a duplicate to ignore, not a rejection ...
    again = drive(m, dataclasses.replace(honest_r0, now_ms=now_ms()))
    assert rejections(again) == [] and [type(a) for a in again] == [DuplicateIgnored]
    # ... a second, different partial of r0 is duplicate_update (even with only w01 in it).
    second = partial_event(partial_wire("agg-r0", [u["w01"]]), "r0")
    assert rejections(drive(m, second)) == [("agg-r0", "duplicate_update")]
    assert m.accepted_total == 2

    honest_r1 = partial_event(partial_wire("agg-r1", [u["w02"], u["w04"]]), "r1")
    actions = drive(m, honest_r1)
    assert rejections(actions) == []
    [close] = [a for a in actions if isinstance(a, CloseRound)]
    assert close.status == "aggregated" and sorted(close.accepted) == ["w01", "w02", "w03", "w04"]
    assert close.via == {"w01": "r0", "w03": "r0", "w02": "r1", "w04": "r1"}
    assert close.rejected == {"not_in_cohort": 1, "excessive_samples": 1, "duplicate_update": 1}
    # The merged model is the flat FedAvg of the four honest updates.
    total = sum(x.num_samples for x in u.values())
    for k in ("w", "b"):
        expected = STATE[k].double() + sum(x.num_samples * (x.state[k].double() - STATE[k].double())
                                           for x in u.values()) / total
        torch.testing.assert_close(close.state[k], expected.to(STATE[k].dtype))
    assert close.state["nbt"].item() == STATE["nbt"].item() + 3


def test_machine_rejects_a_worker_already_in_through_another_partial():
    m, _ = opened_machine()
    u1, u3 = signed_update("w01"), signed_update("w03")
    assert rejections(drive(m, partial_event(partial_wire("agg-r0", [u1]), "r0"))) == []
    # If a region's second partial slipped past the region check, its worker is still only counted once:
    # fake that by presenting r0's next partial as from a different region key in the event.
    ev = partial_event(partial_wire("agg-r0", [u1, u3]), "r0")
    ev = dataclasses.replace(ev, region="r0-bis")
    assert rejections(drive(m, ev)) == [("agg-r0", "duplicate_update")]
    assert m.accepted_total == 1
