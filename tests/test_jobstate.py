"""JobStateStore against a real nats-server: commit/load, forgery, compare-and-set."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from fedbus.bus import KV_BUCKET, Subjects, connect, ensure_job_infrastructure
from fedbus.coordinator.jobstate import JobStateError, JobStateStore
from fedbus.coordinator.records import JobRecord
from fedbus.crypto.keys import Identity

MODEL = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "n": torch.tensor(4, dtype=torch.int64)}
RUN = "r1700000000000-0123abcd"
# Server-side strategy state committed with the model: tensors, ints and floats, nested.
STRATEGY = {"rule": {"c": {"w": torch.full((2, 3), 0.25, dtype=torch.float64)}},
            "optimizer": {"step": 7, "lr": 0.1, "m": {"w": torch.ones(2, 3)}}}


def rec(round_: int, version: int, completed: int, failed: int) -> JobRecord:
    return JobRecord(round=round_, phase="round_open", model_version=version, rounds_completed=completed,
                     failed_in_a_row=failed, cohort=("w1", "w2"), declared={"w1": 5, "w2": 7})


async def scenario(url: str) -> dict:
    me = Identity.generate("coordinator", "coordinator")
    nc = await connect(url, name="jobstate-test", first_connect_timeout=10)
    js = nc.jetstream()
    await ensure_job_infrastructure(js, Subjects("j1"))
    out: dict = {}
    try:
        store = JobStateStore(nc, js, "j1", me)
        await store.reset()
        out["empty"] = await store.load()
        await store.commit(run=RUN, record=rec(3, 2, 2, 1), model=MODEL, strategy_state=STRATEGY,
                           now_ms=1)
        out["loaded"] = await JobStateStore(nc, js, "j1", me).load()

        # A second coordinator that never loaded the record cannot create it again ...
        rival = JobStateStore(nc, js, "j1", Identity.generate("coordinator", "coordinator"))
        try:
            await rival.commit(run=RUN, record=rec(9, 9, 9, 0), model=MODEL, strategy_state=STRATEGY,
                           now_ms=2)
            out["rival_create"] = "accepted"
        except Exception as exc:
            out["rival_create"] = type(exc).__name__
        # ... and one whose revision is stale cannot overwrite it.
        stale = JobStateStore(nc, js, "j1", me)
        await stale.load()
        await store.commit(run=RUN, record=rec(4, 3, 3, 0), model=MODEL, strategy_state=STRATEGY,
                           now_ms=3)
        try:
            # Other weights under the same version: must not replace what the record points at.
            other = {"w": MODEL["w"] + 1, "n": MODEL["n"]}
            await stale.commit(run=RUN, record=rec(4, 3, 3, 0), model=other, strategy_state=STRATEGY,
                           now_ms=4)
            out["stale_update"] = "accepted"
        except Exception as exc:
            out["stale_update"] = type(exc).__name__
        # The refused writers did not damage what is committed.
        out["after_conflicts"] = await JobStateStore(nc, js, "j1", me).load()

        # A record rewritten by someone without the coordinator's key is refused.
        kv = await js.key_value(KV_BUCKET)
        entry = await kv.get("j1")
        forged = json.loads(entry.value)
        forged["record"]["rounds_completed"] = 99
        await kv.put("j1", json.dumps(forged).encode())
        try:
            await JobStateStore(nc, js, "j1", me).load()
            out["forged"] = "accepted"
        except JobStateError as exc:
            out["forged"] = str(exc)
    finally:
        await nc.close()
    return out


def test_commit_load_cas_and_forgery(nats_server):
    out = asyncio.run(scenario(nats_server.url))
    assert out["empty"] is None
    loaded = out["loaded"]
    r = loaded.record
    assert (r.round, r.model_version, r.rounds_completed, r.failed_in_a_row, r.phase) == (3, 2, 2, 1, "round_open")
    assert loaded.run == RUN and r.cohort == ("w1", "w2") and r.declared == {"w1": 5, "w2": 7}
    st = loaded.strategy_state
    assert torch.equal(st["rule"]["c"]["w"], STRATEGY["rule"]["c"]["w"]) and st["rule"]["c"]["w"].dtype == torch.float64
    assert st["optimizer"]["step"] == 7 and type(st["optimizer"]["step"]) is int
    assert st["optimizer"]["lr"] == 0.1 and torch.equal(st["optimizer"]["m"]["w"], torch.ones(2, 3))
    assert set(loaded.model) == set(MODEL) and all(torch.equal(loaded.model[k], MODEL[k]) for k in MODEL)
    assert out["rival_create"] == "KeyWrongLastSequenceError"
    assert out["stale_update"] == "KeyWrongLastSequenceError"
    assert out["after_conflicts"].record.model_version == 3 and torch.equal(out["after_conflicts"].model["w"], MODEL["w"])
    assert "not signed by this coordinator" in out["forged"]


def test_load_refuses_a_record_signed_by_another_key(nats_server):
    async def go() -> str:
        nc = await connect(nats_server.url, name="jobstate-test", first_connect_timeout=10)
        js = nc.jetstream()
        await ensure_job_infrastructure(js, Subjects("j2"))
        try:
            writer = JobStateStore(nc, js, "j2", Identity.generate("coordinator", "coordinator"))
            await writer.reset()
            await writer.commit(run=RUN, record=rec(1, 1, 1, 0), model=MODEL, strategy_state=STRATEGY,
                           now_ms=1)
            with pytest.raises(JobStateError):
                await JobStateStore(nc, js, "j2", Identity.generate("coordinator", "coordinator")).load()
            return "ok"
        finally:
            await nc.close()

    assert asyncio.run(go()) == "ok"
