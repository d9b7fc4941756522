"""`fedbus status` against a running `fedbus demo` (a real nats-server, coordinator and slowed
workers as CLI processes): the live screen runs in a detached tmux session of fixed size
whose pane is captured until it shows the round the coordinator has committed; and an
operator's snapshot under the generated least-privilege permissions."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from fedbus.bus import KV_BUCKET, connect

pytestmark = pytest.mark.e2e

TMUX = shutil.which("tmux") or "/usr/bin/tmux"
ROUND_SHOWN = re.compile(r"round (\d+) of (\d+)")
# The screen redraws within fedbus.status.command.REFRESH_S of a commit; this leaves room for a busy machine.
SCREEN_LAG_S = 1.0
# Bounds the wait; it ends as soon as two rounds were seen (~15 s on an idle machine).
WATCH_BUDGET_S = 60.0


def _tmux(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([TMUX, *args], capture_output=True, text=True, timeout=10, check=check)


async def _watch_screen(url: str, job: str, capture, rounds: int, budget_s: float) -> tuple[list, str]:
    """Capture the pane between two reads of the round the coordinator committed (straight
    from the KV bucket) until the screen has shown two different rounds while the committed
    one stood still, or the budget is spent. Returns [(round shown, round committed)], last screen."""
    nc = await connect(url, name="test-status-kv", first_connect_timeout=5)
    seen: list[tuple[int, int]] = []
    screen = ""
    give_up = time.monotonic() + budget_s

    async def committed() -> int | None:
        try:
            kv = await nc.jetstream().key_value(KV_BUCKET)
            return int(json.loads((await kv.get(job)).value)["record"]["record"]["round"])
        except Exception:  # no bucket or no commit yet
            return None

    try:
        while time.monotonic() < give_up and len({shown for shown, _ in seen}) < 2:
            before = await committed()
            await asyncio.sleep(SCREEN_LAG_S)
            screen = await asyncio.to_thread(capture)
            after = await committed()
            match = ROUND_SHOWN.search(screen)
            if match is None or before is None or before != after:
                continue  # nothing shown yet, or the round moved on meanwhile: inconclusive
            assert int(match.group(2)) == rounds, screen
            seen.append((int(match.group(1)), before))
            if seen[-1][0] != before:
                break  # wrong already: no need to watch on
    finally:
        await nc.close()
    return seen, screen


def _demo_lines(proc: subprocess.Popen, lines: queue.Queue) -> None:
    for line in proc.stdout:
        lines.put(line.rstrip("\n"))


def test_status_shows_a_running_demos_current_round_in_tmux(tmp_path):
    # Fails loudly where tmux is missing: .ci/run installs it.
    assert os.path.exists(TMUX), "tmux is required for this test (apt-get install tmux; .ci/run installs it)"
    rounds = 40  # far more than the test watches: the demo is interrupted, not finished
    # A real `fedbus demo` (its own nats-server, coordinator and 3 worker processes), every worker
    # slowed down so that a round lasts a few seconds. Its own session: stopped as a group below.
    demo = subprocess.Popen([sys.executable, "-m", "fedbus.cli", "demo", "--workers", "3", "--rounds", str(rounds),
                             "--stragglers", "3", "--slowdown", "30", "--alpha", "100", "--run-dir",
                             str(tmp_path / "demo"), "--timeout", "120"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_demo_lines, args=(demo, lines), daemon=True).start()
    session = f"fedbus-status-{uuid.uuid4().hex[:8]}"
    socket = f"fedbus-test-{os.getpid()}"  # our own tmux server: nothing of anyone else's is touched
    started = time.monotonic()
    try:
        hint = None  # the demo prints the `fedbus status` command of its run
        while hint is None and time.monotonic() - started < 60 and demo.poll() is None:
            with contextlib.suppress(queue.Empty):
                line = lines.get(timeout=0.5)
                hint = line.split("watch it live: ", 1)[1] if "watch it live: " in line else None
        assert hint is not None, f"the demo printed no status command (exit {demo.poll()})"
        argv = shlex.split(hint)
        assert argv[:2] == ["fedbus", "status"], hint
        url = argv[argv.index("--nats") + 1]
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in os.environ.items() if k in ("PYTHONPATH", "PATH"))
        status = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "fedbus.cli", *argv[1:], "--keep"])
        _tmux("-L", socket, "new-session", "-d", "-s", session, "-x", "110", "-y", "40",
              f"env {env} {status} 2> {shlex.quote(str(tmp_path / 'status.err'))}")
        seen, screen = asyncio.run(_watch_screen(
            url, "digits-demo", lambda: _tmux("-L", socket, "capture-pane", "-p", "-t", session).stdout,
            rounds, WATCH_BUDGET_S))
        assert seen, f"no round on the screen after {time.monotonic() - started:.0f} s:\n{screen}\n" \
                     f"{(tmp_path / 'status.err').read_text(errors='replace')[-2000:]}"
        # While the committed round stood still, the screen showed exactly that round ...
        assert all(shown == committed for shown, committed in seen), (seen, screen)
        # ... and it moved on by itself: the screen is live, not a snapshot.
        assert len({shown for shown, _ in seen}) >= 2, f"the screen never moved on from round {seen[0][0]}:\n{screen}"
        assert "w01" in screen and "sync" in screen, screen
    finally:
        _tmux("-L", socket, "kill-session", "-t", session, check=False)
        _interrupt(demo)


def _interrupt(demo: subprocess.Popen) -> None:
    """SIGTERM the demo (it stops its own processes and nats-server); its process group if it hangs."""
    if demo.poll() is None:
        demo.terminate()
        try:
            demo.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(demo.pid, signal.SIGKILL)  # the group of the session it was started in: ours
            demo.wait()


def test_an_operator_reads_the_status_under_the_generated_permissions(tmp_path, capsys):
    """On a server with generated least-privilege users (nkeys), an operator's `fedbus status
    --once` reads the committed record and the heartbeats; a forged record is refused."""
    import nkeys  # noqa: F401  (nats-py needs it for nkey auth)

    from fedbus.bus import EmbeddedNatsServer, NatsCredentials, Subjects, ensure_job_infrastructure
    from fedbus.bus.natsconfig import security_section
    from fedbus.bus.permissions import JobScope
    from fedbus.cli import main
    from fedbus.coordinator.records import JobRecord, sign_record
    from fedbus.crypto.federation import Federation, FederationFile, Participant
    from fedbus.crypto.keys import Identity
    from fedbus.crypto.signing import seal
    from fedbus.protocol.messages import Heartbeat, encode_body

    ids = [Identity.generate("coordinator", "coordinator"), Identity.generate("ops", "operator"),
           Identity.generate("w01", "worker")]
    federation = Federation(FederationFile(federation="t", participants=[Participant(**i.participant_entry())
                                                                         for i in ids]))
    federation.dump(tmp_path / "federation.yaml")
    coordinator, _, worker = ids
    keys = tmp_path / "nkeys"
    for i in ids:
        assert main(["nats", "nkey", "--id", i.id, "--out", str(keys)]) == 0
    public = {i.id: (keys / f"{i.id}.pub").read_text().strip() for i in ids}
    section = security_section(federation, [JobScope("st")], auth="nkey", tls=None, nkeys=public)
    server = EmbeddedNatsServer(store_dir=tmp_path / "store", extra_config=section).start()
    s = Subjects("st")
    record = JobRecord(round=3, phase="round_open", model_version=2, rounds_completed=2, cohort=("w01",))
    doc = {"job": "st", "run": "r1", "record": record.as_dict(), "updated_ms": 0, "coordinator": "coordinator"}

    async def commit(sign) -> None:
        co = await connect(server.url, "co", credentials=NatsCredentials(nkey=keys / "coordinator.nk"),
                           participant="coordinator", first_connect_timeout=10)
        await ensure_job_infrastructure(co.jetstream(), s)
        await (await co.jetstream().key_value(KV_BUCKET)).put("st", sign_record(doc, sign))
        await co.close()

    async def beat(stop: asyncio.Event) -> None:
        w = await connect(server.url, "w01", credentials=NatsCredentials(nkey=keys / "w01.nk"), participant="w01",
                          first_connect_timeout=10)
        while not stop.is_set():
            body = encode_body(Heartbeat(num_samples=10, partition=0, status="training"))
            wire, _ = seal(worker, "heartbeat", job="st", round=0, body=body)
            await w.publish(s.hb("w01"), wire)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.3)
        await w.close()

    def status() -> tuple[int, str, str]:
        async def run() -> int:
            stop = asyncio.Event()
            beating = asyncio.create_task(beat(stop))
            code = await asyncio.to_thread(main, [
                "status", "--once", "--listen", "1.5", "--job", "st", "--federation", str(tmp_path / "federation.yaml"),
                "--nats", server.url, "--nkey", str(keys / "ops.nk"), "--id", "ops"])
            stop.set()
            await beating
            return code
        code = asyncio.run(run())
        out = capsys.readouterr()
        return code, out.out, out.err

    try:
        asyncio.run(commit(coordinator.sign))
        code, out, err = status()
        assert code == 0, out + err
        assert "round 3" in out and "(1) w01" in out and "1 alive" in out, out
        assert "refused" not in out, out
        # The same record signed by someone else (here: the operator's key) is refused, not shown.
        asyncio.run(commit(ids[1].sign))
        code, out, err = status()
        assert "record_not_verified" in out and "round 3" in out, out  # the genuine revision, then the forgery
    finally:
        server.stop()
