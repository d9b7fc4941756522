"""`fedbus demo`: a whole federation on one machine, every participant its own process.

Starts an embedded nats-server, generates keys and a federation file, writes a job spec,
runs `fedbus coordinator` and N `fedbus worker` processes through the CLI, follows the
rounds on the bus (verifying the coordinator's signatures like any participant would),
and prints a per-round table. The run directory is left behind for inspection.

`--mode async` runs the same federation asynchronously (FedBuff); `--stragglers N
--slowdown F` starts the last N workers with `--simulate-slowdown F` (testing only), so
a newcomer can watch what stragglers cost each mode. `run_local` is the harness the demo,
`benchmarks/stragglers.py` and the end-to-end tests share.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedbus.bus import EmbeddedNatsServer, Subjects, connect, ensure_job_infrastructure
from fedbus.crypto.envelopes import Rejection
from fedbus.messaging import verifier_for
from fedbus.progress import RunProgress
from fedbus.crypto.federation import Federation, FederationFile, Participant
from fedbus.crypto.keys import Identity
from fedbus.jobspec import CohortSpec, JobSpec
from fedbus.protocol.messages import JobDone, RoundClose
from fedbus.telemetry.spanfile import read_spans, traces_by_id
from fedbus.registry.retention import stream_retention

DEMO_ROUNDS = 20
# Async commits a version per buffer_size updates, not per cohort: more versions for the
# same number of updates (see demo_job).
DEMO_ASYNC_VERSIONS = 60
# FedBuff's buffer in the demo: half of the 10 workers, fewer than the fast ones, so a
# version is committed as soon as the fast ones report and a straggler holds up nothing.
# Smaller (1-3) and each version follows a few Dirichlet-skewed workers' labels: accuracy
# swings from version to version (measured: buffer 3 ended runs between 0.89 and 0.96, and
# reached 0.93 later than sync with close_at_quorum); close to the cohort and it waits for
# stragglers like a sync round.
DEMO_BUFFER_SIZE = 5
TARGET_ACCURACY = 0.93


# ---- setting up a local federation (also used by the end-to-end tests) ----------------

def write_federation(run_dir: Path, num_workers: int, regions: int = 1, aggregators: bool = False) -> Federation:
    """Generate a coordinator key and worker keys w01..wNN (regions r0, r1, ... round-robin
    when ``regions`` > 1), an aggregator key agg-<region> per region if asked, and the
    federation file."""
    keys = run_dir / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    identities = [Identity.generate("coordinator", "coordinator")]
    width = max(2, len(str(num_workers)))
    names = ["default"] if regions == 1 else [f"r{i}" for i in range(regions)]
    for i in range(num_workers):
        identities.append(Identity.generate(f"w{i + 1:0{width}d}", "worker", names[i % len(names)]))
    if aggregators:
        identities += [Identity.generate(f"agg-{region}", "aggregator", region) for region in names]
    for ident in identities:
        ident.save(keys / f"{ident.id}.key")
    federation = Federation(FederationFile(
        federation="local", participants=[Participant(**i.participant_entry()) for i in identities]))
    federation.dump(run_dir / "federation.yaml")
    return federation


def demo_job(num_workers: int, rounds: int, alpha: float, seed: int, mode: str = "sync",
             buffer_size: int = DEMO_BUFFER_SIZE, hidden: int | None = None,
             keep_versions: int | None = None) -> JobSpec:
    """The demo's job; ``hidden`` widens the MLP (128 units, ~38 KiB, by default; 2048 makes
    ~600 KiB models that travel as claim checks) and ``keep_versions`` sets the retention window."""
    spec: dict = {
        "job": "digits-demo", "task": "fedbus.tasks.digits:task", "seed": seed, "rounds": rounds, "mode": mode,
        "task_params": {"model": "mlp", "partition": "dirichlet", "alpha": alpha,
                        **({"hidden": hidden} if hidden is not None else {})},
        "cohort": CohortSpec(min_workers=num_workers, min_updates=max(1, math.ceil(0.8 * num_workers)),
                             wait_for_workers_s=120).model_dump(),
        "round_deadline_s": 30.0,
    }
    if keep_versions is not None:
        spec["retention"] = {"keep_versions": keep_versions}
    if mode == "async":
        # A 10x straggler answers ~num_workers/buffer_size x 10 versions late (about 30 here):
        # max_staleness well above that keeps its data (3 of 10 Dirichlet-skewed label
        # distributions) in the model, weighted down by FedBuff's polynomial (1 + s)^-0.5,
        # instead of rejecting it as too_stale.
        spec["async"] = {"algorithm": "fedbuff", "buffer_size": min(buffer_size, num_workers), "max_staleness": 100}
    return JobSpec.model_validate(spec)


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedbus.cli", *args]


class ProcessGroup:
    """Child processes this run started; stops only those, by PID."""

    def __init__(self, log_dir: Path, env: dict[str, str]):
        self.log_dir = log_dir
        self.env = env
        self.procs: dict[str, subprocess.Popen] = {}
        self.peak_rss: dict[str, int] = {}
        self.peak_total_rss = 0

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env)
        log.close()
        self.procs[name] = proc
        return proc

    def sample_memory(self, extra: dict[str, int] | None = None) -> None:
        total = 0
        pids = {name: p.pid for name, p in self.procs.items() if p.poll() is None}
        pids.update(extra or {})
        for name, pid in pids.items():
            rss, hwm = _proc_memory(pid)
            total += rss
            self.peak_rss[name] = max(self.peak_rss.get(name, 0), hwm)
        self.peak_total_rss = max(self.peak_total_rss, total)

    def stop_all(self, grace: float = 10.0) -> None:
        deadline = time.monotonic() + grace
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _proc_memory(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS) in bytes from /proc; zeros when the process is gone."""
    rss = hwm = 0
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    return rss, hwm


