"""Live metrics of a real job: the coordinator's and a worker's /metrics endpoints are
scraped while separate `fedbus` processes run a job on a real nats-server, with junk
injected on an update subject and a heartbeat subject. The named series are there with
plausible values, and the rejections counter ends equal to summary.json's."""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
import urllib.error

import pytest

from fedbus.bus import Subjects, connect
from fedbus.bus.layout import wait_for_stream
from fedbus.bus.server import free_port
from tests.e2e_support import LocalFederation, small_job
from tests.metrics_support import by_label, scrape, total

pytestmark = pytest.mark.e2e

JUNK_UPDATES = 5
JUNK_HEARTBEATS = 4
ROUNDS = 5


async def inject_junk(url: str, subjects: Subjects) -> None:
    """Random bytes where listed workers publish: the coordinator's filtered consumer and
    heartbeat subscription both deliver them, and each must be rejected by name."""
    nc = await connect(url, name="junk")
    try:
        js = nc.jetstream()
        await wait_for_stream(js, subjects.upd_stream, 30)
        for i in range(JUNK_UPDATES):
            await js.publish(subjects.upd("default", "w01"), os.urandom(200), headers={"Nats-Msg-Id": f"junk-{i}"})
        for _ in range(JUNK_HEARTBEATS):
            await nc.publish(subjects.hb("w02"), os.urandom(120))
        await nc.flush()
    finally:
        await nc.close()


def wait_logged(fed: LocalFederation, name: str, event: str, timeout: float) -> None:
    log = fed.run_dir / "logs" / f"{name}.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and f'"{event}"' in log.read_text(errors="replace"):
            return
        assert fed.group.procs[name].poll() is None, fed.tail_logs()
        time.sleep(0.1)
    raise AssertionError(f"{name} did not log {event} within {timeout} s:\n{fed.tail_logs()}")


def try_scrape(url: str) -> dict | None:
    try:
        return scrape(url, timeout=2)
    except (urllib.error.URLError, ConnectionError, OSError):
        return None


def test_coordinator_and_worker_metrics_during_a_real_job(nats_server, tmp_path):
    # Rounds long enough to scrape them; the deadline is what the alert rules multiply.
    job = small_job("e2e-metrics", rounds=ROUNDS, min_workers=3, min_updates=3, deadline_s=20.0)
    fed = LocalFederation(tmp_path, nats_server.url, job, 3)
    coord_port, worker_port = free_port(), free_port()
    coord_url = f"http://127.0.0.1:{coord_port}/metrics"
    worker_url = f"http://127.0.0.1:{worker_port}/metrics"
    coordinator_scrapes: list[dict] = []
    worker_scrapes: list[dict] = []
    try:
        fed.start_coordinator("--metrics-port", str(coord_port))
        fed.start_worker("w01", "--metrics-port", str(worker_port))
        for w in ("w02", "w03"):
            fed.start_worker(w)
        wait_logged(fed, "coordinator", "coordinator.started", timeout=60)  # its fresh start purged the streams
        asyncio.run(inject_junk(nats_server.url, Subjects(job.job)))
        proc = fed.group.procs["coordinator"]
        deadline = time.monotonic() + 180
        while proc.poll() is None and time.monotonic() < deadline:
            for url, scrapes in ((coord_url, coordinator_scrapes), (worker_url, worker_scrapes)):
                got = try_scrape(url)
                if got is not None:
                    scrapes.append(got)
            time.sleep(0.2)
        assert fed.wait_coordinator(timeout=30) == 0, fed.tail_logs()
        fed.wait_all(timeout=30)
    finally:
        fed.stop()

    summary = fed.summary()
    assert summary["reason"] == "completed", fed.tail_logs()
    assert len(coordinator_scrapes) >= 3 and len(worker_scrapes) >= 3, (len(coordinator_scrapes), len(worker_scrapes))
    last = coordinator_scrapes[-1]

    # Rejections: every junk message counted by name, and the live counter is summary.json's.
    rejected = by_label(last, "fedbus_rejections_total", "reason")
    assert rejected == {k: float(v) for k, v in summary["updates_rejected"].items()}, (rejected, summary)
    assert total(last, "fedbus_rejections_total", kind="update") == JUNK_UPDATES
    assert total(last, "fedbus_rejections_total", kind="heartbeat") == JUNK_HEARTBEATS

    # Commits, durations, staleness: counters only grow, and stay within the job.
    committed = [total(s, "fedbus_versions_committed_total") for s in coordinator_scrapes]
    assert committed == sorted(committed) and 1 <= committed[-1] <= ROUNDS
    assert total(last, "fedbus_rounds_committed_total", status="aggregated") == committed[-1]
    assert total(last, "fedbus_round") == committed[-1]
    assert total(last, "fedbus_round_duration_seconds_count") == committed[-1]
    assert 0 < total(last, "fedbus_round_duration_seconds_sum") < committed[-1] * job.round_deadline_s
    assert total(last, "fedbus_round_deadline_seconds") == job.round_deadline_s
    assert abs(total(last, "fedbus_last_commit_timestamp_seconds") - time.time()) < 300
    accepted = total(last, "fedbus_updates_accepted_total")
    assert 3 * committed[-1] <= accepted <= summary["updates_accepted"]
    assert total(last, "fedbus_update_staleness_versions_count") <= accepted
    assert max(total(s, "fedbus_live_workers") for s in coordinator_scrapes) == 3
    assert 0.1 < total(last, "fedbus_model_test_accuracy") <= 1.0
    assert total(last, "fedbus_sent_bytes_total", type="round.open") > 0
    assert total(last, "fedbus_received_bytes_total") > 0

    # The worker: its training time, its local metrics, its traffic.
    w = worker_scrapes[-1]
    trained = total(w, "fedbus_worker_training_seconds_count")
    assert 1 <= trained <= ROUNDS + 1
    assert 0 < total(w, "fedbus_worker_training_seconds_sum") < 60 * trained
    loss = total(w, "fedbus_worker_train_loss")
    assert math.isfinite(loss) and 0 < loss < 10
    assert total(w, "fedbus_sent_bytes_total", type="update") > 0
    assert total(w, "fedbus_sent_bytes_total", type="heartbeat") > 0
    assert total(w, "fedbus_received_bytes_total") > 0
    assert all(lab.get("fedbus_job") == job.job for lab, _ in w["fedbus_sent_bytes_total"])

    # Log lines inside a round's spans carry its trace id (logs join traces).
    lines = [json.loads(x) for x in (fed.run_dir / "logs" / "w01.log").read_text().splitlines() if x.startswith("{")]
    sent = [x for x in lines if x.get("event") == "update.sent"]
    assert sent and all(len(x.get("trace_id", "")) == 32 for x in sent), sent[:2]
    coordinator_lines = [json.loads(x) for x in (fed.run_dir / "logs" / "coordinator.log").read_text().splitlines()
                         if x.startswith("{")]
    closed = {x["round"]: x["trace_id"] for x in coordinator_lines if x.get("event") == "round.closed"}
    assert len(closed) == ROUNDS
    # The worker's update of round r is in round r's trace.
    assert {x["round"]: x["trace_id"] for x in sent}.items() <= closed.items()
