"""`fedbus demo`: its time-to-accuracy arithmetic, its job per mode, and one small real run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fedbus.demo import (demo_job, row_elapsed, straggler_ids, time_to_accuracy, training_started, updates_folded,
                         write_federation)


def _row(version: int, seconds: float, acc: float | None, elapsed: float | None = None, **extra) -> dict:
    row = {"round": version, "model_version": version, "status": "aggregated", "seconds": seconds,
           "accepted": 3, "test_accuracy": acc, **extra}
    if elapsed is not None:
        row["elapsed_s"] = elapsed
    return row


def test_time_to_accuracy_counts_from_the_first_rounds_start():
    # Round 1 opened at 10.0 - 2.0 = 8.0 s (after the wait for workers); 0.93 first at 14.5 s.
    rows = [_row(1, 2.0, 0.60, 10.0), _row(2, 1.5, 0.92, 12.0), _row(3, 1.0, 0.935, 14.5), _row(4, 1.0, 0.94, 16.0)]
    assert training_started(rows) == pytest.approx(8.0)
    assert time_to_accuracy(rows, 0.93) == (pytest.approx(6.5), 3)
    assert time_to_accuracy(rows, 0.95) is None


def test_without_elapsed_s_the_round_durations_are_summed():
    rows = [_row(1, 2.0, 0.5), _row(2, 1.5, 0.93), _row(3, 1.0, 0.99)]
    assert row_elapsed(rows) == pytest.approx([2.0, 3.5, 4.5])
    # Round 1 starts at 0 on this clock: 0.93 at 3.5 s.
    assert time_to_accuracy(rows, 0.93) == (pytest.approx(3.5), 2)


def test_a_missing_or_nan_accuracy_never_counts_as_reached():
    rows = [_row(1, 1.0, None, 1.0), _row(2, 1.0, float("nan"), 2.0), _row(3, 1.0, 0.97, 3.0)]
    assert time_to_accuracy(rows, 0.93) == (pytest.approx(3.0), 3)


def test_updates_folded_include_late_ones_and_skip_failed_rounds():
    rows = [_row(1, 1.0, 0.5, accepted=7, folded=9), _row(2, 1.0, 0.6, accepted=8),
            {"round": 3, "model_version": 2, "status": "failed", "seconds": 30.0, "accepted": 2}]
    assert updates_folded(rows) == 9 + 8


def test_stragglers_are_the_last_workers(tmp_path):
    federation = write_federation(tmp_path, 10)
    assert straggler_ids(federation, 3) == ["w08", "w09", "w10"]
    assert straggler_ids(federation, 0) == []
    assert len(straggler_ids(federation, 10)) == 10


def test_demo_job_per_mode():
    sync = demo_job(10, 20, 0.5, 0)
    assert sync.mode == "sync" and sync.rounds == 20 and sync.cohort.min_updates == 8
    a = demo_job(10, 60, 0.5, 0, mode="async")
    assert a.mode == "async" and a.async_.algorithm == "fedbuff" and a.async_.buffer_size == 5
    # A 10x straggler answers ~30 versions late: it must not be refused as too_stale.
    assert a.async_.max_staleness >= 30
    assert demo_job(2, 5, 0.5, 0, mode="async").async_.buffer_size == 2  # never more than the workers


def test_demo_job_model_width_and_retention():
    default = demo_job(10, 20, 0.5, 0)
    assert "hidden" not in default.task_params and default.retention.keep_versions == 10
    wide = demo_job(10, 200, 0.5, 0, hidden=2048, keep_versions=5)
    assert wide.task_params["hidden"] == 2048 and wide.retention.keep_versions == 5


@pytest.mark.parametrize(("args", "message"), [
    (["--stragglers", "4", "--workers", "3"], "--stragglers must lie in [0, --workers = 3]"),
    (["--stragglers", "-1"], "--stragglers must lie in"),
    (["--slowdown", "0.5"], "--slowdown: slowdown factor must lie in [1, 1000]"),
    (["--slowdown", "nan"], "--slowdown: slowdown factor must lie in"),
])
def test_demo_refuses_bad_straggler_options_before_starting_anything(tmp_path, args, message):
    result = subprocess.run([sys.executable, "-m", "fedbus.cli", "demo", "--run-dir", str(tmp_path / "run"), *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()


def test_small_demo_with_a_straggler_end_to_end(tmp_path):
    # Real nats-server, coordinator and 3 worker processes through `fedbus demo`; w03 is slowed 4x.
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "fedbus.cli", "demo", "--workers", "3", "--rounds", "3",
                             "--stragglers", "1", "--slowdown", "4", "--alpha", "100", "--run-dir", str(run_dir),
                             "--timeout", "240"], capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "stragglers (testing only): w03 train 4x slower" in result.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == 3
    # The demo's federation has encryption keys, so every update travelled sealed (the default).
    assert summary["updates_sealed"] == summary["updates_accepted"] > 0
    log = (run_dir / "logs" / "w03.log").read_text()
    assert '"slowdown.simulation_enabled"' in log and '"factor": 4.0' in log
    assert "slowdown" not in (run_dir / "logs" / "w01.log").read_text()
    # The newcomer's summary line: time to 0.93, or how far it got.
    assert ("reached 0.93 test accuracy after" in result.stdout) or ("did not reach 0.93" in result.stdout)
    assert "stragglers w03 (4x slower) sent 3 updates" in result.stdout
    # The coordinator's report.html, path printed by the demo, with this run's final manifest in it.
    assert f"report: {run_dir / 'report.html'}" in result.stdout
    manifest = json.loads((run_dir / "model-manifest.json").read_text())
    assert manifest["run"] == summary["run"] and manifest["version"] == summary["model_version"]
    page = (run_dir / "report.html").read_text()
    assert summary["run"] in page and manifest["model_digest"] in page and 'id="fig-waterfall"' in page


def test_regional_demo_refuses_what_it_cannot_show_before_starting_anything(tmp_path):
    import subprocess
    import sys

    for extra in (["--mode", "async"], ["--stragglers", "2"], ["--regions", "0"]):
        out = subprocess.run([sys.executable, "-m", "fedbus.cli", "demo", "--topology", "regional", "--run-dir",
                              str(tmp_path / "d"), *extra], capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, (extra, out.stdout, out.stderr)
        assert "regions" in out.stderr or "sync rounds" in out.stderr, out.stderr
    assert not (tmp_path / "d" / "nats").exists()  # no server was started