# ---- following the rounds on the bus --------------------------------------------------

class Progress:
    """What the observer saw: shown as it happens (rich bars on a terminal, one plain line
    per event otherwise: fedbus.progress), and remembered, so a run can stop once it
    reached a target accuracy."""

    def __init__(self, rounds: int, stream=sys.stdout, unit: str = "round", quiet: bool = False,
                 target: float | None = None):
        self.rounds = rounds
        self.unit = unit  # "round" (sync) or "version" (async: one committed model version per close)
        self.quiet = quiet
        self.display = RunProgress(stream, quiet=quiet)
        self.tty = self.display.tty
        self.target = target
        self.reached: RoundClose | None = None  # the first close at or above the target

    def workers_ready(self, ready: int, total: int, seconds: float) -> None:
        self.display.add("workers", total, "workers ready")
        self.display.update("workers", ready, detail="heartbeats verified",
                            line=f"all {total} workers ready after {seconds:.1f} s (heartbeats verified)"
                            if ready >= total else None)

    def round_closed(self, rc: RoundClose) -> None:
        acc = rc.metrics.get("test_accuracy")
        if (self.reached is None and self.target is not None and acc is not None
                and math.isfinite(acc) and acc >= self.target):
            self.reached = rc
        acc_text = f"test acc {acc:.3f}" if acc is not None else ""
        self.display.add("rounds", self.rounds, f"{self.unit}s")
        self.display.update("rounds", min(rc.model_version, self.rounds),
                            detail=f"{acc_text} ({rc.seconds * 1000:.0f} ms)",
                            line=f"{self.unit} {rc.round}: {rc.status} model v{rc.model_version} {acc_text} "
                                 f"in {rc.seconds * 1000:.0f} ms, {len(rc.accepted)} updates")

    def note(self, text: str) -> None:
        self.display.note(text)

    def finished(self) -> None:
        self.display.stop()


