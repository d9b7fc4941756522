"""Faults on real processes: a worker killed mid-job, and the nats-server restarted mid-job."""

from __future__ import annotations

import json
import time

import pytest

from tests.e2e_support import LocalFederation, wait_for_round, small_job

pytestmark = pytest.mark.e2e


def test_killed_worker_does_not_stall_the_job(nats_server, tmp_path):
    # Many short rounds, so the kill surely lands mid-job (a round takes ~0.1 s when all
    # report; only the one or two rounds that still wait for the dead worker take 3 s).
    job = small_job("e2e-crash", rounds=30, min_workers=4, min_updates=3, deadline_s=3.0)
    fed = LocalFederation(tmp_path, nats_server.url, job, 4)
    try:
        fed.start_coordinator()
        fed.start_workers()
        wait_for_round(fed, 2, timeout=180)
        fed.kill("w04")  # its heartbeats just stop
        assert fed.wait_coordinator(timeout=120) == 0, fed.tail_logs()
    finally:
        fed.stop()
    summary = fed.summary()
    assert summary["reason"] == "completed" and summary["rounds_completed"] == 30
    accepted = [r["accepted"] for r in summary["rounds"] if r["status"] == "aggregated"]
    assert accepted[:2] == [4, 4]
    # Once its heartbeats lapse the dead worker leaves the cohort; rounds go on with three.
    assert accepted[-1] == 3
    assert sum(1 for r in summary["rounds"] if r["seconds"] >= 3.0) <= 3  # only rounds that waited for it
    assert summary["final_accuracy"] > 0.8


def test_nats_server_restart_mid_job_loses_nothing(nats_server, tmp_path):
    job = small_job("e2e-restart", rounds=40, min_workers=3, min_updates=3, deadline_s=20.0)
    fed = LocalFederation(tmp_path, nats_server.url, job, 3)
    try:
        fed.start_coordinator()
        for p in fed.federation.workers():
            fed.start_worker(p.id)
        wait_for_round(fed, 2, timeout=180)
        nats_server.kill()  # SIGKILL the broker; its file store survives
        time.sleep(1.0)
        nats_server.start()  # same ports, same store
        assert fed.wait_coordinator(timeout=180) == 0, fed.tail_logs()
        fed.wait_all(timeout=30)
    finally:
        fed.stop()
    summary = fed.summary()
    assert summary["reason"] == "completed" and summary["rounds_completed"] == 40, fed.tail_logs()
    events = [json.loads(line)["event"] for line in (tmp_path / "logs" / "coordinator.log").read_text().splitlines()
              if line.startswith("{")]
    assert "nats.reconnected" in events
    # The restart really happened mid-job: rounds kept closing after the reconnect.
    after = events[events.index("nats.reconnected"):]
    assert after.count("round.closed") >= 10, after.count("round.closed")
