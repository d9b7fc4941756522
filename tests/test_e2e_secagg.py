"""Secure aggregation over a real nats-server: a server and 7 worker processes (``fedbus
secure-sum``), signed envelopes on the job's streams. 3 of 7 workers crash (one before
its masked input, two after it) and the sum of the survivors still comes out within the
quantization bound; in a round of 5 with 3 gone before their input, the round fails by
name and no one is asked for a share."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedbus.demo import cli_command
from tests.e2e_support import LocalFederation, small_job

pytestmark = pytest.mark.e2e

LENGTH = 5000
WORKERS = 7


def run_round(fed: LocalFederation, round_: int, dropouts: dict[str, str], workers: list[str]
              ) -> tuple[int, dict[str, int], dict]:
    out = fed.run_dir / f"round{round_}"
    inputs = {}
    for i, w in enumerate(workers):
        inputs[w] = np.random.default_rng(100 * round_ + i).uniform(-1, 1, LENGTH)
        np.save(fed.run_dir / f"{w}-{round_}.npy", inputs[w])
        extra = ("--simulate-dropout", dropouts[w]) if w in dropouts else ()
        fed.group.start(f"{w}-r{round_}", cli_command(
            "secure-sum", "worker", *fed._common(w), "--key", str(fed.key(w)), "--round", str(round_),
            "--input", str(fed.run_dir / f"{w}-{round_}.npy"), "--timeout", "120", *extra))
    server = fed.group.start(f"server-r{round_}", cli_command(
        "secure-sum", "server", *fed._common("coordinator"), "--key", str(fed.key("coordinator")), "--round", str(round_),
        "--length", str(LENGTH), "--workers", *workers, "--join-timeout", "90", "--phase-timeout", "4",
        "--out", str(out)))
    code = server.wait(timeout=150)
    exits = {w: fed.group.procs[f"{w}-r{round_}"].wait(timeout=30) for w in workers if w not in dropouts}
    exits |= {w: fed.group.procs[f"{w}-r{round_}"].wait(timeout=30) for w in dropouts}
    result = json.loads((out / "result.json").read_text())
    result["_inputs"] = inputs
    result["_out"] = out
    return code, exits, result


def test_secure_sum_survives_30_percent_crashes_and_fails_by_name_below_threshold(nats_server, tmp_path):
    fed = LocalFederation(tmp_path, nats_server.url, small_job("e2e-secagg", rounds=1, min_workers=1, min_updates=1),
                          WORKERS)
    try:
        # 3 of 7 crash: w02 before its masked input, w05 and w07 after it (before unmasking)
        everyone = [w.id for w in fed.federation.workers()]
        code, exits, result = run_round(fed, 1, {"w02": "input", "w05": "unmask", "w07": "unmask"}, everyone)
        assert code == 0, fed.tail_logs()
        assert exits == {"w01": 0, "w03": 0, "w04": 0, "w06": 0, "w02": 17, "w05": 17, "w07": 17}
        assert result["status"] == "aggregated" and result["rejections"] == {}
        assert result["dropped"] == ["w02"]
        assert result["survivors"] == ["w01", "w03", "w04", "w05", "w06", "w07"]  # w05, w07: self-masks rebuilt
        assert (result["degree"], result["threshold"]) == (6, 4)
        total = np.load(result["_out"] / "sum.npy")
        plain = sum(result["_inputs"][w] for w in result["survivors"])
        error = np.abs(total - plain).max()
        assert error <= result["sum_error_bound"], (error, result["sum_error_bound"])
        assert np.abs(total - plain - result["_inputs"]["w02"]).max() > 0.5  # w02's input is not in it

        # A round of 5 (k = 4, t = 3 of 5 holders) with 3 gone before their masked input
        code, exits, result = run_round(fed, 2, {w: "input" for w in ("w01", "w02", "w03")}, everyone[:5])
        assert code == 3, fed.tail_logs()
        assert (result["status"], result["reason"]) == ("failed", "below_threshold")
        assert not (result["_out"] / "sum.npy").exists() and "survivors" not in result
        assert (result["degree"], result["threshold"]) == (4, 3)
        # The survivors were never asked for shares: they hear the failure and its name, and stop
        assert exits == {"w01": 17, "w02": 17, "w03": 17, "w04": 5, "w05": 5}
        for w in ("w04", "w05"):
            log = (fed.run_dir / "logs" / f"{w}-r2.log").read_text()
            assert '"secagg.round_failed"' in log and '"below_threshold"' in log and '"secagg.answered"' not in log
    finally:
        fed.stop()
