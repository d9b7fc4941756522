"""Key events over a real nats-server: `fedbus keys rotate|revoke` (the CLI, as a process)
publish them, a running KeyWatch applies them at once, a restarted one replays them, and
a new coordinator run's purge of the control stream keeps them."""

from __future__ import annotations

import asyncio
import subprocess
import time

import pytest

from fedbus.bus import Subjects, connect, ensure_job_infrastructure, publish_with_retry
from fedbus.bus.layout import purge_stream_except
from fedbus.crypto.envelopes import Rejection, seal
from fedbus.crypto.federation import Federation, FederationFile, Participant
from fedbus.crypto.keys import Identity
from fedbus.demo import cli_command
from fedbus.keywatch import KeyWatch, keys_subject, publish_key_event
from fedbus.messaging import nats_headers, verifier_for
from fedbus.protocol.messages import Heartbeat, KeyEvent, encode_body
from tests.e2e_support import small_job

pytestmark = pytest.mark.e2e

JOB = "keys-bus"
APPLY_TIMEOUT_S = 10.0


def heartbeat(identity: Identity) -> bytes:
    wire, _ = seal(identity, "heartbeat", job=JOB, round=0, body=encode_body(Heartbeat(num_samples=1, partition=0)))
    return wire


def verdict(federation: Federation, job, wire: bytes) -> str:
    try:
        verifier_for(job, federation).open(wire)
    except Rejection as rej:
        return rej.reason
    return "ok"


def keys_cli(action: str, tmp_path, nats_url: str, signer: str, participant: str, *extra: str):
    return subprocess.run(
        cli_command("keys", action, "--federation", str(tmp_path / "federation.yaml"), "--job",
                    str(tmp_path / "job.yaml"), "--key", str(tmp_path / f"{signer}.key"), "--nats", nats_url,
                    "--participant", participant, *extra),
        capture_output=True, text=True, timeout=60)


async def until(predicate, timeout: float) -> float:
    """Seconds until ``predicate()`` held (bounded)."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


def test_rotate_and_revoke_reach_a_running_process_and_survive_its_restart(nats_server, tmp_path):
    ids = {i.id: i for i in (Identity.generate("coord", "coordinator"), Identity.generate("ops", "operator"),
                             Identity.generate("w1", "worker"), Identity.generate("w2", "worker"))}
    for ident in ids.values():
        ident.save(tmp_path / f"{ident.id}.key")
    Federation(FederationFile(participants=[Participant(**i.participant_entry()) for i in ids.values()])).dump(
        tmp_path / "federation.yaml")
    job = small_job(JOB, rounds=1, min_workers=1, min_updates=1)
    job.dump(tmp_path / "job.yaml")
    new_w1 = Identity.generate("w1", "worker")
    new_w1.save(tmp_path / "w1-new.key")
    subjects = Subjects(JOB)

    async def scenario() -> None:
        nc = await connect(nats_server.url, name="keys-test", first_connect_timeout=10)
        js = nc.jetstream()
        await ensure_job_infrastructure(js, subjects)
        live = Federation.load(tmp_path / "federation.yaml")
        watch = KeyWatch(js, subjects, live, job.security)
        await watch.start()
        assert watch.synced and watch.applied == 0

        # Rotation through the CLI: the running process applies it without a restart.
        done = await asyncio.to_thread(keys_cli, "rotate", tmp_path, nats_server.url, "ops", "w1",
                                       "--new-key", str(tmp_path / "w1-new.key"), "--reason", "yearly rotation")
        assert done.returncode == 0, done.stderr
        await until(lambda: watch.applied == 1, APPLY_TIMEOUT_S)
        assert verdict(live, job, heartbeat(ids["w1"])) == "bad_signature"  # the old key is refused
        assert verdict(live, job, heartbeat(new_w1)) == "ok"  # the new one accepted

        # A worker cannot sign key events: if one publishes one by hand, every process refuses it
        # (counted by name; nothing changes).
        forged, header = seal(ids["w2"], KeyEvent.TYPE, job=JOB, round=0,
                              body=encode_body(KeyEvent(action="revoke", participant="w1")))
        await publish_with_retry(js, keys_subject(subjects), forged, headers=nats_headers(header))
        await until(lambda: watch.ledger.totals["role_not_allowed"] == 1, APPLY_TIMEOUT_S)
        assert not live.get("w1").revoked

        # Revocation through the CLI, signed by the coordinator.
        done = await asyncio.to_thread(keys_cli, "revoke", tmp_path, nats_server.url, "coord", "w2",
                                       "--reason", "compromised")
        assert done.returncode == 0, done.stderr
        await until(lambda: live.get("w2").revoked, APPLY_TIMEOUT_S)
        assert verdict(live, job, heartbeat(ids["w2"])) == "revoked_sender"

        # A new coordinator run purges the control stream but keeps the key events.
        await publish_with_retry(js, subjects.ctl("round.open"), b"junk")
        await purge_stream_except(js, subjects.ctl_stream, keep=keys_subject(subjects))
        info = await js.stream_info(subjects.ctl_stream, subjects_filter=">")
        assert set(info.state.subjects) == {keys_subject(subjects)}

        # A restarted process (a fresh federation from the same file) replays both before start() returns.
        restarted = Federation.load(tmp_path / "federation.yaml")
        assert verdict(restarted, job, heartbeat(ids["w2"])) == "ok"  # the file alone knows nothing
        replay = KeyWatch(js, subjects, restarted, job.security)
        await replay.start()
        assert replay.applied == 2
        assert verdict(restarted, job, heartbeat(ids["w2"])) == "revoked_sender"
        assert verdict(restarted, job, heartbeat(ids["w1"])) == "bad_signature"
        assert verdict(restarted, job, heartbeat(new_w1)) == "ok"
        # The operator, rotated itself, signs with its new key from then on.
        new_ops = Identity.generate("ops", "operator")
        await publish_key_event(js, subjects, ids["ops"], KeyEvent(
            action="rotate", participant="ops", old_key=restarted.get("ops").public_key,
            new_key=Participant(**new_ops.participant_entry()).public_key))
        await until(lambda: replay.applied == 3 and watch.applied == 3, APPLY_TIMEOUT_S)
        await publish_key_event(js, subjects, ids["ops"], KeyEvent(action="revoke", participant="w1"))
        await until(lambda: watch.ledger.totals["bad_signature"] == 1, APPLY_TIMEOUT_S)
        assert not live.get("w1").revoked
        for w in (watch, replay):
            await w.stop()
        await nc.close()

    asyncio.run(scenario())
