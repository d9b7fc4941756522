"""A coordinator killed mid-round loses nothing: `fedbus coordinator --resume` continues
from the last committed round, and the updates that were waiting in the stream are
aggregated into the round they were sent for. Then `fedbus audit verify` passes on the
run, and names the record after one is altered, re-signed or removed.

The test process plays w04, a listed worker: it reports in round 1 and withholds the
first time round 2 opens, so round 2 stays open holding three honest updates,
unacknowledged because their round is not committed. Then the coordinator is SIGKILLed
and restarted with --resume; it reopens round 2 with its committed cohort, w04 now
reports, and round 2 can only close with four updates if the three others came back:
held in the stream and redelivered, or resent by the workers that see round 2 reopen.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
from dataclasses import replace

import pytest

from fedbus.bus import Subjects, connect, ensure_job_infrastructure
from fedbus.crypto.envelopes import Rejection
from fedbus.crypto.keys import Identity
from fedbus.demo import cli_command
from fedbus.messaging import Messenger, verifier_for
from fedbus.protocol.envelope import frame, split_frame
from fedbus.protocol.messages import Heartbeat, RoundOpen, Update
from tests import audit_support
from tests.e2e_support import LocalFederation, small_job

pytestmark = pytest.mark.e2e



class Withholder:
    """w04: heartbeats throughout; withholds only the first time round 2 opens."""

    def __init__(self, fed: LocalFederation):
        self.fed = fed
        self.subjects = Subjects(fed.job.job)
        self.me = Identity.load(fed.key("w04"))

    async def run(self, crash_and_resume) -> None:
        nc = await connect(self.fed.nats_url, name="w04", first_connect_timeout=10)
        js = nc.jetstream()
        await ensure_job_infrastructure(js, self.subjects)
        messenger = Messenger(nc, js, self.me, self.subjects, inline_max_bytes=512 * 1024)
        verifier = verifier_for(self.fed.job, self.fed.federation)
        control: asyncio.Queue = asyncio.Queue()
        await js.subscribe(self.subjects.ctl("round.open"), ordered_consumer=True, cb=control.put)
        await js.subscribe(self.subjects.ctl("job.done"), ordered_consumer=True, cb=control.put)

        async def beat() -> None:
            while True:
                await messenger.publish(self.subjects.hb("w04"), Heartbeat(num_samples=50, partition=3),
                                        round=0, persist=False)
                await asyncio.sleep(0.5)

        beating = asyncio.create_task(beat())
        withheld = False
        try:
            while True:
                msg = await asyncio.wait_for(control.get(), 180)
                if msg.subject.endswith("job.done"):
                    return
                try:
                    got = await messenger.receive(verifier, msg.data)
                except Rejection:  # e.g. an ordered consumer's redelivery after a reset
                    continue
                ro: RoundOpen = got.fields  # type: ignore[assignment]
                assert "w04" in ro.cohort
                if ro.round == 2 and not withheld:
                    withheld = True
                    await self._wait_for_held_updates(js, 3)
                    await asyncio.to_thread(crash_and_resume)
                    continue
                await messenger.publish(self.subjects.upd("default", "w04"),
                                        Update(round=ro.round, base_version=ro.model_version, num_samples=50,
                                               num_steps=1), got.tensors, round=ro.round, run=got.header.run)
        finally:
            beating.cancel()
            await nc.close()

    async def _wait_for_held_updates(self, js, count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = await js.consumer_info(self.subjects.upd_stream, "coordinator-updates")
            if info.num_ack_pending >= count:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"the coordinator never held {count} unacknowledged updates")


def test_coordinator_crash_mid_round_resumes_without_losing_updates(nats_server, tmp_path):
    # No final evaluation phase: w04 (this test) would never answer it.
    job = small_job("e2e-resume", rounds=4, min_workers=4, min_updates=3, deadline_s=60.0,
                    evaluation={"final_round": False})
    fed = LocalFederation(tmp_path, nats_server.url, job, 4)

    def crash_and_resume() -> None:
        coordinator = fed.group.procs["coordinator"]
        coordinator.kill()  # SIGKILL, mid-round 2
        coordinator.wait()
        # As if the kill had come between version 1's commit and its manifest write.
        assert asyncio.run(drop_manifest(fed, 1)), "version 1 had no manifest before the kill"
        fed.group.start("coordinator-resumed", cli_command(
            "coordinator", "--job", str(tmp_path / "job.yaml"), "--federation", str(tmp_path / "federation.yaml"),
            "--key", str(fed.key("coordinator")), "--nats", fed.nats_url, "--run-dir", str(tmp_path), "--resume"))

    try:
        fed.start_coordinator()
        for w in ("w01", "w02", "w03"):
            fed.start_worker(w)
        asyncio.run(Withholder(fed).run(crash_and_resume))
        resumed = fed.group.procs["coordinator-resumed"]
        assert resumed.wait(timeout=180) == 0, fed.tail_logs()
    finally:
        fed.stop()

    summary = fed.summary()
    assert summary["reason"] == "completed", fed.tail_logs()
    assert summary["resumed_from_round"] == 1
    assert summary["rounds_completed"] == 4 and summary["model_version"] == 4
    # One summary for the whole run: round 1 from the first coordinator, the rest from the resumed one.
    assert summary["incarnations"] == 2 and [r["round"] for r in summary["rounds"]] == [1, 2, 3, 4]
    second = summary["rounds"][1]
    # Round 2 was reopened with its committed cohort and closed after the restart with all
    # four updates: w04's, and the three the workers had sent to the dead coordinator (held
    # in the stream and redelivered, or resent by the workers on the reopened round; an
    # identical second copy is ignored, not rejected).
    assert second["status"] == "aggregated" and second["accepted"] == 4, summary["rounds"]
    assert [r["accepted"] for r in summary["rounds"]] == [4, 4, 4, 4]
    assert summary["updates_accepted"] == 16  # committed rounds only: the uncommitted round 2 is not counted twice
    assert summary["updates_rejected"] == {}  # none of the redeliveries or resends was turned away
    assert summary["final_accuracy"] > 0.8
    log = (tmp_path / "logs" / "coordinator-resumed.log").read_text()
    assert '"coordinator.resumed"' in log

    # Resuming the finished job does nothing but announce its end again (as if a kill had
    # come between committing the end and announcing it): exit 0, its results untouched.
    assert asyncio.run(job_done_messages(fed, purge=True)) == 1
    before = {name: (tmp_path / name).read_bytes() for name in ("summary.json", "final_model.pt")}
    again = subprocess.run(cli_command(
        "coordinator", "--job", str(tmp_path / "job.yaml"), "--federation", str(tmp_path / "federation.yaml"),
        "--key", str(fed.key("coordinator")), "--nats", fed.nats_url, "--run-dir", str(tmp_path), "--resume"),
        capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "coordinator.already_done" in again.stdout + again.stderr
    assert "job.done.announced_again" in again.stdout + again.stderr
    assert asyncio.run(job_done_messages(fed)) == 1  # the workers' exit is announced again
    assert {name: (tmp_path / name).read_bytes() for name in before} == before

    # The resumed coordinator wrote version 1's lost manifest again, from its committed
    # record: signed, the committed model's digest, who was folded (their update digests
    # were only in the dead process's memory: unknown).
    recovered = asyncio.run(read_manifest(fed, 1))
    assert recovered.kind == "aggregated" and recovered.parent_version == 0 and recovered.round == 1
    assert sorted(c.participant for c in recovered.contributors) == ["w01", "w02", "w03", "w04"]
    assert {c.update_digest for c in recovered.contributors} == {""}
    assert all(c.update_digest for c in asyncio.run(read_manifest(fed, 2)).contributors)
    assert '"model.manifest_recovered"' in log

    check_audit_and_tampering(fed)


async def job_done_messages(fed: LocalFederation, purge: bool = False) -> int:
    """How many job.done announcements the control stream holds (after purging them)."""
    subjects = Subjects(fed.job.job)
    nc = await connect(fed.nats_url, name="job-done-check", first_connect_timeout=10)
    try:
        js = nc.jetstream()
        subject = subjects.ctl("job.done")
        info = await js.stream_info(subjects.ctl_stream, subjects_filter=subject)
        count = (info.state.subjects or {}).get(subject, 0)
        if purge:
            await js.purge_stream(subjects.ctl_stream, subject=subject)
        return count
    finally:
        await nc.close()


async def drop_manifest(fed: LocalFederation, version: int) -> bool:
    from fedbus.bus.layout import REGISTRY_BUCKET

    nc = await connect(fed.nats_url, name="drop-manifest", first_connect_timeout=10)
    try:
        kv = await nc.jetstream().key_value(REGISTRY_BUCKET)
        key = f"{fed.job.job}.v.{version}"
        had = (await kv.get(key)).value is not None
        await kv.delete(key)
        return had
    finally:
        await nc.close()


async def read_manifest(fed: LocalFederation, version: int):
    from fedbus.registry.store import ModelRegistry

    nc = await connect(fed.nats_url, name="read-manifest", first_connect_timeout=10)
    try:
        return await ModelRegistry(nc.jetstream(), fed.job.job, fed.federation).manifest(version)
    finally:
        await nc.close()


def check_audit_and_tampering(fed: LocalFederation) -> None:
    """`fedbus audit verify` passes on the whole run, crash and resume included (one
    coordinator chain over both incarnations, one chain per worker), and names the record
    after any one record is altered, re-signed with another participant's key or removed."""
    url, job, fed_file = fed.nats_url, fed.job.job, fed.run_dir / "federation.yaml"
    subjects = Subjects(job)
    clean = audit_support.verify_cli(url, job, fed_file)
    assert clean.returncode == 0 and clean.stdout.startswith("audit OK"), clean.stdout + clean.stderr
    chains = dict(re.findall(r"[(,] ?([\w-]+) (\d+)", clean.stdout))
    assert set(chains) == {"coordinator", "w01", "w02", "w03"}, clean.stdout
    messages = audit_support.read(url, subjects)
    assert [m.seq for m in messages] == list(range(1, len(messages) + 1))
    mine = [(m, audit_support.record_of(m)) for m in messages if m.subject == subjects.audit_of("coordinator")]
    assert [r["seq"] for _, r in mine] == list(range(1, len(mine) + 1))
    events = [r["event"] for _, r in mine]
    assert events.count("job.started") == 1 and events.count("job.resumed") == 1 and events[-1] == "job.done"
    # The close of round 2, audited by the resumed coordinator, followed by more of its records.
    target, record = next((m, r) for m, r in mine if r["event"] == "round.closed" and r["round"] == 2)
    at = messages.index(target)

    audit_support.rebuild(url, subjects, messages)  # the control: rebuilt unchanged, it still verifies
    assert audit_support.verify_cli(url, job, fed_file).returncode == 0

    header, signature, _ = split_frame(target.data)
    altered = json.dumps({**record, "accepted": record["accepted"][:-1]}, sort_keys=True,
                         separators=(",", ":")).encode()
    resigned = frame(bytes(header), Identity.load(fed.key("w01")).sign(bytes(header)), split_frame(target.data)[2])
    cases = {"altered": ([*messages[:at], replace(target, data=frame(bytes(header), signature, altered)),
                          *messages[at + 1:]], None, f"stream sequence {target.seq}, writer coordinator: altered"),
             "re-signed": ([*messages[:at], replace(target, data=resigned), *messages[at + 1:]], None,
                           f"stream sequence {target.seq}, writer coordinator: wrong_signer: signed by 'w01'"),
             "removed": (messages, target.seq, f"stream sequence {target.seq}: removed")}
    for case, (content, delete_seq, named) in cases.items():
        audit_support.rebuild(url, subjects, content, delete_seq=delete_seq)
        out = audit_support.verify_cli(url, job, fed_file)
        assert out.returncode == 1, (case, out.stdout, out.stderr)
        assert f"first broken record: {named}" in out.stdout, (case, out.stdout)
        # The coordinator's next record shows the same break from inside its chain.
        assert f"writer coordinator, record {record['seq'] + 1}: sequence_gap" in out.stdout, (case, out.stdout)
