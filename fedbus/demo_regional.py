"""`fedbus demo --topology regional --regions N`: regional aggregators over leaf nodes.

Starts a hub nats-server and one leaf nats-server per region (deploy/nats/hub.conf and
leaf-*.conf of the source checkout, on free local ports), then runs the demo job twice on
the same servers: regional (an aggregator per region next to its workers, updates stay
in the region, one partial per region and round crosses to the hub) and flat (every
worker's update crosses). It prints what crossed the hub<->leaf links, from the servers'
own counters (/leafz on the hub), and what the hub stored for update traffic.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

from fedbus.bus import Subjects, connect
from fedbus.bus.leafnodes import HUB_CONF, leaf_topology
from fedbus.bus.monitor import delta, leaf_link_bytes
from fedbus.demo import ProcessGroup, cli_command, demo_job, write_federation


def _job(topology: str, workers: int, rounds: int, alpha: float, seed: int):
    job = demo_job(workers, rounds, alpha, seed)
    spec = job.model_dump(by_alias=True)
    spec.update(job=f"demo-{topology}", topology=topology)
    spec["cohort"]["min_updates"] = workers  # every worker in every round: the same updates in both runs
    spec["transport"]["hub_domain"] = "hub"
    spec["evaluation"]["final_round"] = False
    return type(job).model_validate(spec)


async def _stored_bytes(url: str, stream: str) -> int:
    nc = await connect(url, name="demo-bytes", first_connect_timeout=10)
    try:
        return (await nc.jetstream().stream_info(stream)).state.bytes
    finally:
        await nc.close()


def _run(topology: str, topo, run_dir: Path, workers: int, regions: list[str], rounds: int, alpha: float,
         seed: int, timeout: float) -> dict:
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    federation = write_federation(run_dir, workers, regions=len(regions), aggregators=topology == "regional")
    job = _job(topology, workers, rounds, alpha, seed)
    job.dump(run_dir / "job.yaml")
    env = dict(os.environ, FEDBUS_LOG_JSON="1", FEDBUS_SPAN_FILE=str(run_dir / "spans.jsonl"))
    group = ProcessGroup(run_dir / "logs", env)
    common = ["--job", str(run_dir / "job.yaml"), "--federation", str(run_dir / "federation.yaml")]
    keys = run_dir / "keys"
    before = leaf_link_bytes(topo.hub_monitor_url)
    started = time.perf_counter()
    try:
        coordinator = group.start("coordinator", cli_command(
            "coordinator", *common, "--nats", topo.hub_url, "--key", str(keys / "coordinator.key"),
            "--run-dir", str(run_dir)))
        for agg in federation.aggregators():
            group.start(agg.id, cli_command("aggregator", *common, "--nats", topo.region_url(agg.region),
                                            "--key", str(keys / f"{agg.id}.key"), "--region", agg.region))
        for w in federation.workers():
            group.start(w.id, cli_command("worker", *common, "--nats", topo.region_url(w.region),
                                          "--key", str(keys / f"{w.id}.key"), "--id", w.id,
                                          "--state-dir", str(run_dir / "worker-state" / w.id)))
        code = coordinator.wait(timeout=timeout)
        deadline = time.monotonic() + 15
        while any(p.poll() is None for p in group.procs.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        group.stop_all()
    moved = delta(before, leaf_link_bytes(topo.hub_monitor_url))
    subjects = Subjects(job.job)
    stream = subjects.agg_stream if topology == "regional" else subjects.upd_stream
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    return {"code": code, "summary": summary, "seconds": time.perf_counter() - started,
            "link": {r: moved[topo.leaf_name(r)].in_bytes for r in regions},
            "stored": asyncio.run(_stored_bytes(topo.hub_url, stream))}


def run_regional_demo(args) -> int:
    if not HUB_CONF.exists():
        print(f"error: --topology regional runs deploy/nats/*.conf of a source checkout; {HUB_CONF} is missing",
              file=sys.stderr)
        return 2
    count = args.regions
    if not 1 <= count <= 8 or args.workers < count:
        print("error: --regions must lie in [1, 8] and not exceed --workers", file=sys.stderr)
        return 2
    regions = [f"r{i}" for i in range(count)]
    run_dir = Path(args.run_dir or f"runs/demo-regional-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    rounds = args.rounds or 5
    print(f"fedbus demo: a hub and {count} leaf nats-servers; {args.workers} workers in regions "
          f"{', '.join(regions)}; {rounds} sync rounds, run regional then flat on the same servers")
    print(f"run directory: {run_dir}")
    results = {}
    with leaf_topology(regions, base_dir=run_dir / "nats") as topo:
        for topology in ("regional", "flat"):
            print(f"  running {topology} ...", flush=True)
            results[topology] = _run(topology, topo, run_dir / topology, args.workers, regions, rounds, args.alpha,
                                     args.seed, args.timeout)
    lines = ["", f"{'':<26}{'regional':>14}{'flat':>14}{'flat/regional':>15}"]
    for region in regions:
        reg, flat = results["regional"]["link"][region], results["flat"]["link"][region]
        lines.append(f"{'leaf ' + region + ' -> hub, bytes':<26}{reg:>14,}{flat:>14,}{flat / max(1, reg):>14.2f}x")
    reg, flat = results["regional"]["stored"], results["flat"]["stored"]
    lines.append(f"{'update traffic at the hub':<26}{reg:>14,}{flat:>14,}{flat / max(1, reg):>14.2f}x")
    for topology in ("regional", "flat"):
        s = results[topology]["summary"]
        lines.append(f"{topology}: {s.get('reason', 'no summary')}, {s.get('rounds_completed', 0)} rounds, final "
                     f"test accuracy {s.get('final_accuracy', float('nan')):.4f}, {results[topology]['seconds']:.1f} s")
    via = {r for row in results["regional"]["summary"].get("rounds", []) for r in row.get("via_region", {}).values()}
    lines.append(f"regional: every update reached the coordinator inside its region's partial "
                 f"(regions seen: {', '.join(sorted(via)) or 'none'})")
    lines.append("(leaf -> hub bytes count everything on the link: updates or partials, heartbeats, reports, "
                 "JetStream API traffic)")
    report = "\n".join(lines)
    print(report)
    reports = [run_dir / t / "report.html" for t in results]
    print("reports: " + ", ".join(str(path) for path in reports if path.exists()))
    (run_dir / "demo-report.txt").write_text(report + "\n")
    ok = all(r["code"] == 0 and r["summary"].get("reason") == "completed" for r in results.values())
    return 0 if ok else 1
