"""A SCAFFOLD + FedAdam job in deterministic mode whose coordinator is SIGKILLed and
resumed ends with a final model bit-identical to the same job run uninterrupted (issue 7,
acceptance 6), through the CLI.

Both runs use their own nats-server, the same job spec, federation (worker ids and
partitions) and seeds: ``fedbus coordinator`` and three ``fedbus worker`` processes each.
In the second run, once round 2 has closed, w03 is paused (SIGSTOP) so that the round
under way cannot close: the other workers' updates for it are held unacknowledged by the
coordinator. The coordinator is then SIGKILLed, restarted with ``--resume``, and w03 is
continued (SIGCONT); the workers notice the reopened round and resend (or send) their
updates, and the held ones come back from the stream as well. Deterministic mode folds each round's updates in worker-id
order, so neither arrival order nor the redeliveries can change the sums; the workers'
training seeds must not depend on the coordinator's run id (a fresh start makes a new
one), and the server's SCAFFOLD c and Adam moments must survive the commit.

Every tensor of the two final_model.pt files must be ``torch.equal``.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from fedbus.demo import cli_command
from tests.e2e_support import LocalFederation, wait_for_round, small_job

pytestmark = pytest.mark.e2e

WORKERS = ("w01", "w02", "w03")
ROUNDS = 6
PAUSE_AFTER_ROUND = 2
PAUSED_WORKER = "w03"


def bitwise_job():
    job = small_job("e2e-resume-bitwise", rounds=ROUNDS, min_workers=len(WORKERS), min_updates=len(WORKERS),
                    deadline_s=60.0, deterministic=True, strategy={"name": "scaffold"},
                    server_optimizer={"name": "adam", "lr": 0.05},
                    train={"epochs": 1, "batch_size": 32, "lr": 0.05},
                    evaluation={"server_test": True, "federated": False, "final_round": False})
    # Bodies above 8 KiB go out of line: the model is announced by reference to its committed
    # object, and the resumed coordinator reloads the model and the server state (SCAFFOLD's c,
    # Adam's moments) from their two committed objects.
    return job.model_copy(update={"transport": job.transport.model_copy(update={"inline_max_bytes": 8 * 1024})})


def start(fed: LocalFederation) -> None:
    fed.start_coordinator()
    for w in WORKERS:
        fed.start_worker(w)


def final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "final_model.pt", weights_only=True)


def test_resumed_deterministic_scaffold_fedadam_job_ends_bit_identical(nats_server_factory, tmp_path):
    job = bitwise_job()
    straight = LocalFederation(tmp_path / "straight", nats_server_factory().url, job, len(WORKERS))
    try:
        start(straight)
        assert straight.wait_coordinator(300) == 0, straight.tail_logs()
        straight.wait_all(60)
    finally:
        straight.stop()

    crashed = LocalFederation(tmp_path / "crashed", nats_server_factory().url, job, len(WORKERS))
    # The same federation file as the first run, so every worker has the same partition.
    (crashed.run_dir / "federation.yaml").write_bytes((straight.run_dir / "federation.yaml").read_bytes())
    for key in (straight.run_dir / "keys").iterdir():
        (crashed.run_dir / "keys" / key.name).write_bytes(key.read_bytes())
    try:
        start(crashed)
        wait_for_round(crashed, PAUSE_AFTER_ROUND, 240)
        paused = crashed.group.procs[PAUSED_WORKER]
        os.kill(paused.pid, signal.SIGSTOP)  # the open round now waits for it
        time.sleep(1.0)  # the others' updates arrive and are held
        coordinator = crashed.group.procs["coordinator"]
        assert coordinator.poll() is None, "the job ended before the crash"
        coordinator.kill()  # SIGKILL
        coordinator.wait()
        resumed = crashed.group.start("coordinator-resumed", cli_command(
            "coordinator", "--job", str(crashed.run_dir / "job.yaml"),
            "--federation", str(crashed.run_dir / "federation.yaml"), "--key", str(crashed.key("coordinator")),
            "--nats", crashed.nats_url, "--run-dir", str(crashed.run_dir), "--resume"))
        os.kill(paused.pid, signal.SIGCONT)
        assert resumed.wait(timeout=300) == 0, crashed.tail_logs()
        crashed.wait_all(60)
    finally:
        crashed.stop()

    for fed in (straight, crashed):
        s = fed.summary()
        assert s["reason"] == "completed" and s["rounds_completed"] == ROUNDS, (s, fed.tail_logs())
    resumed_summary = crashed.summary()
    assert resumed_summary["incarnations"] == 2 and resumed_summary["resumed_from_round"] >= PAUSE_AFTER_ROUND
    assert '"coordinator.resumed"' in (crashed.run_dir / "logs" / "coordinator-resumed.log").read_text()
    a, b = final_model(straight.run_dir), final_model(crashed.run_dir)
    assert set(a) == set(b)
    differing = [k for k in a if not (a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]))]
    assert not differing, f"final models differ in {differing}"
