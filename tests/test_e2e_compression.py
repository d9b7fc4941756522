"""Top-k compression with error feedback over NATS: coordinator and workers as CLI processes.

The updates on the bus are sparse (indices and values, no dense float tensor), the
coordinator decodes them against the round's model and learns, summary.json counts the
update bytes, and each worker persisted its error-feedback residual with its state.
"""

from __future__ import annotations

import asyncio

import pytest

from fedbus.bus import Subjects
from fedbus.compression.codecs import TOPK_INDEX, TOPK_VALUE
from fedbus.protocol.messages import Update, encode_body
from fedbus.protocol.tensor_groups import split_groups
from fedbus.tasks import load_task
from fedbus.worker.state import WorkerStateStore
from tests.e2e_support import LocalFederation, small_job
from tests.test_e2e_strategies import read_stream

pytestmark = pytest.mark.e2e

WORKERS = 3
ROUNDS = 3


def test_topk_updates_travel_sparse_and_the_job_learns(nats_server, tmp_path):
    job = small_job("e2e-topk", rounds=ROUNDS, min_workers=WORKERS, min_updates=WORKERS,
                    compression={"method": "topk", "fraction": 0.05})
    fed = LocalFederation(tmp_path, nats_server.url, job, WORKERS)
    summary = fed.run_job(timeout=240)
    assert summary["reason"] == "completed", fed.tail_logs()
    assert summary["updates_accepted"] == ROUNDS * WORKERS and summary["updates_rejected"] == {}
    # It learned (chance is 0.1) from 5% of each delta per round.
    assert summary["rounds"][-1]["test_accuracy"] > 0.8, summary["rounds"]

    model = {k: v for k, v in load_task(job.task).build_model(job.task_params).state_dict().items()}
    floats = {k for k, v in model.items() if v.is_floating_point()}
    updates = asyncio.run(read_stream(fed, Subjects(job.job).upd_all))
    assert len(updates) == ROUNDS * WORKERS
    for got in updates:
        dense, groups = split_groups(got.tensors)
        assert not set(dense) & floats  # no dense float tensor left
        assert set(groups) == {TOPK_INDEX, TOPK_VALUE} and set(groups[TOPK_INDEX]) == floats
        for name in floats:
            assert groups[TOPK_INDEX][name].numel() == max(1, -(-model[name].numel() * 5 // 100))
    # The coordinator's count is the signed body lengths of what it accepted.
    assert summary["update_bytes"] == sum(got.header.length for got in updates)
    dense_body = len(encode_body(Update(round=1, base_version=0, num_samples=1, num_steps=1), model))
    assert summary["update_bytes"] * 8 < ROUNDS * WORKERS * dense_body

    for w in fed.federation.workers():
        store = WorkerStateStore(fed.state_dir(w.id))
        runs = sorted(p.name for p in (store.root / "runs").iterdir())
        residual = store.load_strategy(runs[-1])["compress"]["residual"]
        assert set(residual) == floats and any(float(t.abs().sum()) > 0 for t in residual.values())


def test_int8_through_a_regional_aggregator_decodes_to_flat_fedavg(nats_server, tmp_path):
    """The region's aggregator decodes each int8 update against the round's model; the
    committed model equals FedAvg of the updates as decoded here from the stream."""
    import torch

    from fedbus.transforms import build_worker_pipeline, decode_update

    rounds = 2
    job = small_job("e2e-int8-regional", rounds=rounds, min_workers=2, min_updates=2,
                    evaluation={"final_round": False}, topology="regional", compression={"method": "int8"})
    fed = LocalFederation(tmp_path, nats_server.url, job, 2, regions=1, aggregators=True)
    summary = fed.run_job(timeout=240)
    assert summary["reason"] == "completed" and summary["updates_rejected"] == {}, fed.tail_logs()
    subjects = Subjects(job.job)
    opens = {o.fields.round: split_groups(o.tensors)[0]
             for o in asyncio.run(read_stream(fed, subjects.ctl("round.open")))}
    updates = asyncio.run(read_stream(fed, subjects.upd_all))
    assert len(updates) == 2 * rounds
    final = torch.load(tmp_path / "final_model.pt")
    receiver = build_worker_pipeline(job)
    for r in range(1, rounds + 1):
        base = opens[r]
        decoded = [decode_update(receiver, u.header.sender, u.fields, u.tensors, base)
                   for u in updates if u.header.round == r]
        assert all(u.tensors[k].dtype == torch.uint8 for u in updates for k in base if base[k].is_floating_point())
        total = sum(d.num_samples for d in decoded)
        got = opens.get(r + 1, final)
        for k, x in base.items():
            if x.is_floating_point():
                mean = sum(d.num_samples * (d.state[k].double() - x.double()) for d in decoded) / total
                assert torch.allclose(got[k].double(), x.double() + mean, rtol=1e-5, atol=1e-6), (r, k)
