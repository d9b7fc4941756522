"""Compression over NATS: coordinator, aggregator and workers as CLI processes.

Flat, top-k with error feedback: the updates on the bus are sparse (indices and values, no
dense float tensor), the coordinator decodes them against the round's model and learns,
summary.json counts the update bytes, each worker persisted its error-feedback residual,
and hostile sparse parts from a listed worker's key get named, counted rejections while
its valid updates are folded. Regional, int8: the aggregator's decode gives exactly FedAvg
of the updates as decoded here from the stream.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from fedbus.bus import Subjects, connect, ensure_job_infrastructure
from fedbus.compression.codecs import TOPK_INDEX, TOPK_VALUE
from fedbus.crypto.keys import Identity
from fedbus.messaging import Messenger, verifier_for
from fedbus.protocol.messages import Heartbeat, RoundOpen, Update, encode_body
from fedbus.protocol.tensor_groups import split_groups
from fedbus.tasks import TrainSettings, load_task, training_context
from fedbus.transforms import LocalUpdate, UpdateContext, build_worker_pipeline, decode_update
from fedbus.worker.state import WorkerStateStore
from tests.e2e_support import LocalFederation, cohort_opens, small_job
from tests.test_e2e_strategies import read_stream

pytestmark = pytest.mark.e2e

ROUNDS = 3
HOSTILE = ("index_out_of_range", "duplicate_indices", "excessive_k")


class SparseAttacker:
    """Plays listed worker w04 (whose key it holds): in round 1 it sends three hostile top-k
    updates, then in every round a valid one (a zero delta through the job's real pipeline)."""

    def __init__(self, fed: LocalFederation):
        self.fed = fed
        self.subjects = Subjects(fed.job.job)
        self.me = Identity.load(fed.key("w04"))
        self.valid_bytes = 0

    def _sparse(self, ro: RoundOpen, model: dict, run: str) -> tuple[Update, dict]:
        ctx = training_context(job_seed=0, run=run, worker_id="w04", partition=3, num_partitions=4, round_=ro.round)
        uctx = UpdateContext(training=ctx, settings=TrainSettings(), global_state=model, broadcast={},
                             base_version=ro.model_version)
        out = build_worker_pipeline(self.fed.job).apply(uctx, LocalUpdate(ro.round, ro.model_version, dict(model),
                                                                          50, 1))
        return out.fields, out.tensors

    async def run(self, deadline_s: float) -> None:
        nc = await connect(self.fed.nats_url, name="sparse-attacker")
        js = nc.jetstream()
        await ensure_job_infrastructure(js, self.subjects)
        job = self.fed.job
        messenger = Messenger(nc, js, self.me, self.subjects, inline_max_bytes=job.transport.inline_max_bytes)
        verifier = verifier_for(job, self.fed.federation)
        control: asyncio.Queue = asyncio.Queue()
        await js.subscribe(self.subjects.ctl("round.open"), ordered_consumer=True, cb=control.put)
        await js.subscribe(self.subjects.ctl("job.done"), ordered_consumer=True, cb=control.put)

        async def heartbeat() -> None:
            while True:
                await messenger.publish(self.subjects.hb("w04"), Heartbeat(num_samples=50, partition=3), round=0,
                                        persist=False)
                await asyncio.sleep(0.5)

        beat = asyncio.create_task(heartbeat())
        mine = self.subjects.upd("default", "w04")
        try:
            async for got in cohort_opens(messenger, verifier, control, "w04", deadline_s):
                ro: RoundOpen = got.fields  # type: ignore[assignment]
                run = got.header.run
                model = split_groups(got.tensors)[0]
                fields, tensors = self._sparse(ro, model, run)
                if ro.round == 1:
                    name = f"{TOPK_INDEX}/" + next(k for k, t in model.items() if t.dim() == 2)
                    idx = tensors[name]
                    for reason, bad in zip(HOSTILE, (
                            torch.cat([idx[:-1], torch.tensor([2**30], dtype=idx.dtype)]),
                            torch.cat([idx[:-1], idx[:1]]),
                            torch.arange(idx.numel() + 1, dtype=idx.dtype))):
                        hostile = {**tensors, name: bad}
                        if reason == "excessive_k":
                            value = name.replace(TOPK_INDEX, TOPK_VALUE)
                            hostile[value] = torch.zeros(idx.numel() + 1)
                        await messenger.publish(mine, fields, hostile, round=ro.round, run=run)
                await messenger.publish(mine, fields, tensors, round=ro.round, run=run)
                self.valid_bytes += len(encode_body(fields, tensors))
        finally:
            beat.cancel()
            await nc.close()


def test_topk_updates_travel_sparse_hostile_parts_are_rejected_and_the_job_learns(nats_server, tmp_path):
    job = small_job("e2e-topk", rounds=ROUNDS, min_workers=4, min_updates=3, evaluation={"final_round": False},
                    compression={"method": "topk", "fraction": 0.05},
                    retention={"keep_updates": True})  # the test reads every update back from the stream
    fed = LocalFederation(tmp_path, nats_server.url, job, 4)
    honest = ("w01", "w02", "w03")
    attacker = SparseAttacker(fed)
    try:
        fed.start_coordinator()
        for w in honest:
            fed.start_worker(w)
        asyncio.run(attacker.run(deadline_s=240))
        assert fed.wait_coordinator(timeout=120) == 0, fed.tail_logs()
        fed.wait_all(timeout=30)
    finally:
        fed.stop()
    summary = fed.summary()
    assert summary["reason"] == "completed", fed.tail_logs()
    # Every hostile part got its named rejection; every valid update (w04's too) was folded.
    assert summary["updates_rejected"] == dict.fromkeys(sorted(HOSTILE), 1), summary["updates_rejected"]
    assert [r["accepted"] for r in summary["rounds"]] == [4] * ROUNDS
    # It learned (chance is 0.1) from 5% of each delta per round.
    assert summary["rounds"][-1]["test_accuracy"] > 0.8, summary["rounds"]

    model = load_task(job.task).build_model(job.task_params).state_dict()
    floats = {k for k, v in model.items() if v.is_floating_point()}
    updates = [u for u in asyncio.run(read_stream(fed, Subjects(job.job).upd_all)) if u.header.sender in honest]
    assert len(updates) == ROUNDS * len(honest)
    for got in updates:
        dense, groups = split_groups(got.tensors)
        assert not set(dense) & floats  # no dense float tensor left
        assert set(groups) == {TOPK_INDEX, TOPK_VALUE} and set(groups[TOPK_INDEX]) == floats
        for name in floats:
            assert groups[TOPK_INDEX][name].numel() == max(1, -(-model[name].numel() * 5 // 100))
    # The coordinator's count is the signed body lengths of what it accepted.
    assert summary["update_bytes"] == sum(got.header.length for got in updates) + attacker.valid_bytes
    dense_body = len(encode_body(Update(round=1, base_version=0, num_samples=1, num_steps=1), model))
    assert summary["update_bytes"] * 8 < ROUNDS * 4 * dense_body

    for w in honest:
        store = WorkerStateStore(fed.state_dir(w))
        runs = sorted(p.name for p in (store.root / "runs").iterdir())
        residual = store.load_strategy(runs[-1])["compress"]["residual"]
        assert set(residual) == floats and any(float(t.abs().sum()) > 0 for t in residual.values())


def test_int8_through_a_regional_aggregator_decodes_to_flat_fedavg(nats_server, tmp_path):
    """The region's aggregator decodes each int8 update against the round's model; the
    committed model equals FedAvg of the updates as decoded here from the stream."""
    import torch

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