async def follow_rounds(nats_url: str, federation: Federation, job: JobSpec, progress: Progress,
                        done: asyncio.Event) -> None:
    nc = await connect(nats_url, name="fedbus-demo-observer")
    js = nc.jetstream()
    subjects = Subjects(job.job, prefix=job.transport.prefix)
    await ensure_job_infrastructure(js, subjects, replicas=job.transport.replicas, **stream_retention(job))
    verifier = verifier_for(job, federation)
    queue: asyncio.Queue = asyncio.Queue()
    started = time.monotonic()
    ready: set[str] = set()
    expected = len(federation.workers())

    async def on_heartbeat(msg) -> None:
        try:
            opened = verifier.open(msg.data, sender_token=msg.subject.rsplit(".", 1)[-1])
            verifier.accept_body(opened, opened.inline_body)
        except Rejection:
            return
        if opened.header.sender not in ready:
            ready.add(opened.header.sender)
            progress.workers_ready(len(ready), expected, time.monotonic() - started)
            if len(ready) >= expected:
                await hb_sub.unsubscribe()

    hb_sub = await nc.subscribe(subjects.hb_all, cb=on_heartbeat)
    subs = []
    for kind in ("round.close", "job.done"):
        with contextlib.suppress(Exception):
            subs.append(await js.subscribe(subjects.ctl(kind), ordered_consumer=True, cb=queue.put))
    try:
        while not done.is_set():
            try:
                msg = await asyncio.wait_for(queue.get(), timeout=0.2)
            except asyncio.TimeoutError:
                continue
            try:
                opened = verifier.open(msg.data)
                fields, _ = verifier.accept_body(opened, opened.inline_body)
            except Rejection:
                continue
            if isinstance(fields, RoundClose):
                progress.round_closed(fields)
            elif isinstance(fields, JobDone):
                break
    finally:
        with contextlib.suppress(Exception):
            await nc.drain()


# ---- the report ------------------------------------------------------------------------

def describe_traces(spans_path: Path, num_workers: int) -> str:
    """One trace per round: the coordinator's round span as root, every worker's spans under it."""
    traces = traces_by_id(read_spans(spans_path))
    rounds = complete = 0
    for spans in traces.values():
        root = next((s for s in spans if s["parent_span_id"] is None), None)
        if root is None or root["name"] not in ("round", "version"):  # async: one trace per model version
            continue
        rounds += 1
        children = [s for s in spans if s["parent_span_id"] == root["span_id"]]
        workers = [{s["instance"] for s in children if s["name"] == n}
                   for n in ("worker.fetch", "worker.train", "worker.upload")]
        if all(len(w) == num_workers for w in workers):
            complete += 1
    total = sum(len(v) for v in traces.values())
    return (f"traces in {spans_path.name}: {len(traces)} ({total} spans); {rounds} round/version traces, {complete} "
            f"of them with the coordinator's root span and fetch/train/upload spans from all {num_workers} workers "
            f"(an async version's trace holds only the workers it folded)")


def format_report(summary: dict, spans_path: Path, group: ProcessGroup) -> str:
    unit = "version" if summary.get("mode") == "async" else "round"
    rows = summary["rounds"]
    elapsed = row_elapsed(rows)
    lines = [f"{unit:>7} {'status':>10} {'at s':>7} {'ms':>8} {'updates':>7} {'stale':>5} {'test acc':>8} "
             f"{'test loss':>9} {'fed acc':>7}"]
    for r, at in zip(rows, elapsed):
        acc = r.get("test_accuracy")
        loss = r.get("test_loss")
        fed = r.get("federated_accuracy")
        stale = max(r.get("staleness") or [0])  # the stalest update folded into it (0: all current)
        lines.append(f"{r['round']:>7} {r['status']:>10} {at:>7.1f} {r['seconds'] * 1000:>8.1f} "
                     f"{updates_folded([r]):>7} {stale:>5} "
                     f"{'' if acc is None else f'{acc:.4f}':>8} {'' if loss is None else f'{loss:.4f}':>9} "
                     f"{'' if fed is None else f'{fed:.4f}':>7}")
    final = summary.get("final_accuracy")
    med = summary.get("median_round_seconds")
    lines.append("")
    lines.append(f"job {summary['job']}: {summary['reason']}, {summary['rounds_completed']} {unit}s in "
                 f"{summary['wall_seconds']:.1f} s" + (f"; median round {med * 1000:.1f} ms" if unit == "round" and med
                                                        else ""))
    if final is not None:
        lines.append(f"final global test accuracy {final:.4f} (loss {summary.get('final_loss'):.4f})")
    fed = summary.get("final_metrics", {}).get("federated_accuracy")
    if fed is not None:
        lines.append(f"final federated evaluation accuracy (workers' held-out splits) {fed:.4f}")
    rejected = summary.get("updates_rejected") or {}
    lines.append(f"updates accepted {summary['updates_accepted']} ({summary.get('updates_sealed', 0)} sealed to their "
                 f"recipient), rejected {sum(rejected.values())} {rejected or ''}")
    with contextlib.suppress(OSError):
        lines.append(describe_traces(spans_path, len(group.procs) - 1))
    total_peaks = sum(group.peak_rss.values())
    lines.append(f"memory: peak concurrent RSS of all processes {group.peak_total_rss / 2**20:.0f} MiB; "
                 f"sum of per-process peaks {total_peaks / 2**20:.0f} MiB over {len(group.peak_rss)} processes")
    return "\n".join(lines)


