"""Every rejection reason, on real messages through a real nats-server, while honest
workers (separate `fedbus worker` processes) finish the job.

The test process plays w04: a listed worker whose key the attacker holds. It heartbeats
so it is selected, and in round 1 sends one message of each bad kind before a valid
update; in later rounds it behaves. It also holds an unlisted key ("mallory").
"""

from __future__ import annotations

import asyncio
import math
import time

import pytest
import torch
from nats.js.api import DeliverPolicy

from fedbus.audit.reader import read_chain, verify_audit
from fedbus.bus import Subjects, connect, ensure_job_infrastructure
from fedbus.crypto.envelopes import Rejection, now_ms, seal
from fedbus.crypto.keys import Identity
from fedbus.crypto.sealing import seal_body
from fedbus.messaging import Messenger, verifier_for
from fedbus.protocol.envelope import PREFIX_LEN, SIGNATURE_LEN
from fedbus.protocol.messages import Heartbeat, RoundOpen, Update, encode_body
from tests.e2e_support import LocalFederation, cohort_opens, small_job

pytestmark = pytest.mark.e2e

EXPECTED = {"unknown_sender", "bad_signature", "stale_timestamp", "wrong_round", "digest_mismatch",
            "tensor_mismatch", "non_finite", "replayed_nonce", "wrong_run", "excessive_samples", "unsealable_body"}


def update_body(round_: int, base_version: int) -> Update:
    return Update(round=round_, base_version=base_version, num_samples=50, num_steps=1)


class Attacker:
    def __init__(self, fed: LocalFederation):
        self.fed = fed
        self.job = fed.job
        self.subjects = Subjects(fed.job.job)
        self.me = Identity.load(fed.key("w04"))
        self.mallory = Identity.generate("mallory", "worker")  # not in the federation file
        self.sent: dict[str, int] = {}

    async def run(self, deadline_s: float) -> None:
        nc = await connect(self.fed.nats_url, name="attacker")
        js = nc.jetstream()
        await ensure_job_infrastructure(js, self.subjects)
        self.nc, self.js = nc, js
        self.messenger = Messenger(nc, js, self.me, self.subjects, inline_max_bytes=self.job.transport.inline_max_bytes)
        self.verifier = verifier = verifier_for(self.job, self.fed.federation)
        # Honest updates are sealed to the coordinator: to tell them from this attacker's own
        # forgeries (by their headers alone) the filter must accept that recipient.
        coordinator = Identity.load(self.fed.key("coordinator"))
        self.honest_filter = verifier_for(self.job, self.fed.federation, receiver=coordinator)
        control: asyncio.Queue = asyncio.Queue()
        honest: asyncio.Queue = asyncio.Queue()
        await js.subscribe(self.subjects.ctl("round.open"), ordered_consumer=True, cb=control.put)
        await js.subscribe(self.subjects.ctl("job.done"), ordered_consumer=True, cb=control.put)
        await js.subscribe(self.subjects.upd("default", "w01"), ordered_consumer=True,
                           deliver_policy=DeliverPolicy.NEW, cb=honest.put)
        beat = asyncio.create_task(self._heartbeat())
        try:
            async for got in cohort_opens(self.messenger, verifier, control, "w04", deadline_s):
                ro: RoundOpen = got.fields  # type: ignore[assignment]
                model = {k: v.clone() for k, v in got.tensors.items()}
                self.run = got.header.run  # an update answers the coordinator's current run
                if ro.round == 1:
                    await self._attacks(ro, model, honest)
                await self.messenger.publish(self.subjects.upd("default", "w04"), update_body(ro.round, ro.model_version),
                                             model, round=ro.round, run=self.run)
        finally:
            beat.cancel()
            await nc.close()

    async def _heartbeat(self) -> None:
        while True:
            await self.messenger.publish(self.subjects.hb("w04"), Heartbeat(num_samples=50, partition=3),
                                         round=0, persist=False)
            await asyncio.sleep(0.5)

    async def _send(self, reason: str, subject: str, wire: bytes, msg_id: str | None = None) -> None:
        headers = {"Nats-Msg-Id": msg_id or f"attack-{reason}-{time.time_ns()}"}
        await self.js.publish(subject, wire, headers=headers)
        self.sent[reason] = self.sent.get(reason, 0) + 1

    async def _attacks(self, ro: RoundOpen, model: dict, honest: asyncio.Queue) -> None:
        job, r, v = self.job.job, ro.round, ro.model_version
        my_subject = self.subjects.upd("default", "w04")
        body = encode_body(update_body(r, v), model)

        # An unlisted key signs a well-formed update, on a listed worker's subject (the
        # coordinator's consumer is filtered to listed workers' subjects: anything under an
        # unlisted id never reaches it at all).
        wire, _ = seal(self.mallory, "update", job=job, round=r, body=body, run=self.run)
        await self._send("unknown_sender", my_subject, wire)

        # A forged sender: the header claims w01, the signature is w04's.
        forged = Identity("w01", "worker", "default", self.me.signing_key)
        wire, _ = seal(forged, "update", job=job, round=r, body=body, run=self.run)
        await self._send("bad_signature", self.subjects.upd("default", "w01"), wire)

        # A stale timestamp, correctly signed.
        wire, _ = seal(self.me, "update", job=job, round=r, body=body, ts_ms=now_ms() - 10 * 60 * 1000, run=self.run)
        await self._send("stale_timestamp", my_subject, wire)

        # A round that is not open.
        wire, _ = seal(self.me, "update", job=job, round=r + 7, body=encode_body(update_body(r + 7, v), model), run=self.run)
        await self._send("wrong_round", my_subject, wire)

        # One body byte flipped after signing.
        wire, _ = seal(self.me, "update", job=job, round=r, body=body, run=self.run)
        tampered = bytearray(wire)
        tampered[-1] ^= 0x01
        assert len(wire) > PREFIX_LEN + SIGNATURE_LEN
        await self._send("digest_mismatch", my_subject, bytes(tampered))

        # A tensor of the wrong shape.
        name = next(k for k, t in model.items() if t.dim() == 2)
        wrong = dict(model)
        wrong[name] = torch.zeros(model[name].shape[0], model[name].shape[1] + 1)
        wire, _ = seal(self.me, "update", job=job, round=r, body=encode_body(update_body(r, v), wrong), run=self.run)
        await self._send("tensor_mismatch", my_subject, wire)

        # A NaN in an otherwise valid update.
        poisoned = {k: t.clone() for k, t in model.items()}
        poisoned[name].view(-1)[0] = math.nan
        wire, _ = seal(self.me, "update", job=job, round=r, body=encode_body(update_body(r, v), poisoned), run=self.run)
        await self._send("non_finite", my_subject, wire)

        # An update for another run of this job (e.g. captured from an earlier run).
        wire, _ = seal(self.me, "update", job=job, round=r, body=body, run="r1000000000000-00000000")
        await self._send("wrong_run", my_subject, wire)

        # A sample claim far above the 50 samples w04 declares on its heartbeats (the 2**63 attack).
        greedy = Update(round=r, base_version=v, num_samples=2**53 - 1, num_steps=1)
        wire, _ = seal(self.me, "update", job=job, round=r, body=encode_body(greedy, model), run=self.run)
        await self._send("excessive_samples", my_subject, wire)

        # A body sealed to another participant than the coordinator (which cannot open it).
        w01_key = self.fed.federation.encryption_key("w01")
        wire, _ = seal(self.me, "update", job=job, round=r, body=seal_body(body, w01_key), run=self.run, sealed_to="w01")
        await self._send("unsealable_body", my_subject, wire)

        # An honest worker's update re-published byte for byte under a fresh Nats-Msg-Id
        # (so JetStream de-duplication does not catch it; the replay guard must).
        # (Skip our own forged w01 message, which went to the same subject.)
        while True:
            captured = await asyncio.wait_for(honest.get(), timeout=60)
            try:
                self.honest_filter.open(captured.data)
                break
            except Rejection:
                continue
        await self._send("replayed_nonce", captured.subject, captured.data, msg_id=f"replay-{time.time_ns()}")
        # Give the coordinator time to see the replay while round 1 is still open.
        await asyncio.sleep(0.5)


