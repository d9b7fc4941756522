"""End to end under `fedbus nats config`: a real nats-server with mutual TLS and the generated
least-privilege users; coordinator and workers are CLI processes with their own client
certificates. While the job runs, a worker's own credentials are turned against the
federation, and the server itself refuses every attempt."""

from __future__ import annotations

import asyncio
import os

import nats.errors
import pytest
import yaml

from fedbus.bus import EmbeddedNatsServer, NatsCredentials, Subjects, connect
from fedbus.bus.natsconfig import TlsFiles, security_section
from fedbus.bus.permissions import JobScope
from tests.e2e_support import LocalFederation, small_job, wait_for_round
from tests.tls_support import make_pki

pytestmark = pytest.mark.e2e

MARK = b"fedbus-secured-e2e-forgery-" + os.urandom(8).hex().encode()
REFUSAL_WAIT_S = 3.0


def credentials_args(pki, participant_id: str) -> list[str]:
    cert, key = pki.client(participant_id)
    return ["--tlsca", str(pki.ca), "--tlscert", str(cert), "--tlskey", str(key)]


def credentials_of(pki, participant_id: str) -> NatsCredentials:
    cert, key = pki.client(participant_id)
    return NatsCredentials(ca=pki.ca, cert=cert, key=key)


async def attack_as_w01(url: str, pki, s: Subjects) -> dict[str, list[str]]:
    """With w01's certificate: forge w02's update, publish a control event, read w02's update
    (core subscription, a consumer on the update stream, message get, everyone's inbox).
    Returns, per attempt, the permission violations the server reported."""
    violations: list[str] = []

    async def on_error(err: Exception) -> None:
        if "permissions violation" in str(err).lower():
            violations.append(str(err))

    nc = await connect(url, "attacker-w01", credentials=credentials_of(pki, "w01"), participant="w01",
                       first_connect_timeout=10, error_cb=on_error, allow_reconnect=False)
    js = nc.jetstream(timeout=REFUSAL_WAIT_S)
    seen: dict[str, list[str]] = {}
    received: list[bytes] = []

    async def got(msg) -> None:
        received.append(msg.data)

    async def attempt(name: str, action) -> None:
        before = len(violations)
        try:
            await action()
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError, asyncio.TimeoutError):
            pass  # a refused request gets no answer; the violation arrives on error_cb
        except Exception as exc:  # noqa: BLE001 - any other failure is fine too, but must be a refusal
            violations.append(f"raised {exc!r}")
        await nc.flush()
        await asyncio.sleep(0.3)
        seen[name] = violations[before:]

    await attempt("forge_update", lambda: js.publish(s.upd("default", "w02"), MARK))
    await attempt("publish_control", lambda: nc.publish(s.ctl("round.open"), MARK))
    await attempt("subscribe_updates", lambda: nc.subscribe(s.upd_all, cb=got))
    await attempt("subscribe_inboxes", lambda: nc.subscribe("_INBOX.>", cb=got))
    await attempt("consume_updates", lambda: js.add_consumer(s.upd_stream, name="w01-spy",
                                                             filter_subject=s.upd("default", "w02")))
    await attempt("get_update", lambda: js.get_last_msg(s.upd_stream, s.upd("default", "w02")))
    await attempt("read_blobs", lambda: js.object_store("fedbus-blobs"))
    await asyncio.sleep(1.0)  # anything a forbidden subscription would have delivered
    seen["received"] = [m[:40].decode(errors="replace") for m in received]
    await nc.close()
    return seen


async def stored_marks(url: str, pki, s: Subjects) -> int:
    """How many messages in the control and update streams carry the forgery mark (as the
    coordinator, the streams' administrator)."""
    nc = await connect(url, "auditor", credentials=credentials_of(pki, "coordinator"), participant="coordinator",
                       first_connect_timeout=10)
    js = nc.jetstream()
    found = 0
    for stream in (s.ctl_stream, s.upd_stream):
        last = (await js.stream_info(stream)).state.last_seq
        for seq in range(1, last + 1):
            try:
                msg = await js.get_msg(stream, seq=seq)
            except Exception:  # noqa: BLE001 - purged or deleted
                continue
            found += MARK in (msg.data or b"")
    await nc.close()
    return found


def test_job_completes_under_generated_mtls_config_and_server_refuses_a_workers_abuse(tmp_path):
    job = small_job("secured", rounds=3, min_workers=2, min_updates=2)
    # Bodies above 8 KiB go out of line, so both large-body paths run under the permissions:
    # updates as claim checks (workers write the blob bucket, never read it) and round.open
    # by reference to the committed model (workers read the models bucket). The digits MLP
    # (~38 KiB) is above that: a round.open carrying it in a blob would not reach them.
    job = job.model_copy(update={"transport": job.transport.model_copy(update={"inline_max_bytes": 8 * 1024})})
    ids = ["coordinator", "w01", "w02"]
    pki = make_pki(tmp_path / "certs", ids)
    fed = LocalFederation(tmp_path, "", job, 2, credentials_of=lambda pid: credentials_args(pki, pid))
    scopes = [JobScope(job.job, job.transport.prefix)]
    section = security_section(fed.federation, scopes, auth="mtls",
                               tls=TlsFiles(str(pki.server_cert), str(pki.server_key), str(pki.ca)))
    server = EmbeddedNatsServer(store_dir=tmp_path / "nats-store", extra_config=section).start()
    fed.nats_url = server.url
    s = Subjects(job.job, prefix=job.transport.prefix)
    try:
        fed.start_coordinator()
        fed.start_worker("w01")
        fed.start_worker("w02")
        wait_for_round(fed, 1, timeout=120)
        seen = asyncio.run(attack_as_w01(server.url, pki, s))
        assert fed.wait_coordinator(timeout=180) == 0, fed.tail_logs()
        codes = fed.wait_all(timeout=30)
        marks = asyncio.run(stored_marks(server.url, pki, s))
        server_log = server.log_file.read_text(errors="replace") if server.log_file else ""
    finally:
        fed.stop()
        server.stop()

    for attempt in ("forge_update", "publish_control", "subscribe_updates", "subscribe_inboxes", "consume_updates",
                    "get_update", "read_blobs"):
        assert seen[attempt], f"{attempt} was not refused by the server: {seen}"
        assert all("permissions violation" in v.lower() for v in seen[attempt]), seen[attempt]
    assert seen["received"] == [], "a forbidden subscription delivered messages"
    assert marks == 0, "a refused message landed in a stream"

    assert all(code == 0 for code in codes.values()), (codes, fed.tail_logs())
    summary = fed.summary()
    assert summary["reason"] == "completed"
    assert summary["rounds_completed"] == 3
    assert summary["updates_accepted"] == 6
    # The legitimate participants never hit their own permissions.
    legit = [line for line in server_log.splitlines() if "Permissions Violation" in line
             and "attacker-w01" not in line]
    assert legit == [], "\n".join(legit[:10])

    # No secret reaches a log or the summary: not a line of any private key.
    written = "".join(p.read_text(errors="replace") for p in [*(tmp_path / "logs").glob("*.log"),
                                                                tmp_path / "summary.json"])
    for pid in ids:
        key_lines = pki.client(pid)[1].read_text().splitlines()[1:-1]
        assert not any(line in written for line in key_lines), f"{pid}'s TLS key leaked"
        seed = yaml.safe_load(fed.key(pid).read_text())["private_key"]
        assert seed not in written, f"{pid}'s fedbus key leaked"
