"""Secure aggregation inside training rounds, over a real nats-server with the coordinator
and the workers as separate CLI processes (privacy.secure_aggregation, topology: flat).

Job A, 6 workers: in round 1 w02 crashes before its masked input and w05 after it (2 of
6). The round aggregates the 5 survivors (w05's self-mask rebuilt from shares, w02's
pairwise masks removed), and the released model is the plain FedAvg of exactly those
workers' clipped deltas, which each worker also dumped in plaintext under a test-only
environment variable, within the quantization bound.

Job B, 5 workers: 3 crash before their masked input, more than the threshold allows
(t = 3 of 5 holders): round 1 fails by name (secagg_below_threshold), the coordinator
never asks for a share, and no worker answers an unmasking.
"""

from __future__ import annotations

import json
import os
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
from tests.e2e_support import LocalFederation, small_job, wait_for_round

pytestmark = pytest.mark.e2e

CLIP = 1.0


def secure_job(job_id: str, workers: int):
    return small_job(job_id, rounds=1, min_workers=workers, min_updates=3, deadline_s=12.0,
                     evaluation=EvaluationSpec(server_test=False, federated=False, final_round=False),
                     privacy=PrivacySpec(secure_aggregation=SecureAggregationSpec(clip=CLIP, phase_timeout_s=4.0)))


def start(fed: LocalFederation, dropouts: dict[str, str], dump) -> None:
    fed.group.env[DEBUG_DUMP_ENV] = str(dump)
    fed.start_coordinator()
    for w in fed.federation.workers():
        fed.start_worker(w.id, *(("--simulate-dropout", dropouts[w.id]) if w.id in dropouts else ()))


def log_events(fed: LocalFederation, name: str) -> list[dict]:
    lines = (fed.run_dir / "logs" / f"{name}.log").read_text(errors="replace").splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def test_training_round_aggregates_survivors_and_fails_by_name_below_threshold(nats_server, tmp_path):
    # -- job A: 2 of 6 crash, one before and one after its masked input ------------------
    job = secure_job("e2e-sa-rounds", 6)
    dump = tmp_path / "a-deltas"
    dump.mkdir()
    fed = LocalFederation(tmp_path / "a", nats_server.url, job, 6)
    try:
        start(fed, {"w02": "input@1", "w05": "unmask@1"}, dump)
        assert fed.wait_coordinator(timeout=90) == 0, fed.tail_logs()
        exits = fed.wait_all(timeout=20)
    finally:
        fed.stop()
    assert exits["w02"] == 17 and exits["w05"] == 17, exits
    summary = fed.summary()
    closed = summary["rounds"][0]
    assert [r["status"] for r in summary["rounds"]] == ["aggregated"], summary["rounds"]
    survivors = ["w01", "w03", "w04", "w05", "w06"]
    assert closed["accepted_workers"] == survivors
    secure = summary["privacy"]["secure_aggregation"][0]
    assert secure["status"] == "aggregated" and secure["dropped"] == ["w02"] and secure["survivors"] == survivors
    assert (secure["degree"], secure["threshold"]) == (5, 4)

    # The released model against the plain FedAvg of the survivors' clipped deltas.
    task = load_task(job.task)
    torch.manual_seed(job.seed)
    initial = {k: v.detach().clone() for k, v in task.build_model(job.task_params).state_dict().items()}
    final = torch.load(fed.run_dir / "final_model.pt")
    released = flat_delta(final, initial)
    deltas = {w: np.load(dump / f"{w}-r1.npy") for w in ["w01", "w02", "w03", "w04", "w05", "w06"]}
    for w, d in deltas.items():
        assert np.linalg.norm(d) <= CLIP * (1 + 1e-5), (w, np.linalg.norm(d))  # clipped before masking
    plain = np.mean([deltas[w] for w in survivors], axis=0)
    # Quantization moves the sum by at most n/(2s) per coordinate, the mean by that over the
    # survivors; the model is float32, so allow its rounding on top.
    bound = secure["sum_error_bound"] / len(survivors) + 1e-6
    error = np.abs(released - plain).max()
    assert error <= bound, (error, bound)
    with_w02 = np.mean([deltas[w] for w in deltas], axis=0)
    assert np.abs(released - with_w02).max() > 100 * bound  # the crashed worker's delta is not in it
    rejections = summary.get("rejections", {})
    assert not any(k.startswith("secagg") or k in ("bad_share", "inconsistent_shares") for k in rejections), rejections

    # -- job B: 3 of 5 crash before their masked input: below the threshold ----------------
    job = secure_job("e2e-sa-fail", 5)
    fed = LocalFederation(tmp_path / "b", nats_server.url, job, 5)
    try:
        start(fed, {w: "input@1" for w in ("w01", "w02", "w03")}, tmp_path)
        wait_for_round(fed, 1, timeout=90)
        summary = fed.summary()
        for _ in range(50):  # the survivors hear the failure right after the coordinator announced it
            if all(any(e["event"] == "secagg.round_failed" for e in log_events(fed, w)) for w in ("w04", "w05")):
                break
            time.sleep(0.1)
    finally:
        fed.stop()
    row = summary["rounds"][0]
    assert row["status"] == "failed" and row["rejected"].get("secagg_below_threshold") == 1, row
    secure = summary["privacy"]["secure_aggregation"][0]
    assert (secure["status"], secure["reason"], secure["threshold"]) == ("failed", "below_threshold", 3)
    coordinator = log_events(fed, "coordinator")
    assert any(e["event"] == "secagg.failed" and e["reason"] == "below_threshold" for e in coordinator)
    assert not any(e["event"] == "secagg.unmasking" for e in coordinator)  # no share was asked for
    for w in ("w04", "w05"):
        events = log_events(fed, w)
        assert any(e["event"] == "secagg.round_failed" and e["reason"] == "below_threshold" for e in events), w
        assert not any(e["event"] == "secagg.sent_unmask" for e in events), w
    assert not os.path.exists(fed.run_dir / "final_model.pt")