# ---- one local federation: nats-server, coordinator, workers (demo, benchmarks, tests) -------

def straggler_ids(federation: Federation, count: int) -> list[str]:
    """The last ``count`` workers of the federation (w08..w10 of 10 for 3): fixed, so runs compare."""
    workers = [p.id for p in federation.workers()]
    return workers[len(workers) - count:] if count > 0 else []


@dataclass
class LocalRun:
    """What one local federation left: its exit code, processes and summary.json."""
    run_dir: Path
    code: int
    group: ProcessGroup
    coordinator: subprocess.Popen
    stragglers: list[str]
    reached: RoundClose | None = None  # the first close the observer saw at or above the target
    stopped_at_target: bool = False
    seconds: float = 0.0
    summary: dict | None = field(default=None)

    def worker_events(self, event: str) -> dict[str, int]:
        """How often each worker logged ``event`` (JSON logs), e.g. update.sent."""
        counts: dict[str, int] = {}
        needle = f'"event": "{event}"'
        for path in sorted((self.run_dir / "logs").glob("*.log")):
            name = path.stem
            if name in ("coordinator", "nats-server"):
                continue
            counts[name] = sum(1 for line in path.read_text(errors="replace").splitlines() if needle in line)
        return counts


def run_local(run_dir: Path, job: JobSpec, federation: Federation, *, stragglers: Sequence[str] = (),
              slowdown: float = 1.0, timeout: float = 600.0, progress: Progress | None = None,
              stop_at_target: bool = False, threads: int = 1) -> LocalRun:
    """Run ``job`` over a fresh embedded nats-server with a ``fedbus coordinator`` and one
    ``fedbus worker`` process per federation worker, all through the CLI; the workers in
    ``stragglers`` get ``--simulate-slowdown slowdown``. Bounded by ``timeout``; with
    ``stop_at_target`` the processes are stopped as soon as the observer sees a model at
    ``progress.target`` test accuracy (summary.json is written on SIGTERM too). Stops only
    the processes it started."""
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    job.dump(run_dir / "job.yaml")
    spans = run_dir / "spans.jsonl"
    spans.unlink(missing_ok=True)
    (run_dir / "summary.json").unlink(missing_ok=True)
    env = dict(os.environ, FEDBUS_LOG_JSON="1", FEDBUS_SPAN_FILE=str(spans))
    group = ProcessGroup(run_dir / "logs", env)
    progress = progress or Progress(job.rounds, quiet=True)
    slow = set(stragglers)
    started = time.perf_counter()
    with EmbeddedNatsServer(store_dir=run_dir / "nats", log_file=run_dir / "logs" / "nats-server.log") as server:
        progress.note(f"nats-server (pid {server.pid}) on {server.url}")
        progress.note(f"watch it live: fedbus status --job {run_dir / 'job.yaml'} --federation "
                      f"{run_dir / 'federation.yaml'} --nats {server.url}")
        common = ["--job", str(run_dir / "job.yaml"), "--federation", str(run_dir / "federation.yaml"),
                  "--nats", server.url, "--threads", str(threads)]
        coordinator = group.start("coordinator", cli_command(
            "coordinator", *common, "--key", str(run_dir / "keys" / "coordinator.key"), "--run-dir", str(run_dir)))
        for p in federation.workers():
            extra = ["--simulate-slowdown", f"{slowdown:g}"] if p.id in slow else []
            group.start(p.id, cli_command("worker", *common, "--key", str(run_dir / "keys" / f"{p.id}.key"),
                                          "--id", p.id, "--state-dir", str(run_dir / "worker-state" / p.id), *extra))
        try:
            code, stopped = asyncio.run(_supervise(server, federation, job, group, coordinator, timeout, progress,
                                                   stop_at_target))
        finally:
            group.stop_all()
    run = LocalRun(run_dir, code, group, coordinator, sorted(slow), reached=progress.reached,
                   stopped_at_target=stopped, seconds=time.perf_counter() - started)
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        run.summary = json.loads(summary_path.read_text())
    return run


