"""`fedbus worker --simulate-slowdown FACTOR`: the straggler simulation (testing only)."""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from fedbus.crypto.keys import Identity
from fedbus.demo import write_federation
from fedbus.worker.core import Train
from fedbus.worker.service import WorkerService
from fedbus.worker.slowdown import MAX_FACTOR, Slowdown
from tests.e2e_support import LocalFederation, small_job


# ---- the stretch rule ---------------------------------------------------------------------

@pytest.mark.parametrize(("factor", "trained", "extra"), [
    (10.0, 0.2, 1.8),    # (10 - 1) x 0.2
    (1.0, 3.0, 0.0),     # factor 1: no straggler at all
    (2.5, 0.4, 0.6),     # (2.5 - 1) x 0.4
    (1000.0, 0.001, 0.999),
])
def test_extra_wait_is_factor_minus_one_times_the_measured_training(factor, trained, extra):
    assert Slowdown(factor).extra_seconds(trained) == pytest.approx(extra)


@pytest.mark.parametrize("trained", [0.0, -1.0, math.nan, math.inf])
def test_a_nonsense_measurement_waits_nothing(trained):
    assert Slowdown(10.0).extra_seconds(trained) == 0.0


@pytest.mark.parametrize("text", ["0.5", "0", "-3", "nan", "inf", "-inf", str(MAX_FACTOR * 1.001), "1e9", "ten", ""])
def test_factor_must_be_finite_and_in_range(text):
    with pytest.raises(ValueError, match="slowdown factor"):
        Slowdown.parse(text)


@pytest.mark.parametrize("text", ["1", "1.0", "10", str(MAX_FACTOR)])
def test_factor_bounds_are_inclusive(text):
    assert Slowdown.parse(text).factor == float(text)


# ---- the service: stretch after the training thread, without blocking the loop -------------

def _offline_service(tmp_path, slowdown: Slowdown | None) -> WorkerService:
    federation = write_federation(tmp_path, 2)
    job = small_job("slow-unit", rounds=1, min_workers=2, min_updates=2)
    identity = Identity.load(tmp_path / "keys" / "w01.key")
    return WorkerService(job, federation, identity, "nats://127.0.0.1:9", state_dir=tmp_path / "state",
                         slowdown=slowdown)


def _train_action() -> Train:
    ctx = SimpleNamespace(run="r1", round=1)
    return Train(context=ctx, model={}, broadcast={}, settings={}, evaluate=False, base_version=0,  # type: ignore[arg-type]
                 deadline_ms=0)


@pytest.mark.parametrize("factor", [1.0, 4.0])
def test_service_stretches_training_and_keeps_the_event_loop_free(tmp_path, factor):
    service = _offline_service(tmp_path, Slowdown(factor))
    train_s = 0.15

    def fake_train(action):  # stands in for the training thread: blocking, like torch
        time.sleep(train_s)
        return SimpleNamespace(fields=SimpleNamespace(num_steps=1))

    handled = []
    service.trainer.run_train = fake_train  # type: ignore[method-assign]
    service.core.handle = lambda event: handled.append(event) or []  # type: ignore[method-assign]

    async def scenario() -> tuple[float, int]:
        ticks = 0

        async def ticker() -> None:  # what heartbeats need: the loop keeps running during the wait
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        t = asyncio.create_task(ticker())
        started = time.perf_counter()
        await service._run_actions([_train_action()], None, {})
        took = time.perf_counter() - started
        t.cancel()
        return took, ticks

    took, ticks = asyncio.run(scenario())
    assert len(handled) == 1  # the finished training reached the core once, after the wait
    assert took >= factor * train_s * 0.98
    assert took < factor * train_s + 1.0
    # The loop ticked throughout: at least half the expected 10 ms ticks over the whole wait.
    assert ticks >= 0.5 * took / 0.01


def test_no_slowdown_means_no_wait(tmp_path):
    service = _offline_service(tmp_path, None)

    async def go() -> float:
        started = time.perf_counter()
        await service._stretch(5.0, 1)
        return time.perf_counter() - started

    assert asyncio.run(go()) < 0.5


# ---- the command line -----------------------------------------------------------------------

@pytest.mark.parametrize("value", ["0.5", "nan", "2000", "slow"])
def test_cli_refuses_a_bad_factor_in_one_line(tmp_path, value):
    write_federation(tmp_path, 1)
    small_job("slow-cli", rounds=1, min_workers=1, min_updates=1).dump(tmp_path / "job.yaml")
    result = subprocess.run(
        [sys.executable, "-m", "fedbus.cli", "worker", "--job", str(tmp_path / "job.yaml"),
         "--federation", str(tmp_path / "federation.yaml"), "--key", str(tmp_path / "keys" / "w01.key"),
         "--nats", "nats://127.0.0.1:9", "--simulate-slowdown", value],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedbus: --simulate-slowdown: slowdown factor must"), lines
    assert value in lines[0]


def test_cli_help_marks_it_testing_only():
    out = subprocess.run([sys.executable, "-m", "fedbus.cli", "worker", "--help"], capture_output=True, text=True,
                         timeout=120).stdout
    assert "--simulate-slowdown" in out and "TESTING ONLY" in out


# ---- end to end: a slowed worker process over a real nats-server ----------------------------

def _train_spans(spans_path, instance: str) -> dict[int, float]:
    """worker.train span seconds by round, for one worker."""
    out = {}
    for line in spans_path.read_text().splitlines():
        rec = json.loads(line)
        if rec["name"] == "worker.train" and rec["instance"] == instance:
            out[rec["attributes"]["fedbus.round"]] = rec["duration_ms"] / 1000
    return out


def test_a_slowed_worker_process_is_slow_but_alive(nats_server, tmp_path):
    factor = 5.0
    job = small_job("slow-e2e", rounds=3, min_workers=2, min_updates=2, deadline_s=60.0)
    fed = LocalFederation(tmp_path, nats_server.url, job, num_workers=2)
    try:
        fed.start_coordinator()
        fed.start_worker("w01")
        fed.start_worker("w02", "--simulate-slowdown", str(factor))
        assert fed.wait_coordinator(timeout=180) == 0, fed.tail_logs()
        fed.wait_all(timeout=30)
    finally:
        fed.stop()
    summary = fed.summary()
    # Both workers' updates were folded every round: the straggler stayed in the cohort.
    assert [r["accepted"] for r in summary["rounds"]] == [2, 2, 2], summary["rounds"]
    records = [json.loads(line) for line in (tmp_path / "logs" / "w02.log").read_text().splitlines()
               if line.startswith("{")]
    enabled = [r for r in records if r.get("event") == "slowdown.simulation_enabled"]
    assert len(enabled) == 1 and enabled[0]["factor"] == factor and enabled[0]["level"] == "warning"
    waits = [r for r in records if r.get("event") == "slowdown.wait"]
    assert len(waits) == 3
    for w in waits:
        assert w["extra_s"] == pytest.approx((factor - 1) * w["trained_s"], rel=0.01, abs=1e-3)
    fast_log = (tmp_path / "logs" / "w01.log").read_text()
    assert "slowdown" not in fast_log
    slow, fast = _train_spans(fed.spans, "w02"), _train_spans(fed.spans, "w01")
    assert sorted(slow) == sorted(fast) == [1, 2, 3]
    # Each slowed train span lasted its training plus the wait, i.e. about factor x training.
    for w in waits:
        assert slow[w["round"]] >= 0.95 * factor * w["trained_s"], (slow, waits)
    assert statistics.median(slow.values()) > 2 * statistics.median(fast.values()), (slow, fast)
