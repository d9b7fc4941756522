"""`fedbus sim` as a user runs it: straggler options on the virtual clock, and their errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

JOB = ("job: j\ntask: fedbus.tasks.digits:task\nrounds: 2\ntask_params: {partition: iid}\n"
       "cohort: {min_workers: 4, min_updates: 4}\nevaluation: {federated: false, final_round: false}\n")


def fedbus(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedbus.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_sim_prints_virtual_time_counters_and_memory(tmp_path):
    (tmp_path / "job.yaml").write_text(JOB)
    out = tmp_path / "out.json"
    result = fedbus("sim", "--job", "job.yaml", "--workers", "4", "--stragglers", "1", "--slowdown", "10",
                    "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    # w04 trains 10 virtual seconds a round and the full cohort waits for it.
    assert lines[0].startswith("round 1: aggregated v1 test acc ") and lines[0].endswith("(4 updates) at 10.000 s virtual")
    assert lines[1].endswith("at 20.000 s virtual")
    summary = json.loads(lines[-1])
    assert summary["mode"] == "sync" and summary["reason"] == "completed" and summary["virtual_seconds"] == 20.0
    assert (summary["updates_trained"], summary["updates_used"], summary["updates_wasted"]) == (8, 8, 0)
    assert summary["peak_rss_mb"] > 0
    report = json.loads(out.read_text())
    assert [r["elapsed_s"] for r in report["rounds"]] == [10.0, 20.0]
    assert report["stragglers"] == 1 and report["slowdown"] == 10.0 and report["speeds"] == "uniform"


@pytest.mark.parametrize("extra,expected", [
    (["--speeds", "lognormal:x"], "fedbus: speeds 'lognormal:x': lognormal needs a number SIGMA"),
    (["--stragglers", "5"], "fedbus: 5 stragglers among 4 workers"),
    (["--stragglers", "1", "--slowdown", "0.5"], "fedbus: slowdown 0.5 must lie in [1, 1000]"),
    (["--mode", "sideways"], "usage: fedbus sim"),
])
def test_sim_straggler_options_are_validated(tmp_path, extra, expected):
    (tmp_path / "job.yaml").write_text(JOB)
    result = fedbus("sim", "--job", "job.yaml", "--workers", "4", *extra, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[0].startswith(expected), result.stderr
