"""The coordinator's model paged out to a file mapping between a round's announcement and its
aggregation (``fedbus coordinator --page-out-above``) changes nothing in the result: a
deterministic FedAdam job (server state as a second committed object) with every model
paged out (``--page-out-above 0``) and announced by reference (8 KiB inline limit) ends
bit-identical to the same job with the model kept in memory.

Both runs use their own nats-server and the same job spec, federation, keys and seeds,
through the CLI (a coordinator and three workers each)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.e2e_support import LocalFederation, small_job

pytestmark = pytest.mark.e2e

WORKERS = 3
ROUNDS = 3


def job():
    spec = small_job("e2e-page-out", rounds=ROUNDS, min_workers=WORKERS, min_updates=WORKERS, deadline_s=60.0,
                     deterministic=True, server_optimizer={"name": "adam", "lr": 0.05},
                     train={"epochs": 1, "batch_size": 32, "lr": 0.05},
                     evaluation={"server_test": True, "federated": False, "final_round": False})
    return spec.model_copy(update={"transport": spec.transport.model_copy(update={"inline_max_bytes": 8 * 1024})})


def run(fed: LocalFederation, page_out: str) -> dict[str, torch.Tensor]:
    try:
        fed.start_coordinator("--page-out-above", page_out)
        fed.start_workers()
        assert fed.wait_coordinator(180) == 0, fed.tail_logs()
        fed.wait_all(30)
    finally:
        fed.stop()
    assert fed.summary()["rounds_completed"] == ROUNDS
    return torch.load(fed.run_dir / "final_model.pt", weights_only=True)


def paged_versions(run_dir: Path) -> list[int]:
    events = [json.loads(line) for line in (run_dir / "logs" / "coordinator.log").read_text().splitlines()
              if line.startswith("{")]
    return [e["model_version"] for e in events if e.get("event") == "model.paged_out"]


def test_a_paged_out_model_gives_the_same_job_bit_for_bit(nats_server_factory, tmp_path):
    spec = job()
    kept = LocalFederation(tmp_path / "kept", nats_server_factory().url, spec, WORKERS)
    in_memory = run(kept, "off")
    paged = LocalFederation(tmp_path / "paged", nats_server_factory().url, spec, WORKERS)
    # The same federation and keys: every worker has the same partition and seeds.
    (paged.run_dir / "federation.yaml").write_bytes((kept.run_dir / "federation.yaml").read_bytes())
    for key in (kept.run_dir / "keys").iterdir():
        (paged.run_dir / "keys" / key.name).write_bytes(key.read_bytes())
    # What a coordinator SIGKILLed mid page-out leaves (a spill file created, never mapped and
    # unlinked): the next coordinator on this run directory removes it at start.
    (paged.run_dir / "spill").mkdir()
    (paged.run_dir / "spill" / "fedbus-spill-left-by-a-kill").write_bytes(b"\0" * 65536)
    paged_out = run(paged, "0")

    assert paged_versions(kept.run_dir) == []
    assert paged_versions(paged.run_dir) == list(range(ROUNDS)), "every round's base was paged out"
    assert list((paged.run_dir / "spill").iterdir()) == [], "the files are unlinked once mapped, leftovers removed"
    assert set(paged_out) == set(in_memory)
    for name, t in in_memory.items():
        assert torch.equal(paged_out[name], t), name
    assert any(not torch.equal(t, torch.zeros_like(t)) for t in in_memory.values())
