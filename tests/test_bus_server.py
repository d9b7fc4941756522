from __future__ import annotations

import asyncio
import os
import signal
import urllib.request
from pathlib import Path

import pytest

from fedbus.bus import connect
from fedbus.bus.server import (
    BINARY_ENV_VAR,
    EmbeddedNatsServer,
    NatsServerError,
    NatsServerNotFound,
    find_nats_server_binary,
    free_port,
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A reaped child is gone; an unreaped one would be a zombie, which stop() must not leave.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


async def _roundtrip(url: str) -> bytes:
    nc = await connect(url, "test-roundtrip", first_connect_timeout=5)
    try:
        js = nc.jetstream()
        await js.add_stream(name="T", subjects=["t.>"])
        await js.publish("t.1", b"hello")
        return (await js.get_last_msg("T", "t.1")).data
    finally:
        await nc.close()


def test_binary_is_found() -> None:
    path = find_nats_server_binary()
    assert os.access(path, os.X_OK)


def test_missing_binary_from_env_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-nats-server"
    monkeypatch.setenv(BINARY_ENV_VAR, str(missing))
    with pytest.raises(NatsServerNotFound) as err:
        find_nats_server_binary()
    assert str(missing) in str(err.value) and BINARY_ENV_VAR in str(err.value)
    with pytest.raises(NatsServerNotFound):
        EmbeddedNatsServer(tmp_path / "store").start()


def test_start_serves_jetstream_and_stop_ends_process(nats_server: EmbeddedNatsServer) -> None:
    assert nats_server.url == f"nats://127.0.0.1:{nats_server.port}"
    assert nats_server.pid is not None and _alive(nats_server.pid)
    with urllib.request.urlopen(f"http://127.0.0.1:{nats_server.http_port}/healthz") as resp:
        assert resp.status == 200
    assert asyncio.run(_roundtrip(nats_server.url)) == b"hello"

    pid = nats_server.pid
    nats_server.stop()
    assert not _alive(pid)
    assert not nats_server.running
    nats_server.stop()  # idempotent


def test_owned_store_dir_is_removed_on_stop() -> None:
    server = EmbeddedNatsServer().start()
    store = server.store_dir
    assert store is not None and store.is_dir()
    server.stop()
    assert not store.exists()


def test_context_manager_and_max_payload(tmp_path: Path) -> None:
    with EmbeddedNatsServer(tmp_path / "store", max_payload=4 * 1024 * 1024) as server:
        async def max_payload() -> int:
            nc = await connect(server.url, "test-max-payload", first_connect_timeout=5)
            try:
                return nc.max_payload
            finally:
                await nc.close()

        assert asyncio.run(max_payload()) == 4 * 1024 * 1024
        pid = server.pid
    assert pid is not None and not _alive(pid)
    assert (tmp_path / "store" / "jetstream").is_dir()  # a given store is kept


def test_kill_then_restart_keeps_data(nats_server_factory) -> None:
    server = nats_server_factory()
    assert asyncio.run(_roundtrip(server.url)) == b"hello"
    pid = server.pid
    server.kill()
    assert not _alive(pid)
    server.kill()  # idempotent too

    server.start()
    assert server.pid != pid

    async def read_back() -> bytes:
        nc = await connect(server.url, "test-restart", first_connect_timeout=5)
        try:
            return (await nc.jetstream().get_last_msg("T", "t.1")).data
        finally:
            await nc.close()

    assert asyncio.run(read_back()) == b"hello"


def test_start_failure_reports_log_tail(tmp_path: Path) -> None:
    # Occupy the client port so nats-server cannot bind it.
    import socket

    port = free_port()
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
        server = EmbeddedNatsServer(tmp_path / "store", port=port)
        with pytest.raises(NatsServerError) as err:
            server.start(timeout=5)
    assert "log tail" in str(err.value)
    assert "address already in use" in str(err.value)
    assert not server.running
    server.stop()


def test_stop_falls_back_to_sigkill(nats_server: EmbeddedNatsServer) -> None:
    # A stopped (SIGSTOP) server ignores SIGTERM until continued: stop() must still end it.
    pid = nats_server.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    nats_server.stop(timeout=0.5)
    assert not _alive(pid)


def test_run_foreground_prints_url_and_stops_on_sigterm(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = "import sys; from fedbus.bus.server import run_foreground; sys.exit(run_foreground(sys.argv[1]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path / "store")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # stdout carries the URL; log lines may come first depending on logging setup.
        lines = iter(proc.stdout.readline, "")
        url = next((line.strip() for line in lines if line.startswith("nats://")), "")
        assert url.startswith("nats://127.0.0.1:")
        assert asyncio.run(_roundtrip(url)) == b"hello"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            # SIGTERM first so the child stops its nats-server instead of orphaning it.
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert (tmp_path / "store" / "jetstream").is_dir()


def test_connect_gives_up_on_first_connect_only_when_asked() -> None:
    async def main() -> None:
        with pytest.raises(TimeoutError, match="could not connect"):
            await connect(f"nats://127.0.0.1:{free_port()}", "test-unreachable", first_connect_timeout=1.0)

    asyncio.run(main())


def test_connection_logs_disconnect_and_reconnect(nats_server: EmbeddedNatsServer) -> None:
    from structlog.testing import capture_logs

    async def main() -> list[str]:
        reconnected = asyncio.Event()

        async def on_reconnected() -> None:
            reconnected.set()

        with capture_logs() as logs:
            nc = await connect(nats_server.url, "test-reconnect", first_connect_timeout=5, reconnected_cb=on_reconnected)
            try:
                nats_server.kill()
                await asyncio.sleep(0.3)
                await asyncio.get_running_loop().run_in_executor(None, nats_server.start)
                await asyncio.wait_for(reconnected.wait(), 10)
                await nc.flush(timeout=5)
            finally:
                await nc.close()
        return [entry["event"] for entry in logs if entry.get("client") == "test-reconnect"]

    events = asyncio.run(main())
    for name in ("nats.connected", "nats.disconnected", "nats.reconnected", "nats.closed"):
        assert name in events, events
