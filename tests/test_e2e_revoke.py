"""A worker revoked mid-job with `fedbus keys revoke`, on a real nats-server with the
coordinator and workers as CLI processes (issue 10, acceptance point 3).

* After the command returns, messages signed with the revoked key (the test holds it, as
  an attacker who stole it would) are rejected by the running coordinator as
  ``revoked_sender`` within one heartbeat interval; the revoked worker itself stops
  cleanly (exit code 4, ``worker.revoked``).
* Nothing restarts: the coordinator and the other workers keep their PIDs and the job
  goes on without the revoked worker.
* The coordinator is then SIGKILLed and resumed: before it trusts anything it replays the
  key event from the control stream, so the revoked key is still refused, and the job
  completes.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest

from fedbus.bus import Subjects, connect
from fedbus.crypto.keys import Identity
from fedbus.demo import cli_command
from fedbus.keywatch import REVOKED_EXIT_CODE
from fedbus.messaging import Messenger
from fedbus.protocol.messages import Heartbeat, Update
from tests.e2e_support import LocalFederation, small_job, wait_for_round

pytestmark = pytest.mark.e2e

REVOKED = "w04"
STRAGGLER = "w05"  # trains 1000x slower: never reports, so every round lasts exactly its deadline
DEADLINE_S = 1.2
# ~30 s of rounds: the job is still running after the revoke (the CLI alone takes seconds
# to start) and after the crash and resume.
ROUNDS = 20


def log_events(path: Path, event: str) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if f'"{event}"' in line:
            record = json.loads(line)
            if record.get("event") == event:
                out.append(record)
    return out


def first_revoked_rejection(path: Path) -> dict | None:
    for kind in ("heartbeat", "update"):
        for record in log_events(path, f"{kind}.rejected"):
            if record.get("reason") == "revoked_sender" and record.get("sender") == REVOKED:
                return record
    return None


def logged_at(record: dict) -> float:
    return datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00")).timestamp()


async def send_as_revoked(fed: LocalFederation, log: Path, timeout: float) -> dict:
    """Heartbeats and an update signed with the revoked key, every 50 ms, until the
    coordinator whose log is ``log`` rejected one as revoked_sender (bounded)."""
    subjects = Subjects(fed.job.job)
    nc = await connect(fed.nats_url, name="revoked-key-holder", first_connect_timeout=10)
    messenger = Messenger(nc, nc.jetstream(), Identity.load(fed.key(REVOKED)), subjects, inline_max_bytes=512 * 1024)
    deadline = time.monotonic() + timeout
    try:
        sent_update = False
        while time.monotonic() < deadline:
            await messenger.publish(subjects.hb(REVOKED), Heartbeat(num_samples=50, partition=3), round=0,
                                    persist=False)
            if not sent_update:
                # Refused on the sender before the body is looked at: no tensors needed.
                await messenger.publish(subjects.upd("default", REVOKED), Update(
                    round=1, base_version=0, num_samples=1, num_steps=1), {}, round=1)
                sent_update = True
            found = first_revoked_rejection(log)
            if found is not None:
                return found
            await asyncio.sleep(0.05)
    finally:
        await nc.close()
    raise AssertionError(f"no revoked_sender rejection of {REVOKED} in {log.name} within {timeout} s")


def test_a_worker_revoked_mid_job_is_refused_at_once_and_after_a_coordinator_restart(nats_server, tmp_path):
    job = small_job("e2e-revoke", rounds=ROUNDS, min_workers=5, min_updates=2, deadline_s=DEADLINE_S,
                    evaluation={"final_round": False})
    heartbeat_s = job.transport.heartbeat_s
    fed = LocalFederation(tmp_path, nats_server.url, job, 5)
    logs = tmp_path / "logs"
    try:
        coordinator = fed.start_coordinator()
        workers = {w.id: fed.start_worker(w.id, *(("--simulate-slowdown", "1000") if w.id == STRAGGLER else ()))
                   for w in fed.federation.workers()}
        wait_for_round(fed, 2, timeout=120)

        revoke = subprocess.run(cli_command(
            "keys", "revoke", "--federation", str(tmp_path / "federation.yaml"), "--job", str(tmp_path / "job.yaml"),
            "--key", str(fed.key("coordinator")), "--nats", fed.nats_url, "--participant", REVOKED,
            "--reason", "site compromised"), capture_output=True, text=True, timeout=60)
        returned = time.time()
        assert revoke.returncode == 0, revoke.stderr
        rejection = asyncio.run(send_as_revoked(fed, logs / "coordinator.log", timeout=10 * heartbeat_s))
        delay = logged_at(rejection) - returned
        print(f"revoked_sender {delay:.3f} s after `fedbus keys revoke` returned (heartbeat interval {heartbeat_s} s)")
        assert delay <= heartbeat_s, rejection

        # The revoked worker stops by itself, cleanly and saying why.
        assert workers[REVOKED].wait(timeout=30) == REVOKED_EXIT_CODE, fed.tail_logs()
        assert log_events(logs / f"{REVOKED}.log", "worker.revoked"), fed.tail_logs()
        # Nothing else stopped or restarted: same processes, still running.
        assert coordinator.poll() is None and all(p.poll() is None for w, p in workers.items() if w != REVOKED)
        pids = {w: p.pid for w, p in workers.items() if w != REVOKED}
        last_before_kill = max(r["round"] for r in log_events(logs / "coordinator.log", "round.closed"))
        wait_for_round(fed, last_before_kill + 1, timeout=60)  # the job goes on without it
        assert coordinator.poll() is None and coordinator.pid == fed.group.procs["coordinator"].pid

        # Crash and resume: the new coordinator replays the key event before trusting anything.
        coordinator.kill()
        coordinator.wait()
        fed.group.start("coordinator-resumed", cli_command(
            "coordinator", "--job", str(tmp_path / "job.yaml"), "--federation", str(tmp_path / "federation.yaml"),
            "--key", str(fed.key("coordinator")), "--nats", fed.nats_url, "--run-dir", str(tmp_path), "--resume"))
        resumed_log = logs / "coordinator-resumed.log"
        deadline = time.monotonic() + 60
        while not log_events(resumed_log, "coordinator.started"):
            assert time.monotonic() < deadline, fed.tail_logs()
            time.sleep(0.05)
        assert log_events(resumed_log, "keys.synced")[0]["events"] == 1
        asyncio.run(send_as_revoked(fed, resumed_log, timeout=10 * heartbeat_s))

        resumed = fed.group.procs["coordinator-resumed"]
        assert resumed.wait(timeout=120) == 0, fed.tail_logs()
        assert {w: workers[w].pid for w in pids} == pids
        # (The straggler is still stretching its training when the job ends; fed.stop() ends it.)
        assert all(workers[w].wait(timeout=30) == 0 for w in pids if w != STRAGGLER), fed.tail_logs()
    finally:
        fed.stop()

    summary = fed.summary()
    assert summary["reason"] == "completed" and summary["rounds_completed"] == ROUNDS, summary
    assert summary["incarnations"] == 2
    assert summary["updates_rejected"].get("revoked_sender", 0) >= 2, summary["updates_rejected"]  # both coordinators
    # Once the revocation was applied, no round the coordinator closed accepted the revoked worker.
    revoked_at = log_events(logs / "coordinator.log", "keys.applied")
    assert revoked_at and revoked_at[0]["participant"] == REVOKED
    later = [r for r in summary["rounds"] if r["round"] > last_before_kill + 1]  # opened after the revocation
    assert later and all(REVOKED not in r.get("accepted_workers", []) for r in later), later
