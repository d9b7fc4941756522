"""`fedbus demo`: a whole federation on one machine, every participant its own process.

Starts an embedded nats-server, generates keys and a federation file, writes a job spec,
runs `fedbus coordinator` and N `fedbus worker` processes through the CLI, follows the
rounds on the bus (verifying the coordinator's signatures like any participant would),
and prints a per-round table. The run directory is left behind for inspection.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from fedbus.bus import EmbeddedNatsServer, Subjects, connect, ensure_job_infrastructure
from fedbus.crypto.envelopes import Rejection
from fedbus.messaging import verifier_for
from fedbus.crypto.federation import Federation, FederationFile, Participant
from fedbus.crypto.keys import Identity
from fedbus.jobspec import CohortSpec, JobSpec
from fedbus.protocol.messages import JobDone, RoundClose
from fedbus.telemetry.spanfile import read_spans, traces_by_id

DEMO_ROUNDS = 20


# ---- setting up a local federation (also used by the end-to-end tests) ----------------

def write_federation(run_dir: Path, num_workers: int, regions: int = 1) -> Federation:
    """Generate a coordinator key and worker keys w01..wNN, and the federation file."""
    keys = run_dir / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    identities = [Identity.generate("coordinator", "coordinator")]
    width = max(2, len(str(num_workers)))
    for i in range(num_workers):
        region = "default" if regions == 1 else f"r{i % regions}"
        identities.append(Identity.generate(f"w{i + 1:0{width}d}", "worker", region))
    for ident in identities:
        ident.save(keys / f"{ident.id}.key")
    federation = Federation(FederationFile(
        federation="local", participants=[Participant(**i.participant_entry()) for i in identities]))
    federation.dump(run_dir / "federation.yaml")
    return federation


def demo_job(num_workers: int, rounds: int, alpha: float, seed: int) -> JobSpec:
    return JobSpec(
        job="digits-demo", task="fedbus.tasks.digits:task", seed=seed, rounds=rounds,
        task_params={"model": "mlp", "partition": "dirichlet", "alpha": alpha},
        cohort=CohortSpec(min_workers=num_workers, min_updates=max(1, math.ceil(0.8 * num_workers)),
                          wait_for_workers_s=120),
        round_deadline_s=30.0,
    )


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
    def __init__(self, rounds: int, stream=sys.stdout):
        self.rounds = rounds
        self.stream = stream
        self.tty = stream.isatty()

    def workers_ready(self, ready: int, total: int, seconds: float) -> None:
        if self.tty:
            self.stream.write(f"\rworkers ready: {ready}/{total} ({seconds:.0f} s)   ")
            if ready >= total:
                self.stream.write("\n")
        elif ready >= total:
            self.stream.write(f"all {total} workers ready after {seconds:.1f} s (heartbeats verified)\n")
        self.stream.flush()

    def round_closed(self, rc: RoundClose) -> None:
        acc = rc.metrics.get("test_accuracy")
        acc_text = f"test acc {acc:.3f}" if acc is not None else ""
        if self.tty:
            done = min(rc.model_version, self.rounds)
            bar = "#" * int(30 * done / self.rounds)
            self.stream.write(f"\r[{bar:<30}] round {done}/{self.rounds} {acc_text} ({rc.seconds * 1000:.0f} ms)   ")
        else:
            self.stream.write(f"round {rc.round}: {rc.status} model v{rc.model_version} {acc_text} "
                              f"in {rc.seconds * 1000:.0f} ms, {len(rc.accepted)} updates\n")
        self.stream.flush()

    def finished(self) -> None:
        if self.tty:
            self.stream.write("\n")


async def follow_rounds(nats_url: str, federation: Federation, job: JobSpec, progress: Progress,
                        done: asyncio.Event) -> None:
    nc = await connect(nats_url, name="fedbus-demo-observer")
    js = nc.jetstream()
    subjects = Subjects(job.job, prefix=job.transport.prefix)
    await ensure_job_infrastructure(js, subjects, replicas=job.transport.replicas)
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
        if root is None or root["name"] != "round":
            continue
        rounds += 1
        children = [s for s in spans if s["parent_span_id"] == root["span_id"]]
        workers = [{s["instance"] for s in children if s["name"] == n}
                   for n in ("worker.fetch", "worker.train", "worker.upload")]
        if all(len(w) == num_workers for w in workers):
            complete += 1
    total = sum(len(v) for v in traces.values())
    return (f"traces in {spans_path.name}: {len(traces)} ({total} spans); {rounds} round traces, {complete} of them "
            f"with the coordinator's round span and fetch/train/upload spans from all {num_workers} workers")


def format_report(summary: dict, spans_path: Path, group: ProcessGroup) -> str:
    lines = [f"{'round':>5} {'status':>10} {'ms':>8} {'updates':>7} {'test acc':>8} {'test loss':>9} {'fed acc':>7}"]
    for r in summary["rounds"]:
        acc = r.get("test_accuracy")
        loss = r.get("test_loss")
        fed = r.get("federated_accuracy")
        lines.append(f"{r['round']:>5} {r['status']:>10} {r['seconds'] * 1000:>8.1f} {r['accepted']:>7} "
                     f"{'' if acc is None else f'{acc:.4f}':>8} {'' if loss is None else f'{loss:.4f}':>9} "
                     f"{'' if fed is None else f'{fed:.4f}':>7}")
    final = summary.get("final_accuracy")
    med = summary.get("median_round_seconds")
    lines.append("")
    lines.append(f"job {summary['job']}: {summary['reason']}, {summary['rounds_completed']} rounds in "
                 f"{summary['wall_seconds']:.1f} s; median round {med * 1000 if med else float('nan'):.1f} ms")
    if final is not None:
        lines.append(f"final global test accuracy {final:.4f} (loss {summary.get('final_loss'):.4f})")
    fed = summary.get("final_metrics", {}).get("federated_accuracy")
    if fed is not None:
        lines.append(f"final federated evaluation accuracy (workers' held-out splits) {fed:.4f}")
    rejected = summary.get("updates_rejected") or {}
    lines.append(f"updates accepted {summary['updates_accepted']}, rejected {sum(rejected.values())} {rejected or ''}")
    with contextlib.suppress(OSError):
        lines.append(describe_traces(spans_path, len(group.procs) - 1))
    total_peaks = sum(group.peak_rss.values())
    lines.append(f"memory: peak concurrent RSS of all processes {group.peak_total_rss / 2**20:.0f} MiB; "
                 f"sum of per-process peaks {total_peaks / 2**20:.0f} MiB over {len(group.peak_rss)} processes")
    return "\n".join(lines)


def run_demo(args: argparse.Namespace) -> int:
    from fedbus.telemetry import configure_logging

    configure_logging(process="demo", level=os.environ.get("FEDBUS_LOG_LEVEL", "warning"))
    n = args.workers
    if n < 1:
        print("error: --workers must be at least 1", file=sys.stderr)
        return 2
    run_dir = Path(args.run_dir or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    federation = write_federation(run_dir, n)
    job = demo_job(n, args.rounds or DEMO_ROUNDS, args.alpha, args.seed)
    job.dump(run_dir / "job.yaml")
    spans = run_dir / "spans.jsonl"
    spans.unlink(missing_ok=True)
    print(f"fedbus demo: {n} workers, {job.rounds} rounds, digits with Dirichlet(alpha={args.alpha}) labels")
    print(f"run directory: {run_dir}")
    env = dict(os.environ, FEDBUS_LOG_JSON="1", FEDBUS_SPAN_FILE=str(spans))
    group = ProcessGroup(run_dir / "logs", env)
    started = time.perf_counter()
    with EmbeddedNatsServer(store_dir=run_dir / "nats", log_file=run_dir / "logs" / "nats-server.log") as server:
        print(f"nats-server (pid {server.pid}) on {server.url}")
        common = ["--job", str(run_dir / "job.yaml"), "--federation", str(run_dir / "federation.yaml"),
                  "--nats", server.url]
        coordinator = group.start("coordinator", cli_command(
            "coordinator", *common, "--key", str(run_dir / "keys" / "coordinator.key"), "--run-dir", str(run_dir)))
        for p in federation.workers():
            group.start(p.id, cli_command("worker", *common, "--key", str(run_dir / "keys" / f"{p.id}.key"),
                                          "--id", p.id, "--state-dir", str(run_dir / "worker-state" / p.id)))
        try:
            code = asyncio.run(_supervise(server, federation, job, group, coordinator, args.timeout))
        finally:
            group.stop_all()
    print(f"(all processes stopped; {time.perf_counter() - started:.1f} s in total)")
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        print(f"error: the coordinator left no summary (exit {coordinator.returncode}); see {run_dir / 'logs'}",
              file=sys.stderr)
        return 1
    summary = json.loads(summary_path.read_text())
    print(format_report(summary, spans, group))
    (run_dir / "demo-report.txt").write_text(format_report(summary, spans, group) + "\n")
    return code


async def _supervise(server, federation, job, group: ProcessGroup, coordinator, timeout: float) -> int:
    progress = Progress(job.rounds)
    done = asyncio.Event()
    follower = asyncio.create_task(follow_rounds(server.url, federation, job, progress, done))
    deadline = time.monotonic() + timeout
    code = 0
    try:
        while coordinator.poll() is None:
            group.sample_memory({"nats-server": server.pid})
            if time.monotonic() > deadline:
                print(f"\nerror: the job did not finish within {timeout:.0f} s", file=sys.stderr)
                code = 1
                break
            await asyncio.sleep(0.1)
        # Workers exit on job.done; give them a moment before stopping them ourselves.
        wait_until = time.monotonic() + 15
        while any(p.poll() is None for p in group.procs.values()) and time.monotonic() < wait_until:
            group.sample_memory({"nats-server": server.pid})
            await asyncio.sleep(0.1)
    finally:
        done.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(follower, timeout=2)
        progress.finished()
    if code == 0 and coordinator.returncode != 0:
        code = coordinator.returncode or 1
    return code