def test_every_rejection_reason_on_a_real_server(nats_server, tmp_path):
    # No final evaluation phase: w04 (this test) would never answer it.
    job = small_job("e2e-attacks", rounds=3, min_workers=4, min_updates=3, deadline_s=30.0,
                    evaluation={"final_round": False})
    fed = LocalFederation(tmp_path, nats_server.url, job, 4)
    attacker = Attacker(fed)
    try:
        fed.start_coordinator()
        for w in ("w01", "w02", "w03"):
            fed.start_worker(w)
        asyncio.run(attacker.run(deadline_s=240))
        assert fed.wait_coordinator(timeout=120) == 0, fed.tail_logs()
        fed.wait_all(timeout=30)
    finally:
        fed.stop()

    assert set(attacker.sent) == EXPECTED
    summary = fed.summary()
    assert summary["reason"] == "completed", fed.tail_logs()
    assert summary["rounds_completed"] == 3
    rejected = summary["updates_rejected"]
    for reason in EXPECTED:
        assert rejected.get(reason, 0) >= 1, (reason, rejected)
    # Honest updates were all accepted: three workers plus w04's valid update, every round.
    assert [r["accepted"] for r in summary["rounds"]] == [4, 4, 4]
    assert summary["updates_accepted"] == 12
    assert summary["final_accuracy"] > 0.5

    # Every rejection is in the audit stream, whose chains are intact and signed.
    verdict, records = asyncio.run(_audit(nats_server.url, job.job, fed.federation))
    assert verdict.ok, verdict.problems
    # Rejections are audited in aggregate: one "rejections" record per sender, reason and interval.
    audited = {r["reason"] for r in records if r["event"] == "rejections"}
    assert EXPECTED <= audited, audited


async def _audit(url: str, job_id: str, federation):
    nc = await connect(url, name="audit-reader")
    try:
        js, subjects = nc.jetstream(), Subjects(job_id)
        return await verify_audit(js, subjects, federation), await read_chain(js, subjects, "coordinator", federation)
    finally:
        await nc.close()
