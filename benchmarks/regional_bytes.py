"""What crosses the hub<->leaf links: regional aggregators vs a flat topology.

A hub and two regional leaf nodes (deploy/nats/hub.conf, leaf-*.conf, started by
fedbus/bus/leafnodes.py on free ports), the coordinator on the hub, W workers per leaf
(and an aggregator per leaf in the regional run), digits, R rounds, run once regional and
once flat on the same servers. Reported from the servers' own counters:

  link bytes     leaf->hub bytes of each leaf connection during the job (/leafz on the
                 hub): everything, heartbeats, reports and JetStream API traffic included
  update bytes   what the hub stored for update traffic: the UPD stream (flat, every
                 worker's update) or the AGG stream (regional, one partial per region
                 and round), from JetStream stream info

    python benchmarks/regional_bytes.py [--workers-per-region 2] [--rounds 3] [--repeats 1]

A partial carries the region's sums (one model's worth, float32 on the wire) and, per
contributor, its digest, weight and the worker's own signed update header (~0.5 KB), so
the update-traffic ratio is W x (model + update overhead) / (model + overhead + W x proof):
just under W, approaching W as the model grows (``--hidden 1536``). It cannot reach W
exactly: a partial carries at least what one update does plus the contributor list.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedbus.bus import Subjects, connect  # noqa: E402
from fedbus.bus.monitor import delta, leaf_link_bytes  # noqa: E402
from fedbus.telemetry import configure_logging  # noqa: E402
from tests.e2e_support import LocalFederation, small_job  # noqa: E402
from fedbus.bus.leafnodes import leaf_topology  # noqa: E402

REGIONS = ("r0", "r1")


def job_for(topology: str, workers: int, rounds: int, n: int, hidden: int):
    job = small_job(f"bytes-{topology}-{n}", rounds=rounds, min_workers=workers, min_updates=workers,
                    deadline_s=120.0, evaluation={"final_round": False})
    spec = job.model_dump(by_alias=True)
    spec["task_params"]["hidden"] = hidden
    spec["topology"] = topology
    spec["transport"]["hub_domain"] = "hub"
    return type(job).model_validate(spec)


async def stored_bytes(url: str, stream: str) -> tuple[int, int]:
    nc = await connect(url, name="bytes-bench", first_connect_timeout=10)
    try:
        state = (await nc.jetstream().stream_info(stream)).state
        return state.bytes, state.messages
    finally:
        await nc.close()


def one_run(topo, root: Path, topology: str, per_region: int, rounds: int, n: int, hidden: int = 128) -> dict:
    workers = per_region * len(REGIONS)
    job = job_for(topology, workers, rounds, n, hidden)
    fed = LocalFederation(root / f"{topology}-{n}", topo.hub_url, job, workers, regions=len(REGIONS),
                          aggregators=topology == "regional")
    before = leaf_link_bytes(topo.hub_monitor_url)
    started = time.perf_counter()
    try:
        fed.start_coordinator()
        if topology == "regional":
            for region in REGIONS:
                fed.start_aggregator(region, "--nats", topo.region_url(region))
        for w in fed.federation.workers():
            fed.start_worker(w.id, "--nats", topo.region_url(w.region))
        code = fed.wait_coordinator(timeout=300)
        fed.wait_all(timeout=30)
    finally:
        fed.stop()
    moved = delta(before, leaf_link_bytes(topo.hub_monitor_url))
    summary = fed.summary()
    subjects = Subjects(job.job)
    stream = subjects.agg_stream if topology == "regional" else subjects.upd_stream
    nbytes, nmsgs = asyncio.run(stored_bytes(topo.hub_url, stream))
    return {"topology": topology, "ok": code == 0 and summary.get("reason") == "completed",
            "link_bytes": sum(moved[topo.leaf_name(r)].in_bytes for r in REGIONS),
            "update_bytes": nbytes, "update_msgs": nmsgs, "seconds": time.perf_counter() - started,
            "accuracy": summary.get("final_accuracy")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers-per-region", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--hidden", type=int, default=128,
                   help="hidden width of the digits MLP: 128 is ~38 KB of float32, 1536 ~460 KB (still inline)")
    args = p.parse_args()
    configure_logging(process="benchmark", level="warning")
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedbus-regional-bytes-") as tmp, leaf_topology(REGIONS) as topo:
        for n in range(args.repeats):
            for topology in ("flat", "regional"):
                r = one_run(topo, Path(tmp), topology, args.workers_per_region, args.rounds, n, args.hidden)
                rows.append(r)
                print(f"  {topology:<8} run {n}: link {r['link_bytes']:>9} B leaf->hub, update traffic "
                      f"{r['update_bytes']:>9} B in {r['update_msgs']} messages, {r['seconds']:.1f} s, "
                      f"final accuracy {r['accuracy']}{'' if r['ok'] else '  FAILED'}", flush=True)
    med = {t: {k: statistics.median(r[k] for r in rows if r["topology"] == t) for k in ("link_bytes", "update_bytes")}
           for t in ("flat", "regional")}
    w = args.workers_per_region
    print(f"\n{w} workers per region, {args.rounds} rounds, {len(REGIONS)} regions, digits MLP hidden {args.hidden} "
          f"(medians of {args.repeats}):")
    for k in ("link_bytes", "update_bytes"):
        ratio = med["flat"][k] / max(1, med["regional"][k])
        print(f"  {k:<13} flat {med['flat'][k]:>10.0f} B   regional {med['regional'][k]:>10.0f} B   "
              f"flat/regional {ratio:.3f}x  (workers per region: {w})")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
