"""Secure aggregation inside training rounds, over a real nats-server with the coordinator
and 6 workers as separate CLI processes (privacy.secure_aggregation, topology: flat).

Round 1: w01, w02 and w03 go silent before their masked input (their links drop; they stay
up), more than the threshold allows (t = 4 of 6 holders): the round fails by name
(secagg_below_threshold), the coordinator asks no one for a share and no worker answers
an unmasking; the model does not move.

Round 2: w04 crashes just before its masked input (it exits 17 at that exact point, which
an outside SIGKILL cannot hit reliably), and w06 is SIGKILLed by the test once it logged
its masked input sent: 2 of 6 processes gone. The round aggregates the 5 survivors (w06's self-mask rebuilt
from shares, w04's pairwise masks removed), and the released model is the plain FedAvg of
exactly those workers' clipped deltas, which each worker also dumped in plaintext under a
test-only environment variable, within the quantization bound.
"""

from __future__ import annotations

import json
import signal
import time

import numpy as np
import pytest
import torch

from fedbus.jobspec import EvaluationSpec
from fedbus.privacy.spec import PrivacySpec
from fedbus.secagg.rounds import flat_delta
from fedbus.secagg.spec import SecureAggregationSpec
from fedbus.tasks import load_task
from fedbus.worker.service import DEBUG_DUMP_ENV
from tests.e2e_support import LocalFederation, small_job

pytestmark = pytest.mark.e2e

CLIP = 1.0


def log_events(fed: LocalFederation, name: str) -> list[dict]:
    path = fed.run_dir / "logs" / f"{name}.log"
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    events = []
    for line in lines:
        try:
            events.append(json.loads(line))
        except ValueError:  # a line still being written, or a warning printed by the CLI
            continue
    return events


def test_training_rounds_fail_by_name_below_threshold_then_aggregate_survivors_of_crashes(nats_server, tmp_path):
    job = small_job("e2e-sa-rounds", rounds=1, min_workers=6, min_updates=3, deadline_s=8.0,
                    evaluation=EvaluationSpec(server_test=False, federated=False, final_round=False),
                    privacy=PrivacySpec(secure_aggregation=SecureAggregationSpec(clip=CLIP, phase_timeout_s=2.0)))
    dump = tmp_path / "deltas"
    dump.mkdir()
    fed = LocalFederation(tmp_path / "run", nats_server.url, job, 6)
    fed.group.env[DEBUG_DUMP_ENV] = str(dump)
    dropouts = {"w01": "input@1:silent", "w02": "input@1:silent", "w03": "input@1:silent", "w04": "input@2"}
    try:
        coordinator = fed.start_coordinator()
        for w in fed.federation.workers():
            fed.start_worker(w.id, *(("--simulate-dropout", dropouts[w.id]) if w.id in dropouts else ()))
        deadline = time.monotonic() + 120
        while not any(e["event"] == "secagg.sent_input" and e["round"] == 2 for e in log_events(fed, "w06")):
            assert time.monotonic() < deadline and coordinator.poll() is None, fed.tail_logs()
            time.sleep(0.05)
        fed.kill("w06")  # after its masked input; the round waits for w04's until the deadline
        assert fed.wait_coordinator(timeout=60) == 0, fed.tail_logs()
        exits = fed.wait_all(timeout=20)
    finally:
        fed.stop()
    assert exits["w04"] == 17 and exits["w06"] == -signal.SIGKILL, exits
    summary = fed.summary()
    failed, closed = summary["rounds"]
    secure = summary["privacy"]["secure_aggregation"]

    # -- round 1: below the threshold, by name, nothing revealed ---------------------------
    assert failed["status"] == "failed" and failed["rejected"].get("secagg_below_threshold") == 1, failed
    assert (secure[0]["status"], secure[0]["reason"], secure[0]["threshold"]) == ("failed", "below_threshold", 4)
    coordinator = log_events(fed, "coordinator")
    assert any(e["event"] == "secagg.failed" and e["round"] == 1 and e["reason"] == "below_threshold"
               for e in coordinator)
    assert [e["round"] for e in coordinator if e["event"] == "secagg.unmasking"] == [2]  # no share asked in round 1
    for w in ("w01", "w02", "w03", "w04", "w05", "w06"):
        events = log_events(fed, w)
        assert not any(e["event"] == "secagg.sent_unmask" and e["round"] == 1 for e in events), w
        if w in ("w04", "w05", "w06"):  # they sent their masked input, then heard the failure
            assert any(e["event"] == "secagg.round_failed" and e["round"] == 1 for e in events), w

    # -- round 2: 2 of 6 crashed, one before and one after its masked input ---------------
    survivors = ["w01", "w02", "w03", "w05", "w06"]
    assert closed["status"] == "aggregated" and closed["accepted_workers"] == survivors, closed
    assert secure[1]["status"] == "aggregated" and secure[1]["dropped"] == ["w04"], secure[1]
    assert secure[1]["survivors"] == survivors and (secure[1]["degree"], secure[1]["threshold"]) == (5, 4)
    task = load_task(job.task)
    torch.manual_seed(job.seed)
    initial = {k: v.detach().clone() for k, v in task.build_model(job.task_params).state_dict().items()}
    released = flat_delta(torch.load(fed.run_dir / "final_model.pt"), initial)  # round 1 moved nothing
    deltas = {w: np.load(dump / f"{w}-r2.npy") for w in ("w01", "w02", "w03", "w04", "w05", "w06")}
    for w, d in deltas.items():
        assert np.linalg.norm(d) <= CLIP * (1 + 1e-5), (w, np.linalg.norm(d))  # clipped before masking
    plain = np.mean([deltas[w] for w in survivors], axis=0)
    # Quantization moves the sum by at most n/(2s) per coordinate, the mean by that over the
    # survivors; the model is float32, so allow its rounding on top.
    bound = secure[1]["sum_error_bound"] / len(survivors) + 1e-6
    error = np.abs(released - plain).max()
    assert error <= bound, (error, bound)
    with_w04 = np.mean(list(deltas.values()), axis=0)
    assert np.abs(released - with_w04).max() > 100 * bound  # the crashed worker's delta is not in it
    assert not any(k in summary.get("rejections", {}) for k in ("bad_share", "inconsistent_shares", "wrong_length"))
