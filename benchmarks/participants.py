"""Scale of participants: one coordinator and 100, then 1,000 real workers over NATS.

Issue 12, acceptance 5. For each participant count N the benchmark starts a fresh
nats-server (127.0.0.1, free ports, temporary store), a coordinator process and worker
pool processes (``fedbus worker --key-dir --ids``, a testing aid: each hosts up to
``--per-process`` logical workers, each with its own key, heartbeats, updates and
nonces), all through the CLI. The job is the digits task with IID partitions (the
1,437-sample pool gives each of 1,000 workers one or two samples: a Dirichlet split
cannot give every one of them a sample), a small cohort sampled per round
(``cohort.size``, default 10), ``--rounds`` rounds, server-side test evaluation only.

Measured, from outside the coordinator and from its own records:
  * coordinator CPU seconds (user + system) and peak RSS per round: psutil samples the
    coordinator's PID every ``SAMPLE_S``; a round is the interval between its
    ``round.opened`` and ``round.closed`` log lines (JSON logs, wall clock);
  * the wait for N workers (coordinator start to round 1) and its CPU;
  * heartbeat handling: heartbeats the coordinator verified and fed to its machine
    (``summary.json`` ``heartbeats.handled``) per second of the job, and per second of
    the event loop's CPU time spent on heartbeats (``heartbeats.cpu_s``): what one core
    of the coordinator could take;
  * median round time (``summary.json`` ``round_seconds``) and its growth from the
    smallest N to the largest (printed as a ratio, measured in the same run);
  * peak RSS of each pool process, per hosted worker.

    python benchmarks/participants.py [--sizes 100,1000] [--rounds 10] [--cohort 10]
                                      [--per-process 250] [--heartbeat-s 1.0]

Every process is started here and stopped here by PID; every wait is bounded.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import psutil

from fedbus.bus.server import EmbeddedNatsServer
from fedbus.demo import ProcessGroup, cli_command, write_federation
from fedbus.jobspec import JobSpec

# Run as a script, this file's directory is on sys.path, not the checkout it belongs to.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.chaos_support import read_events  # noqa: E402

SAMPLE_S = 0.1
MIB = 1024 * 1024


def job_for(n: int, rounds: int, cohort: int, heartbeat_s: float) -> JobSpec:
    return JobSpec.model_validate({
        "job": f"participants-{n}", "task": "fedbus.tasks.digits:task", "seed": 0, "rounds": rounds,
        "task_params": {"model": "mlp", "partition": "iid"},
        "cohort": {"min_workers": n, "size": cohort, "min_updates": cohort, "wait_for_workers_s": 600},
        "round_deadline_s": 60.0,
        "transport": {"heartbeat_s": heartbeat_s},
        "evaluation": {"server_test": True, "federated": False, "final_round": False},
    })


class Sampler(threading.Thread):
    """Samples (wall time, CPU seconds, RSS) of some PIDs until stopped; bounded by the run."""

    def __init__(self, pids: dict[str, int]):
        super().__init__(daemon=True)
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.samples: dict[str, list[tuple[float, float, int]]] = {name: [] for name in pids}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            for name, proc in self.procs.items():
                try:
                    with proc.oneshot():
                        cpu = proc.cpu_times()
                        self.samples[name].append((time.time(), cpu.user + cpu.system, proc.memory_info().rss))
                except psutil.Error:
                    pass
            self._halt.wait(SAMPLE_S)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


def cpu_at(samples: list[tuple[float, float, int]], t: float) -> float:
    """CPU seconds at wall time t, linearly between the samples around it."""
    times = [s[0] for s in samples]
    i = bisect.bisect_left(times, t)
    if i <= 0:
        return samples[0][1]
    if i >= len(samples):
        return samples[-1][1]
    (t0, c0, _), (t1, c1, _) = samples[i - 1], samples[i]
    return c0 + (c1 - c0) * (t - t0) / max(t1 - t0, 1e-9)


def peak_rss(samples: list[tuple[float, float, int]], start: float, end: float) -> int:
    inside = [s[2] for s in samples if start <= s[0] <= end]
    # A round shorter than the sampling period: the samples on either side bound it.
    around = [s[2] for s in samples if s[0] < start][-1:] + [s[2] for s in samples if s[0] > end][:1]
    return max(inside or around or [0])


def log_events(log_path: Path, names: frozenset[str]):
    """(event, wall time, record) of the JSON log lines naming one of ``names``."""
    for rec in read_events(log_path):
        if rec["event"] in names:
            yield rec["event"], datetime.fromisoformat(rec["timestamp"].replace("Z", "+00:00")).timestamp(), rec


def round_windows(log_path: Path) -> tuple[float, dict[int, tuple[float, float]]]:
    """(when the coordinator started listening, round -> (opened, closed) wall times), from its log."""
    started = 0.0
    opened: dict[int, float] = {}
    out: dict[int, tuple[float, float]] = {}
    for event, ts, rec in log_events(log_path, frozenset({"coordinator.started", "round.opened", "round.closed"})):
        if event == "coordinator.started":
            started = ts
        elif event == "round.opened":
            opened[int(rec["round"])] = ts
        elif int(rec["round"]) in opened:
            out[int(rec["round"])] = (opened[int(rec["round"])], ts)
    return started, out


def one_size(n: int, args: argparse.Namespace, tmp: Path, repeat: int) -> dict:
    run_dir = tmp / f"n{n}-{repeat}"
    (run_dir / "logs").mkdir(parents=True)
    federation = write_federation(run_dir, n)
    job = job_for(n, args.rounds, args.cohort, args.heartbeat_s)
    job.dump(run_dir / "job.yaml")
    ids = [w.id for w in federation.workers()]
    server = EmbeddedNatsServer(store_dir=run_dir / "nats-store").start()
    env = dict(os.environ, FEDBUS_LOG_JSON="1")
    group = ProcessGroup(run_dir / "logs", env)
    common = ["--job", str(run_dir / "job.yaml"), "--federation", str(run_dir / "federation.yaml"),
              "--nats", server.url]
    sampler = None
    try:
        started = time.time()
        coordinator = group.start("coordinator", cli_command(
            "coordinator", *common, "--key", str(run_dir / "keys" / "coordinator.key"), "--run-dir", str(run_dir)))
        pools = {}
        for p in range(math.ceil(n / args.per_process)):
            chunk = ids[p * args.per_process:(p + 1) * args.per_process]
            pools[f"pool{p}"] = group.start(f"pool{p}", cli_command(
                "worker", *common, "--key-dir", str(run_dir / "keys"), "--ids", f"{chunk[0]}..{chunk[-1]}",
                "--state-dir", str(run_dir / "worker-state")))
        sampler = Sampler({"coordinator": coordinator.pid, "nats-server": server.pid,
                           **{k: v.pid for k, v in pools.items()}})
        sampler.start()
        try:
            code = coordinator.wait(timeout=args.timeout)
        except Exception:
            raise SystemExit(f"N={n}: the coordinator did not finish in {args.timeout} s (logs in {run_dir}/logs)")
        if code != 0:
            raise SystemExit(f"N={n}: coordinator exited {code}; see {run_dir}/logs/coordinator.log")
        for proc in pools.values():
            try:
                proc.wait(timeout=30)
            except Exception:
                pass
    finally:
        if sampler is not None:
            sampler.stop()
        group.stop_all(grace=5)
        server.stop()
    summary = json.loads((run_dir / "summary.json").read_text())
    listening, windows = round_windows(run_dir / "logs" / "coordinator.log")
    pools_up = max(ts for name in pools for _, ts, _ in
                   log_events(run_dir / "logs" / f"{name}.log", frozenset({"worker_pool.started"})))
    coord = sampler.samples["coordinator"]
    per_round = []
    for r, (t0, t1) in sorted(windows.items()):
        per_round.append({"round": r, "wall_s": t1 - t0, "cpu_s": cpu_at(coord, t1) - cpu_at(coord, t0),
                          "peak_rss": peak_rss(coord, t0, t1)})
    first_open = min(t0 for t0, _ in windows.values())
    last_close = max(t1 for _, t1 in windows.values())
    beats = summary.get("heartbeats") or {}
    handled, handling_s = int(beats.get("handled") or 0), float(beats.get("cpu_s") or 0.0)
    pool_peaks = [max((s[2] for s in sampler.samples[k]), default=0) for k in pools]

    def cores(name: str) -> float:
        """Cores a process used while the rounds ran."""
        samples = sampler.samples[name]
        return (cpu_at(samples, last_close) - cpu_at(samples, first_open)) / (last_close - first_open)

    return {
        "n": n,
        "processes": len(pool_peaks),
        "reason": summary["reason"],
        "rounds_completed": summary["rounds_completed"],
        "accuracy": summary.get("final_accuracy"),
        "median_round_s": summary["median_round_seconds"],
        "median_round_wall_s": statistics.median(r["wall_s"] for r in per_round),
        "median_round_cpu_s": statistics.median(r["cpu_s"] for r in per_round),
        "median_round_peak_rss_mib": statistics.median(r["peak_rss"] for r in per_round) / MIB,
        "coordinator_peak_rss_mib": max(s[2] for s in coord) / MIB,
        "processes_up_s": pools_up - started,  # launch to the last pool's first heartbeats
        # From the moment the coordinator listens and every pool beats to round 1: taking in N workers.
        "wait_for_workers_s": first_open - max(listening, pools_up),
        "wait_cpu_s": cpu_at(coord, first_open) - cpu_at(coord, max(listening, pools_up)),
        # Cores the coordinator used while the rounds ran (heartbeats, nats-py, rounds: all in).
        "rounds_cores": cores("coordinator"),
        "pools_cores": sum(cores(name) for name in pools),
        "server_cores": cores("nats-server"),
        "load_1min": os.getloadavg()[0],  # the machine's, others' work included
        "hb_handled": handled,
        "hb_per_s": handled / summary["wall_seconds"] if summary["wall_seconds"] else 0.0,
        "hb_capacity_per_s": handled / handling_s if handling_s else 0.0,
        "hb_us_each": 1e6 * handling_s / handled if handled else 0.0,
        "pool_peak_rss_mib": max(pool_peaks) / MIB,
        "hosted_per_process": min(n, args.per_process),
        "rejected": summary.get("updates_rejected", {}),
        "redeliveries": summary.get("redeliveries", 0),
        "max_heartbeat_gap_s": summary.get("max_heartbeat_gap_s"),
        "per_round": per_round,
    }


def median_row(runs: list[dict]) -> dict:
    """Each numeric measure's median over the runs of one size (the rest from the first run)."""
    out = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, float):
            out[key] = statistics.median(r[key] for r in runs)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100,1000", help="participant counts, comma-separated")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--cohort", type=int, default=10, help="workers sampled per round")
    p.add_argument("--per-process", type=int, default=250, help="logical workers per pool process")
    p.add_argument("--heartbeat-s", type=float, default=1.0, help="the job's transport.heartbeat_s")
    p.add_argument("--timeout", type=float, default=900.0, help="give up on one size after this many seconds")
    p.add_argument("--repeats", type=int, default=1, help="runs per size (interleaved); the table shows medians")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--keep", metavar="DIR", help="run in DIR and keep logs, keys and summaries (default: a temporary "
                                                 "directory, removed)")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    runs: dict[int, list[dict]] = {n: [] for n in sizes}
    with (contextlib.nullcontext(args.keep) if args.keep else
          tempfile.TemporaryDirectory(prefix="fedbus-participants-")) as tmp:
        for repeat in range(args.repeats):
            for n in sizes:
                row = one_size(n, args, Path(tmp), repeat)
                runs[n].append(row)
                print(f"N={n} run {repeat + 1}: {row['reason']}, {row['rounds_completed']} rounds, median round "
                      f"{row['median_round_s']:.3f} s, round CPU {row['median_round_cpu_s']:.3f} s, accuracy "
                      f"{row['accuracy']:.3f}, rejected {row['rejected']}, redeliveries {row['redeliveries']}, "
                      f"max heartbeat gap {row['max_heartbeat_gap_s']} s; cores in rounds: coordinator "
                      f"{row['rounds_cores']:.2f}, pools {row['pools_cores']:.2f}, nats-server {row['server_cores']:.2f}; "
                      f"load average {row['load_1min']:.1f}", flush=True)
    rows = [median_row(runs[n]) for n in sizes]
    print(f"\nmedians over {args.repeats} run(s) per size; {args.rounds} rounds, cohort {args.cohort}, "
          f"heartbeat_s {args.heartbeat_s}, <= {args.per_process} workers per pool process")
    header = ("N", "procs", "round s", "round CPU s", "round peak RSS MiB", "pools up s", "wait for N s",
              "wait CPU s", "coordinator cores", "pool cores", "load", "hb handled/s", "hb capacity/s", "CPU us/hb",
              "pool RSS MiB", "hosted/pool")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print(f"| {r['n']} | {r['processes']} | {r['median_round_s']:.3f} | {r['median_round_cpu_s']:.3f} | "
              f"{r['median_round_peak_rss_mib']:.0f} | {r['processes_up_s']:.1f} | {r['wait_for_workers_s']:.1f} | "
              f"{r['wait_cpu_s']:.1f} | {r['rounds_cores']:.2f} | {r['pools_cores']:.2f} | {r['load_1min']:.1f} | "
              f"{r['hb_per_s']:.0f} | {r['hb_capacity_per_s']:.0f} | "
              f"{r['hb_us_each']:.0f} | {r['pool_peak_rss_mib']:.0f} | {r['hosted_per_process']} |")
    if len(rows) >= 2:
        small, large = rows[0], rows[-1]
        print(f"\nfrom N={small['n']} to N={large['n']} ({large['n'] / small['n']:.0f}x participants): "
              f"median round time x{large['median_round_s'] / small['median_round_s']:.2f}, "
              f"coordinator CPU per round x{large['median_round_cpu_s'] / max(small['median_round_cpu_s'], 1e-9):.2f}, "
              f"peak RSS per round x{large['median_round_peak_rss_mib'] / small['median_round_peak_rss_mib']:.2f}")
        extra = large["hosted_per_process"] - small["hosted_per_process"]
        if extra > 0:
            grown = large["pool_peak_rss_mib"] - small["pool_peak_rss_mib"]
            print(f"a pool process hosting {large['hosted_per_process']} workers instead of {small['hosted_per_process']}: "
                  f"{grown:+.1f} MiB, {1024 * grown / extra:.0f} KiB per extra hosted worker")
    if args.json:
        Path(args.json).write_text(json.dumps({"medians": rows, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
