"""`fedbus nats config`: the permissions it derives, the checked-in deploy/nats/secured.conf,
and the real nats-server's view of a generated configuration (nkey users)."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import nkeys
import pytest
import yaml

from fedbus.bus import BlobStore, EmbeddedNatsServer, NatsCredentials, Subjects, connect, ensure_job_infrastructure
from fedbus.bus.natsconfig import TlsFiles, render, security_section
from fedbus.bus.permissions import JobScope, permissions_for
from fedbus.bus.server import find_nats_server_binary
from fedbus.cli import main
from fedbus.crypto.federation import Federation
from fedbus.demo import write_federation
from tests.tls_support import make_pki

REPO = Path(__file__).resolve().parent.parent
SECURED = REPO / "deploy" / "nats" / "secured.conf"
EXAMPLE = REPO / "deploy" / "k8s" / "configmap-job.yaml"
# Exactly the command deploy/nats/README.md gives for secured.conf.
SECURED_ARGS = ["--server-cert", "./certs/server.pem", "--server-key", "./certs/server-key.pem", "--ca",
                "./certs/ca.pem", "--listen", "0.0.0.0:4222", "--store-dir", "./nats-store"]

REGION = {"w1": "eu", "w2": "eu", "w3": "us", "agg-eu": "eu", "agg-us": "us"}


def _example(tmp_path: Path) -> tuple[Path, Path]:
    data = yaml.safe_load(EXAMPLE.read_text())["data"]
    (tmp_path / "job.yaml").write_text(data["job.yaml"])
    (tmp_path / "federation.yaml").write_text(data["federation.yaml"])
    return tmp_path / "federation.yaml", tmp_path / "job.yaml"


def test_worker_may_publish_only_its_own_subjects_and_read_no_updates():
    s = Subjects("j")
    flat = permissions_for("w1", "worker", [JobScope("j")], REGION)
    assert {s.upd("eu", "w1"), s.hb("w1"), s.metrics("w1")} <= set(flat.publish)
    everything = " ".join(flat.publish + flat.subscribe)
    for forbidden in (s.upd("eu", "w2"), "w2", s.ctl_all, ".ctl.round", "$JS.API.>", "STREAM.CREATE",
                      f"CONSUMER.CREATE.{s.upd_stream}", f"MSG.GET.{s.upd_stream}", "DIRECT.GET", "OBJ_fedbus-blobs",
                      "_INBOX.>", ".upd.>"):
        assert forbidden not in everything, forbidden
    assert flat.subscribe == ["_INBOX.w1.>"]
    regional = permissions_for("w1", "worker", [JobScope("j", regional=True)], REGION)
    assert f"$JS.API.STREAM.INFO.{s.region_upd_stream('eu')}" in regional.publish


def test_aggregator_reads_only_its_region_and_operator_only_publishes_key_events():
    s = Subjects("j")
    agg = permissions_for("agg-eu", "aggregator", [JobScope("j", regional=True)], REGION)
    assert s.agg("eu") in agg.publish and s.agg("us") not in agg.publish
    assert sorted(agg.subscribe) == sorted(["_INBOX.agg-eu.>", s.hb("w1"), s.hb("w2")])
    assert not any(s.region_upd_stream("us") in p for p in agg.publish)
    op = permissions_for("ops", "operator", [JobScope("j")], REGION)
    assert [p for p in op.publish if p.startswith("fedbus.")] == [s.ctl("keys"), s.audit_of("ops")]
    with pytest.raises(ValueError, match="no permissions defined"):
        permissions_for("x", "intruder", [JobScope("j")], REGION)


def test_revoked_participants_get_no_user(tmp_path):
    fed = write_federation(tmp_path, 2)
    spec = fed.spec.model_copy(update={"participants": [
        p.model_copy(update={"revoked": p.id == "w02"}) for p in fed.spec.participants]})
    text = security_section(Federation(spec), [JobScope("j")], auth="mtls", tls=TlsFiles("s.pem", "s.key", "ca.pem"))
    assert '"CN=w01"' in text and "w02" not in text


def test_checked_in_secured_conf_is_what_the_generator_writes(tmp_path, capsys):
    fed_path, job_path = _example(tmp_path)
    out = tmp_path / "out"
    assert main(["nats", "config", "--federation", str(fed_path), "--job", str(job_path), "--out", str(out),
                 *SECURED_ARGS]) == 0
    assert (out / "nats-server.conf").read_text() == SECURED.read_text(), \
        "deploy/nats/secured.conf is stale: regenerate it with the command in its header"


def test_generated_mtls_config_is_accepted_by_nats_server(tmp_path):
    fed_path, job_path = _example(tmp_path)
    fed = Federation.load(fed_path)
    pki = make_pki(tmp_path / "certs", [])
    text = render(fed, [JobScope("digits-regional", regional=True)], auth="mtls", listen="127.0.0.1:4222",
                  tls=TlsFiles(str(pki.server_cert), str(pki.server_key), str(pki.ca)), store_dir=str(tmp_path / "s"))
    (tmp_path / "nats.conf").write_text(text)
    result = subprocess.run([find_nats_server_binary(), "-t", "-c", str(tmp_path / "nats.conf")],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


def test_nkey_users_connect_and_the_server_enforces_their_permissions(tmp_path):
    fed = write_federation(tmp_path, 2)
    keys = tmp_path / "nkeys"
    for p in fed.spec.participants:
        assert main(["nats", "nkey", "--id", p.id, "--out", str(keys)]) == 0
    assert oct((keys / "w01.nk").stat().st_mode & 0o777) == "0o600"
    public = {p.id: (keys / f"{p.id}.pub").read_text().strip() for p in fed.spec.participants}
    assert nkeys.from_seed(bytearray((keys / "w01.nk").read_bytes().strip())).public_key.decode() == public["w01"]
    section = security_section(fed, [JobScope("nk")], auth="nkey", tls=None, nkeys=public)
    server = EmbeddedNatsServer(store_dir=tmp_path / "store", extra_config=section).start()
    s = Subjects("nk")

    async def scenario() -> tuple[int, list[str]]:
        violations: list[str] = []

        async def on_error(err: Exception) -> None:
            violations.append(str(err))

        co = await connect(server.url, "co", credentials=NatsCredentials(nkey=keys / "coordinator.nk"),
                           participant="coordinator", first_connect_timeout=10)
        await ensure_job_infrastructure(co.jetstream(), s)
        w = await connect(server.url, "w01", credentials=NatsCredentials(nkey=keys / "w01.nk"), participant="w01",
                          first_connect_timeout=10, error_cb=on_error, allow_reconnect=False)
        js = w.jetstream(timeout=2)
        await js.publish(s.upd("default", "w01"), b"mine")  # its own subject: acknowledged
        with pytest.raises(Exception):
            await js.publish(s.upd("default", "w02"), b"forged")
        # A large body goes to the blob bucket without the worker reading anything there.
        body = bytes(range(256)) * 9000  # > 2 chunks of 1 MiB
        ref = await BlobStore(w, js).put_new("nk/w01/update/1/abc", body)
        assert await BlobStore(co, co.jetstream()).get(ref.name, expected_digest=ref.digest) == body
        with pytest.raises(Exception):
            await BlobStore(w, js).get(ref.name, timeout=2)
        await w.flush()
        await asyncio.sleep(0.3)
        stored = (await co.jetstream().stream_info(s.upd_stream)).state.messages
        await w.close()
        await co.close()
        return stored, violations

    try:
        stored, violations = asyncio.run(scenario())
        with pytest.raises(Exception):  # no key: not even a connection
            asyncio.run(connect(server.url, "anon", first_connect_timeout=3, allow_reconnect=False))
    finally:
        server.stop()
    assert stored == 1
    assert any("permissions violation" in v.lower() and "w02" in v for v in violations), violations