async def _supervise(server, federation, job, group: ProcessGroup, coordinator, timeout: float,
                     progress: Progress, stop_at_target: bool) -> tuple[int, bool]:
    done = asyncio.Event()
    follower = asyncio.create_task(follow_rounds(server.url, federation, job, progress, done))
    deadline = time.monotonic() + timeout
    code = 0
    stopped = False
    try:
        while coordinator.poll() is None:
            group.sample_memory({"nats-server": server.pid})
            if stop_at_target and progress.reached is not None:
                # The summary row of the close we saw is on disk before round.close goes out
                # (commit, summary, then publish); SIGTERM makes the coordinator write its wall time.
                coordinator.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    await asyncio.to_thread(coordinator.wait, 15)
                stopped = True
                break
            if time.monotonic() > deadline:
                if not progress.quiet:
                    print(f"\nerror: the job did not finish within {timeout:.0f} s", file=sys.stderr)
                code = 1
                break
            await asyncio.sleep(0.1)
        # Workers exit on job.done; give them a moment before stopping them ourselves.
        wait_until = time.monotonic() + (0 if stopped or code else 15)
        while any(p.poll() is None for p in group.procs.values()) and time.monotonic() < wait_until:
            group.sample_memory({"nats-server": server.pid})
            await asyncio.sleep(0.1)
    finally:
        done.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(follower, timeout=2)
        progress.finished()
    if code == 0 and not stopped and coordinator.returncode != 0:
        code = coordinator.returncode or 1
    return code, stopped


# ---- time to accuracy from summary.json rows ----------------------------------------------

def row_elapsed(rows: Sequence[dict]) -> list[float]:
    """Each row's seconds since the job started: ``elapsed_s`` when the coordinator wrote it;
    otherwise the running sum of the rows' ``seconds`` (round durations only, so it leaves
    out the gaps between rounds: a lower bound)."""
    if rows and all(r.get("elapsed_s") is not None for r in rows):
        return [float(r["elapsed_s"]) for r in rows]
    out, total = [], 0.0
    for r in rows:
        total += float(r.get("seconds") or 0.0)
        out.append(total)
    return out


def training_started(rows: Sequence[dict]) -> float:
    """Seconds after the job start at which the first round (version) began: the first row's
    elapsed time minus its own duration. The wait for workers before it (process start-up,
    torch imports) is the same in every mode and is not what stragglers cost."""
    if not rows:
        return 0.0
    return max(0.0, row_elapsed(rows)[0] - float(rows[0].get("seconds") or 0.0))


def time_to_accuracy(rows: Sequence[dict], target: float = TARGET_ACCURACY) -> tuple[float, int] | None:
    """(seconds from the first round's start to the first committed model at ``target``
    test accuracy, its model version), or None if no row reached it."""
    elapsed = row_elapsed(rows)
    start = training_started(rows)
    for r, t in zip(rows, elapsed):
        acc = r.get("test_accuracy")
        if acc is not None and math.isfinite(acc) and acc >= target:
            return t - start, int(r.get("model_version", r.get("round", 0)))
    return None


def updates_folded(rows: Sequence[dict]) -> int:
    """Updates folded into committed models: each row's ``folded`` (accepted plus late ones
    under late_updates: next_round), or ``accepted`` where a row has no ``folded``."""
    return sum(int(r["folded"] if r.get("folded") is not None else r.get("accepted", 0))
               for r in rows if r.get("status", "aggregated") == "aggregated")


