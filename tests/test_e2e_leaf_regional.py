"""Issue 9, acceptance 1 and 2: a hub and two regional leaf nodes (real nats-server
processes from deploy/nats/hub.conf and leaf-*.conf), the coordinator on the hub, an
aggregator and two workers on each leaf, all through the CLI.

The same job runs twice on the same servers: regional (updates stay in each leaf's own
JetStream domain, one partial per region and round crosses to the hub) and flat (every
worker's update crosses to the hub's update stream). Both complete; the regional one
carries every update through an aggregator; the leaf→hub bytes, read from the hub's own
/leafz counters, are compared.
"""

from __future__ import annotations

import asyncio

import pytest

from fedbus.bus import Subjects, connect
from fedbus.bus.monitor import delta, leaf_link_bytes
from tests.e2e_support import LocalFederation, small_job
from fedbus.bus.leafnodes import leaf_topology

pytestmark = pytest.mark.e2e

ROUNDS = 3
WORKERS = 4  # w01, w03 in r0; w02, w04 in r1


def job_for(topology: str, job_id: str):
    job = small_job(job_id, rounds=ROUNDS, min_workers=WORKERS, min_updates=WORKERS, deadline_s=30.0,
                    evaluation={"final_round": False})
    spec = job.model_dump(by_alias=True)
    spec["topology"] = topology
    spec["transport"]["hub_domain"] = "hub"
    return type(job).model_validate(spec)


def run(topo, tmp_path, topology: str) -> tuple[dict, dict[str, int]]:
    """Run one job; the summary and the leaf->hub bytes per region during it."""
    job = job_for(topology, f"leaf-{topology}")
    fed = LocalFederation(tmp_path / topology, topo.hub_url, job, WORKERS, regions=2,
                          aggregators=topology == "regional")
    regions = {w.id: w.region for w in fed.federation.workers()}
    before = leaf_link_bytes(topo.hub_monitor_url)
    summary = fed.run_job(url_of=topo.region_url, timeout=150)
    moved = delta(before, leaf_link_bytes(topo.hub_monitor_url))
    summary["_stored_bytes"] = asyncio.run(hub_stream_bytes(topo.hub_url, Subjects(job.job), topology))
    return summary, {r: moved[topo.leaf_name(r)].in_bytes for r in ("r0", "r1")}, regions


async def hub_stream_bytes(url: str, subjects, topology: str) -> int:
    """Bytes the hub stored for update traffic: every update (flat) or every partial (regional)."""
    nc = await connect(url, name="stream-bytes", first_connect_timeout=10)
    try:
        stream = subjects.agg_stream if topology == "regional" else subjects.upd_stream
        return (await nc.jetstream().stream_info(stream)).state.bytes
    finally:
        await nc.close()


def test_regional_over_leaf_nodes_completes_and_keeps_updates_in_the_regions(tmp_path):
    with leaf_topology(("r0", "r1")) as topo:
        regional, regional_bytes, regions = run(topo, tmp_path, "regional")
        flat, flat_bytes, _ = run(topo, tmp_path, "flat")
    for summary in (regional, flat):
        assert summary["reason"] == "completed" and summary["rounds_completed"] == ROUNDS, summary
        assert all(r["accepted"] == WORKERS for r in summary["rounds"]), summary["rounds"]
    # Every update of the regional job reached the coordinator inside its region's partial.
    for row in regional["rounds"]:
        assert row["via_region"] == {w: regions[w] for w in row["accepted_workers"]}, row
    assert all("via_region" not in row for row in flat["rounds"])
    ratio = {r: flat_bytes[r] / max(1, regional_bytes[r]) for r in flat_bytes}
    print(f"leaf->hub bytes per region: flat {flat_bytes}, regional {regional_bytes}, ratio {ratio}")
    stored = flat["_stored_bytes"] / regional["_stored_bytes"]
    print(f"update traffic stored at the hub: flat {flat['_stored_bytes']} B of updates, regional "
          f"{regional['_stored_bytes']} B of partials: {stored:.2f}x")
    # Less crosses the link in the regional job (all leaf->hub traffic is counted here:
    # heartbeats, reports and JetStream API requests too; the benchmark isolates updates).
    assert all(regional_bytes[r] < flat_bytes[r] for r in flat_bytes), (flat_bytes, regional_bytes)


def test_async_fedbuff_through_aggregators_over_leaf_nodes(tmp_path):
    """mode: async over the same hub and leaves: every committed version's updates came
    through their region's partials, each (worker, ticket) once."""
    job = job_for("regional", "leaf-async")
    spec = job.model_dump(by_alias=True)
    spec.update(mode="async", rounds=6)
    spec["async"].update(buffer_size=2, region_buffer_size=1, max_staleness=4)
    job = type(job).model_validate(spec)
    with leaf_topology(("r0", "r1")) as topo:
        fed = LocalFederation(tmp_path / "async", topo.hub_url, job, WORKERS, regions=2, aggregators=True)
        regions = {w.id: w.region for w in fed.federation.workers()}
        summary = fed.run_job(url_of=topo.region_url, timeout=150)
    assert summary["reason"] == "completed", fed.tail_logs()
    rows = summary["rounds"]
    assert [r["model_version"] for r in rows] == list(range(1, 7))
    pairs = [(w, t) for r in rows for w, t in zip(r["accepted_workers"], r["tickets"])]
    assert len(pairs) == len(set(pairs)) == summary["updates_accepted"]
    for r in rows:
        assert r["via_region"] == {w: regions[w] for w in r["accepted_workers"]}, r
