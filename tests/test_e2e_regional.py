"""Issue 9: regional aggregators through the CLI against a real nats-server.

Two regions (r0, r1) of two workers each, a `fedbus aggregator` per region and a
coordinator with topology: regional. Every update reaches the coordinator inside its
region's signed partial (summary rows name the region of every accepted worker), and
each round's model equals a flat FedAvg of that round's updates, recomputed here from
the update stream and the round's base model on the control stream.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from fedbus.bus import Subjects
from tests.e2e_support import LocalFederation, small_job
from tests.test_e2e_strategies import read_stream

pytestmark = pytest.mark.e2e


def regional_job(rounds: int = 3):
    job = small_job("e2e-regional", rounds=rounds, min_workers=4, min_updates=4, deadline_s=30.0,
                    evaluation={"final_round": False})
    return type(job).model_validate({**job.model_dump(by_alias=True), "topology": "regional"})


def flat_fedavg(base: dict, updates: list) -> dict:
    """base + Σ n_i (y_i − base) / Σ n_i, in float64."""
    total = sum(u.fields.num_samples for u in updates)
    out = {}
    for k, x in base.items():
        if not x.is_floating_point():
            continue
        acc = torch.zeros_like(x, dtype=torch.float64)
        for u in updates:
            acc += u.fields.num_samples * (u.tensors[k].double() - x.double())
        out[k] = (x.double() + acc / total).to(x.dtype)
    return out


def test_regional_aggregators_carry_every_update_and_the_model_equals_flat_fedavg(nats_server, tmp_path):
    job = regional_job()
    fed = LocalFederation(tmp_path, nats_server.url, job, 4, regions=2, aggregators=True)
    summary = fed.run_job()
    assert summary["reason"] == "completed" and summary["rounds_completed"] == job.rounds, fed.tail_logs()
    regions = {w.id: w.region for w in fed.federation.workers()}
    for row in summary["rounds"]:
        assert row["accepted"] == 4, row
        # Every accepted update came inside its own region's partial.
        assert row["via_region"] == {w: regions[w] for w in row["accepted_workers"]}, row
    assert summary["updates_rejected"] == {}
    # Every worker sealed its updates to its region's aggregator (the proofs say so).
    assert summary["updates_sealed"] == summary["updates_accepted"] == 4 * job.rounds

    subjects = Subjects(job.job)
    opens = asyncio.run(read_stream(fed, subjects.ctl("round.open")))
    # Each region's updates live in that region's own stream (no stream holds them all).
    updates = [u for r in ("r0", "r1") for u in asyncio.run(read_stream(fed, subjects.upd_region(r)))]
    assert len(updates) == 4 * job.rounds
    assert {u.header.sealed_to for u in updates} == {"agg-r0", "agg-r1"}
    partials = asyncio.run(read_stream(fed, subjects.agg_all))
    assert len(partials) == 2 * job.rounds and {p.header.sender for p in partials} == {"agg-r0", "agg-r1"}
    bases = {o.fields.round: o.tensors for o in opens}
    import fedbus.protocol.tensor_groups as tg
    final = torch.load(tmp_path / "final_model.pt")
    for r in range(1, job.rounds + 1):
        base, _ = tg.split_groups(bases[r])
        expected = flat_fedavg(base, [u for u in updates if u.header.round == r])
        got = tg.split_groups(bases[r + 1])[0] if r + 1 in bases else final
        for k, v in expected.items():
            assert torch.allclose(got[k], v, rtol=1e-5, atol=1e-6), (r, k, (got[k] - v).abs().max())


def test_a_robust_rule_inside_each_region_withstands_an_attacker_per_region(nats_server, tmp_path):
    """region_strategy median (f=1) in each region of three workers, one of them a validly
    signed attacker (sign flip x10); the coordinator averages the regions' results."""
    job = small_job("e2e-regional-robust", rounds=3, min_workers=6, min_updates=6, deadline_s=30.0,
                    evaluation={"final_round": False})
    job = type(job).model_validate({**job.model_dump(by_alias=True), "topology": "regional",
                                    "region_strategy": {"name": "median", "f": 1}})
    fed = LocalFederation(tmp_path, nats_server.url, job, 6, regions=2, aggregators=True)
    attackers = ("w01", "w02")  # one in r0, one in r1
    summary = fed.run_job(worker_args=lambda w: ("--simulate-attack", "sign_flip:10") if w in attackers else ())
    assert summary["reason"] == "completed", fed.tail_logs()
    assert all(r["accepted"] == 6 and set(r["via_region"].values()) == {"r0", "r1"} for r in summary["rounds"])
    # The attackers' updates are inside the partials (the median outvoted them), and the model learned.
    assert summary["final_accuracy"] > 0.85, summary["rounds"]


def test_async_fedbuff_through_regional_aggregators(nats_server, tmp_path):
    """mode: async, topology: regional: each region forwards its updates every
    region_buffer_size, one partial per base version; the coordinator weighs each by its
    staleness, commits every version once and sees every update through its region."""
    job = small_job("e2e-regional-async", rounds=8, min_workers=4, min_updates=1, deadline_s=30.0,
                    evaluation={"final_round": False})
    job = type(job).model_validate({**job.model_dump(by_alias=True), "topology": "regional", "mode": "async",
                                    "async": {"buffer_size": 2, "region_buffer_size": 1, "max_staleness": 4},
                                    # Bodies above 8 KiB out of line: assignments name their version's
                                    # committed model (aggregators and workers read the models bucket).
                                    "transport": {**job.transport.model_dump(), "inline_max_bytes": 8 * 1024}})
    fed = LocalFederation(tmp_path, nats_server.url, job, 4, regions=2, aggregators=True)
    summary = fed.run_job()
    assert summary["reason"] == "completed", fed.tail_logs()
    rows = summary["rounds"]
    assert [r["model_version"] for r in rows] == list(range(1, job.rounds + 1))
    regions = {w.id: w.region for w in fed.federation.workers()}
    pairs = [(w, t) for r in rows for w, t in zip(r["accepted_workers"], r["tickets"])]
    assert len(pairs) == len(set(pairs)) == summary["updates_accepted"]  # nothing folded twice
    for r in rows:
        assert r["folded"] >= 2 and len(r["staleness"]) == r["folded"]
        assert r["via_region"] == {w: regions[w] for w in r["accepted_workers"]}, r
    assert summary["final_accuracy"] > 0.8, rows