def describe_time_to(summary: dict, target: float = TARGET_ACCURACY) -> str:
    rows = summary.get("rounds") or []
    unit = "version" if summary.get("mode") == "async" else "round"
    hit = time_to_accuracy(rows, target)
    if hit is None:
        best = max((r["test_accuracy"] for r in rows if r.get("test_accuracy") is not None), default=float("nan"))
        return f"did not reach {target:.2f} test accuracy (best {best:.4f})"
    seconds, version = hit
    exact = "" if rows and rows[0].get("elapsed_s") is not None else " (sum of round durations: a lower bound)"
    return (f"reached {target:.2f} test accuracy after {seconds:.1f} s of training{exact}, at model v{version} "
            f"({unit} {version})")


# ---- the demo --------------------------------------------------------------------------------

def run_demo(args: argparse.Namespace) -> int:
    from fedbus.telemetry import configure_logging
    from fedbus.worker.slowdown import Slowdown

    configure_logging(process="demo", level=os.environ.get("FEDBUS_LOG_LEVEL", "warning"))
    n = args.workers
    if n < 1:
        print("error: --workers must be at least 1", file=sys.stderr)
        return 2
    stragglers = getattr(args, "stragglers", 0)
    mode = getattr(args, "mode", "sync")
    if not 0 <= stragglers <= n:
        print(f"error: --stragglers must lie in [0, --workers = {n}]", file=sys.stderr)
        return 2
    try:
        slowdown = Slowdown(float(getattr(args, "slowdown", 10.0))).factor
    except ValueError as exc:
        print(f"error: --slowdown: {exc}", file=sys.stderr)
        return 2
    run_dir = Path(args.run_dir or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    federation = write_federation(run_dir, n)
    rounds = args.rounds or (DEMO_ASYNC_VERSIONS if mode == "async" else DEMO_ROUNDS)
    try:
        job = demo_job(n, rounds, args.alpha, args.seed, mode=mode, hidden=getattr(args, "hidden", None),
                       keep_versions=getattr(args, "keep_versions", None))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    slow = straggler_ids(federation, stragglers)
    if mode == "async":
        a = job.async_
        print(f"fedbus demo: {n} workers, async {a.algorithm} (buffer {a.buffer_size}), {job.rounds} model versions, "
              f"digits with Dirichlet(alpha={args.alpha}) labels")
    else:
        print(f"fedbus demo: {n} workers, {job.rounds} sync rounds, digits with Dirichlet(alpha={args.alpha}) labels")
    if slow:
        print(f"stragglers (testing only): {', '.join(slow)} train {slowdown:g}x slower (--simulate-slowdown)")
    print(f"run directory: {run_dir}")
    progress = Progress(job.rounds, unit="version" if mode == "async" else "round", target=TARGET_ACCURACY)
    # SIGTERM stops the demo like Ctrl-C: its processes and nats-server are stopped on the way out.
    signal.signal(signal.SIGTERM, _interrupted)
    try:
        run = run_local(run_dir, job, federation, stragglers=slow, slowdown=slowdown, timeout=args.timeout,
                        progress=progress)
    except KeyboardInterrupt:
        print(f"\ninterrupted: all processes stopped; the run directory is {run_dir}", file=sys.stderr)
        return 130
    print(f"(all processes stopped; {run.seconds:.1f} s in total)")
    if run.summary is None:
        print(f"error: the coordinator left no summary (exit {run.coordinator.returncode}); see {run_dir / 'logs'}",
              file=sys.stderr)
        return 1
    summary = dict(run.summary, mode=mode)
    report = format_report(summary, run_dir / "spans.jsonl", run.group)
    report += "\n" + describe_time_to(summary)
    if slow:
        report += f"\nstragglers {', '.join(slow)} ({slowdown:g}x slower) sent {_sent_by(run, slow)} updates"
    print(report)
    print(f"report: {run_dir / 'report.html'}" if (run_dir / "report.html").exists() else "no report.html (see logs)")
    (run_dir / "demo-report.txt").write_text(report + "\n")
    return run.code


def _interrupted(signum, frame) -> None:
    raise KeyboardInterrupt


def _sent_by(run: LocalRun, workers: Sequence[str]) -> int:
    sent = run.worker_events("update.sent")
    return sum(sent.get(w, 0) for w in workers)
