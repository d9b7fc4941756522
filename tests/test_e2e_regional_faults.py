"""Issue 9, acceptance 3 and 4, through the CLI against a real nats-server.

Two regions (r0: w01, w03; r1: w02, w04), a `fedbus aggregator` per region and a
coordinator with topology: regional.

* Rejections by name: while round 1 is held open (r1's aggregator is paused with
  SIGSTOP, so the round cannot close before the injected partials are judged), a rogue
  publisher in this test, holding real aggregator keys, injects partials built from the
  round's genuine signed updates: agg-r1 publishing for r0 on agg.r0 (wrong_region),
  agg-r0 folding r1's worker w02 (wrong_region), a partial of agg-r0 tampered after
  signing (digest_mismatch at the envelope), and one listing a digest that is not the
  worker's (digest_mismatch). The job completes with the honest regions and every
  round's model equals a flat FedAvg of its updates.
* Crash safety: the aggregator of r0 is SIGKILLed in round 2 once it holds w01's update
  unacknowledged (w03 is a simulated straggler, so r0 cannot close at once), and restarted
  with the same command once w03's update is stored. r1's partial of round 2 reaches the
  coordinator meanwhile; afterwards every round has all four workers exactly once, r0
  published one partial per round, and its durable consumer has nothing left pending.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import pytest
import torch
from nats.js.api import DeliverPolicy

from fedbus.bus import Subjects, connect
from fedbus.coordinator.factory import rule_for
from fedbus.coordinator.partials import verified_partial
from fedbus.crypto.envelopes import EnvelopeVerifier, Rejection
from fedbus.crypto.keys import Identity
from fedbus.messaging import Messenger, nats_headers
from fedbus.protocol.envelope import decode_header, split_frame
from fedbus.protocol.tensor_groups import split_groups
from fedbus.transforms import build_worker_pipeline, decode_update
from tests.e2e_support import LocalFederation, small_job, wait_for_round
from tests.test_e2e_regional import flat_fedavg
from tests.test_e2e_strategies import read_stream
from tests.test_regional_rejections import SignedUpdate, sign_partial

pytestmark = pytest.mark.e2e

WORKERS = ("w01", "w02", "w03", "w04")


def regional_job(job_id: str, *, rounds: int, deadline_s: float, min_updates: int):
    job = small_job(job_id, rounds=rounds, min_workers=4, min_updates=min_updates, deadline_s=deadline_s,
                    evaluation={"final_round": False})
    return type(job).model_validate({**job.model_dump(by_alias=True), "topology": "regional"})


def log_events(fed: LocalFederation, name: str) -> list[dict]:
    path = fed.run_dir / "logs" / f"{name}.log"
    if not path.exists():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def wait_until(what: str, check, fed: LocalFederation, timeout: float, step: float = 0.05):
    """Poll ``check()`` until it returns something truthy (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(step)
    raise AssertionError(f"{what}: not within {timeout} s\n{fed.tail_logs()}")


def reader_verifier(fed: LocalFederation) -> EnvelopeVerifier:
    return EnvelopeVerifier(fed.federation, fed.job.job, max_age_ms=10 * 60_000, max_future_ms=60_000,
                            max_body_bytes=64 << 20, opener=fed.opener())  # updates are sealed to the aggregators


async def judged_partials(fed: LocalFederation) -> list:
    """Every message on agg.*, judged as the coordinator judges it (envelope, then the
    partial's own checks against its subject's region): the Received partial, or the
    Rejection it gets."""
    subjects = Subjects(fed.job.job)
    nc = await connect(fed.nats_url, name="agg-reader", first_connect_timeout=10)
    js = nc.jetstream()
    reader = Messenger(nc, js, None, subjects, inline_max_bytes=1)  # type: ignore[arg-type]
    verifier = reader_verifier(fed)
    sub = await js.subscribe(subjects.agg_all, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
    out = []
    try:
        info = await js.stream_info(await js.find_stream_name_by_subject(subjects.agg_all))
        for _ in range(info.state.messages):
            msg = await sub.next_msg(timeout=5)
            try:
                got = await reader.receive(verifier, msg.data)
                verified_partial(fed.federation, fed.job.job, got.header.run, got, msg.subject.rsplit(".", 1)[-1])
                out.append(got)
            except Rejection as rej:
                out.append(rej)
    finally:
        await nc.close()
    return out


def all_updates(fed: LocalFederation) -> list:
    """Every update on the bus, region by region (each region's updates may have a stream of their own)."""
    subjects = Subjects(fed.job.job)
    return [u for r in ("r0", "r1") for u in asyncio.run(read_stream(fed, subjects.upd_region(r)))]


def check_rounds(fed: LocalFederation, summary: dict) -> None:
    """Every round aggregated all four workers, each once, each through its own region."""
    regions = {w.id: w.region for w in fed.federation.workers()}
    assert summary["reason"] == "completed" and summary["rounds_completed"] == fed.job.rounds, summary
    assert [r["round"] for r in summary["rounds"]] == list(range(1, fed.job.rounds + 1))
    for row in summary["rounds"]:
        workers = row["accepted_workers"]
        assert len(workers) == len(set(workers)), row
        assert row["status"] == "aggregated" and sorted(workers) == list(WORKERS) and row["accepted"] == 4, row
        assert row["via_region"] == {w: regions[w] for w in workers}, row
    assert summary["updates_accepted"] == sum(r["accepted"] for r in summary["rounds"]) == 4 * fed.job.rounds


def check_models_equal_flat_fedavg(fed: LocalFederation) -> None:
    """Each round's model is the flat FedAvg of that round's updates on the stream: nothing
    a rogue partial carried was merged, nothing was counted twice."""
    import fedbus.protocol.tensor_groups as tg
    subjects = Subjects(fed.job.job)
    opens = asyncio.run(read_stream(fed, subjects.ctl("round.open")))
    updates = all_updates(fed)
    bases = {o.fields.round: o.tensors for o in opens}
    final = torch.load(fed.run_dir / "final_model.pt")
    for r in range(1, fed.job.rounds + 1):
        mine = [u for u in updates if u.header.round == r]
        assert sorted(u.header.sender for u in mine) == list(WORKERS), (r, [u.header.sender for u in mine])
        expected = flat_fedavg(tg.split_groups(bases[r])[0], mine)
        got = tg.split_groups(bases[r + 1])[0] if r + 1 in bases else final
        for k, v in expected.items():
            assert torch.allclose(got[k], v, rtol=1e-5, atol=1e-6), (r, k, (got[k] - v).abs().max())


# ---- acceptance 3: rejections by name; the job completes with the honest regions --------

async def rogue_injects(fed: LocalFederation, round_: int, timeout: float) -> dict[str, str]:
    """Publish four dishonest partials for the open ``round_``, built from the round's
    genuine signed updates and signed with real aggregator keys. Returns what each is."""
    job = fed.job
    subjects = Subjects(job.job)
    nc = await connect(fed.nats_url, name="rogue", first_connect_timeout=10)
    js = nc.jetstream()
    try:
        reader = Messenger(nc, js, None, subjects, inline_max_bytes=1)  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout

        async def last(subject: str, want):
            """The last message on ``subject``, verified and decoded, once ``want(it)`` holds."""
            while loop.time() < deadline:
                try:
                    msg = await js.get_last_msg(await js.find_stream_name_by_subject(subject), subject)
                except Exception:
                    msg = None
                if msg is not None:
                    # A fresh verifier each time: the same message is read again while waiting.
                    got = await reader.receive(reader_verifier(fed), msg.data)
                    if want(got):
                        return got, msg.data
                await asyncio.sleep(0.05)
            raise AssertionError(f"no suitable message on {subject} in {timeout} s")

        # The current round and run, from the control stream.
        opened, _ = await last(subjects.ctl("round.open"), lambda g: g.fields.round == round_)
        run, version = opened.header.run, opened.fields.model_version
        base, _ = split_groups(opened.tensors)
        pipeline = build_worker_pipeline(job)
        updates: dict[str, SignedUpdate] = {}
        for w in WORKERS:
            region = fed.federation.get(w).region
            got, wire = await last(subjects.upd(region, w), lambda g: g.header.round == round_ and g.header.run == run)
            u = decode_update(pipeline, w, got.fields, got.tensors)
            updates[w] = SignedUpdate(w, u.num_samples, u.state, bytes(wire))
        keys = {a: Identity.load(fed.key(a)) for a in ("agg-r0", "agg-r1")}
        common = dict(job=job.job, run=run, round_=round_, base=base, base_version=version, rule=rule_for(job))
        r0 = [updates["w01"], updates["w03"]]
        attacks: dict[str, tuple[str, bytes]] = {
            # agg-r1 publishing for region r0 on agg.r0, with r0's genuine updates
            "r1_publishes_for_r0": await sign_partial(keys["agg-r1"], r0, region="r0", **common),
            # agg-r0 folding w02, a worker of r1 (its genuine signed update)
            "r0_folds_w02": await sign_partial(keys["agg-r0"], [*r0, updates["w02"]], region="r0", **common),
            # agg-r0 listing, for w01, the digest of another update than the one w01 signed
            "r0_wrong_digest": await sign_partial(keys["agg-r0"], r0, region="r0", **common,
                                                  digests=[updates["w02"].digest, updates["w03"].digest]),
        }
        # agg-r0's honest-looking partial, one byte of its body flipped after signing
        subject, wire = await sign_partial(keys["agg-r0"], r0, region="r0", **common)
        header_bytes, _, body = split_frame(wire)
        tampered = bytearray(wire)
        tampered[len(wire) - len(body) // 2] ^= 0x01
        attacks["r0_tampered"] = (subject, bytes(tampered))
        for subject, wire in attacks.values():
            assert subject == subjects.agg("r0")
            header = decode_header(split_frame(wire)[0])
            ack = await js.publish(subject, wire, headers=nats_headers(header))
            assert ack.stream == subjects.agg_stream
        return {name: decode_header(split_frame(w)[0]).sender for name, (_, w) in attacks.items()}
    finally:
        await nc.close()


def test_dishonest_partials_are_rejected_by_name_and_the_job_completes_with_the_honest_regions(nats_server, tmp_path):
    job = regional_job("e2e-regional-rogue", rounds=3, deadline_s=30.0, min_updates=4)
    fed = LocalFederation(tmp_path, nats_server.url, job, 4, regions=2, aggregators=True)
    paused = None
    try:
        fed.start_coordinator()
        fed.start_aggregator("r0")
        agg_r1 = fed.start_aggregator("r1")
        wait_until("agg-r1 started", lambda: any(e.get("event") == "aggregator.started"
                                                 for e in log_events(fed, "agg-r1")), fed, 60)
        # Hold round 1 open: r1's aggregator cannot publish until it is continued.
        os.kill(agg_r1.pid, signal.SIGSTOP)
        paused = agg_r1
        for w in WORKERS:
            fed.start_worker(w)
        senders = asyncio.run(rogue_injects(fed, 1, timeout=60))
        assert senders == {"r1_publishes_for_r0": "agg-r1", "r0_folds_w02": "agg-r0", "r0_wrong_digest": "agg-r0",
                           "r0_tampered": "agg-r0"}

        def rejected():
            seen = {(e.get("sender"), e.get("reason")) for e in log_events(fed, "coordinator")
                    if e.get("event") == "partial.rejected"}
            return seen >= {("agg-r1", "wrong_region"), ("agg-r0", "wrong_region"), ("agg-r0", "digest_mismatch")}
        wait_until("the coordinator rejecting the rogue partials", rejected, fed, 30)
        # They were judged while round 1 was open (not turned away as late, wrong_round).
        assert not any(e.get("event") == "round.closed" for e in log_events(fed, "coordinator"))
        os.kill(agg_r1.pid, signal.SIGCONT)
        paused = None
        assert fed.wait_coordinator(timeout=120) == 0, fed.tail_logs()
        fed.wait_all(timeout=30)
    finally:
        if paused is not None and paused.poll() is None:
            os.kill(paused.pid, signal.SIGCONT)
        fed.stop()

    summary = fed.summary()
    check_rounds(fed, summary)
    # Exactly the four injected partials were rejected, each by its name.
    assert summary["updates_rejected"] == {"wrong_region": 2, "digest_mismatch": 2}, summary["updates_rejected"]
    assert summary["rounds"][0]["rejected"] == {"wrong_region": 2, "digest_mismatch": 2}, summary["rounds"][0]
    details = {(e["sender"], e["reason"]): e.get("detail", "") for e in log_events(fed, "coordinator")
               if e.get("event") == "partial.rejected"}
    assert "w02" in details[("agg-r0", "wrong_region")], details
    assert "agg.r0" in details[("agg-r1", "wrong_region")], details
    # On agg.*: the honest partials, one per region and round, and the four rogue ones, which
    # the coordinator's checks still refuse when read back.
    partials = asyncio.run(judged_partials(fed))
    honest = sorted((p.header.sender, p.header.round) for p in partials if not isinstance(p, Rejection))
    assert honest == sorted((a, r) for a in ("agg-r0", "agg-r1") for r in range(1, job.rounds + 1)), honest
    refused = sorted((p.header.sender, p.reason) for p in partials if isinstance(p, Rejection))
    assert refused == [("agg-r0", "digest_mismatch"), ("agg-r0", "digest_mismatch"), ("agg-r0", "wrong_region"),
                       ("agg-r1", "wrong_region")], refused
    check_models_equal_flat_fedavg(fed)


# ---- acceptance 4: an aggregator SIGKILLed mid-round and restarted ----------------------

async def stream_state(fed: LocalFederation) -> dict:
    """Where r0 stands: the round of w01's last update, the round of r0's and r1's last
    partials, and the pending counts of the aggregators' and coordinator's consumers."""
    subjects = Subjects(fed.job.job)
    nc = await connect(fed.nats_url, name="watcher", first_connect_timeout=10)
    js = nc.jetstream()
    out: dict = {}
    try:
        for key, subject in (("w01", subjects.upd("r0", "w01")), ("w03", subjects.upd("r0", "w03")),
                             ("agg_r0", subjects.agg("r0")),
                             ("agg_r1", subjects.agg("r1"))):
            try:
                stream = await js.find_stream_name_by_subject(subject)
                h = decode_header(split_frame((await js.get_last_msg(stream, subject)).data)[0])
                out[key] = h.round
            except Exception:
                out[key] = 0
        # (the stream that holds a subject: one per region's updates, or one for all, by layout)
        for key, subject, durable in (("r0_ack_pending", subjects.upd("r0", "w01"), "aggregator-r0"),
                                      ("r1_ack_pending", subjects.upd("r1", "w02"), "aggregator-r1"),
                                      ("coord_ack_pending", subjects.agg("r0"), "coordinator-partials")):
            try:
                info = await js.consumer_info(await js.find_stream_name_by_subject(subject), durable)
                out[key] = info.num_ack_pending
                out[key.replace("ack_pending", "pending")] = info.num_pending
            except Exception:
                out[key] = None
    finally:
        await nc.close()
    return out


def test_aggregator_sigkilled_mid_round_and_restarted_loses_and_double_counts_nothing(nats_server, tmp_path):
    # Deadline 20 s: the restarted aggregator gets w01's held update back after the ack
    # wait (10 s) and still closes before the deadline's margin (2 s). min_updates 2: the
    # quorum policy would let the coordinator close on r1 alone (it must not need to).
    job = regional_job("e2e-regional-kill", rounds=3, deadline_s=20.0, min_updates=2)
    fed = LocalFederation(tmp_path, nats_server.url, job, 4, regions=2, aggregators=True)
    try:
        fed.start_coordinator()
        agg_r0 = fed.start_aggregator("r0")
        fed.start_aggregator("r1")
        for w in WORKERS:
            # w03 is a straggler (~100x its training time): r0 holds w01's update for a while each round.
            fed.start_worker(w, *(("--simulate-slowdown", "100") if w == "w03" else ()))
        wait_for_round(fed, 1, timeout=90)

        # Round 2 is open and agg-r0 holds w01's round-2 update unacknowledged; no r0 partial yet.
        def holding():
            s = asyncio.run(stream_state(fed))
            return s if s["w01"] == 2 and s["agg_r0"] == 1 and (s["r0_ack_pending"] or 0) >= 1 else None
        before = wait_until("agg-r0 holding w01's round-2 update", holding, fed, 30, step=0.02)
        agg_r0.kill()  # SIGKILL
        agg_r0.wait(timeout=10)
        killed_at = time.monotonic()
        after_kill = asyncio.run(stream_state(fed))
        assert after_kill["agg_r0"] == 1, ("r0's round-2 partial went out before the kill", before, after_kill)

        # Meanwhile r1 proceeds: its round-2 partial is published, its updates acknowledged, and
        # the coordinator accepted it (holds it unacknowledged until round 2 commits).
        def r1_in():
            s = asyncio.run(stream_state(fed))
            return s if s["agg_r1"] == 2 and s["r1_ack_pending"] == 0 and s["coord_ack_pending"] == 1 else None
        r1_state = wait_until("r1's round-2 partial accepted while agg-r0 is down", r1_in, fed, 15)
        assert r1_state["agg_r0"] == 1 and fed.group.procs["agg-r0"].poll() is not None
        assert not any(e.get("event") == "round.closed" and e.get("round") == 2
                       for e in log_events(fed, "coordinator"))
        # The straggler's round-2 update lands while agg-r0 is down: the restarted aggregator
        # finds it already stored (delivered at once), and w01's only after the ack wait.
        wait_until("w03's round-2 update stored", lambda: asyncio.run(stream_state(fed))["w03"] == 2, fed, 15)

        fed.start_aggregator("r0", name="agg-r0-restarted")
        assert fed.wait_coordinator(timeout=90) == 0, fed.tail_logs()
        recovered_s = time.monotonic() - killed_at
        fed.wait_all(timeout=30)
        end = asyncio.run(stream_state(fed))
    finally:
        fed.stop()

    summary = fed.summary()
    check_rounds(fed, summary)
    assert summary["updates_rejected"] == {}, summary["updates_rejected"]
    # r0 published exactly one partial per round (none twice after the restart), with its own
    # two workers and the very digests they signed.
    partials = asyncio.run(judged_partials(fed))
    assert not [p for p in partials if isinstance(p, Rejection)], partials
    updates = all_updates(fed)
    digest_of = {(u.header.sender, u.header.round): u.header.digest for u in updates}
    assert len(digest_of) == len(updates) == 4 * job.rounds  # one update per worker and round
    per_round = sorted((p.header.sender, p.header.round) for p in partials)
    assert per_round == sorted((a, r) for a in ("agg-r0", "agg-r1") for r in range(1, job.rounds + 1)), per_round
    for p in partials:
        region = p.fields.region
        assert p.header.sender == f"agg-{region}"
        # The coordinator's own check of the partial and its proofs, again.
        _, contributors, _ = verified_partial(fed.federation, job.job, summary["run"], p, region)
        assert sorted(w for w, _, _ in contributors) == sorted(
            w for w in WORKERS if fed.federation.get(w).region == region)
        assert all(d == digest_of[(w, p.header.round)] for w, d, _ in contributors), p.header.round
    # The restarted aggregator found its round-1 partial, finished round 2 and acknowledged everything.
    restarted = log_events(fed, "agg-r0-restarted")
    assert any(e.get("event") == "aggregator.found_published" and e.get("round") == 1 for e in restarted), restarted
    assert [e["round"] for e in restarted if e.get("event") == "partial.published"] == [2, 3]
    assert end["r0_ack_pending"] == 0 and end["r0_pending"] == 0, end
    assert end["r1_ack_pending"] == 0 and end["r1_pending"] == 0, end
    print(f"agg-r0 killed in round 2 holding {before['r0_ack_pending']} update(s); job done {recovered_s:.1f} s "
          f"after the kill; round seconds {summary['round_seconds']}")
    check_models_equal_flat_fedavg(fed)

