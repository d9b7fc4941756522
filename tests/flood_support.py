"""A real job under flood: nats-server, coordinator and workers through the CLI, flood
publishers (benchmarks/flood.py) as separate processes, and what the flood cost the
coordinator, per 100k junk messages.

Used by tests/test_e2e_flood.py and by `python benchmarks/flood.py measure`.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from fedbus.bus import Subjects, connect
from fedbus.jobspec import JobSpec
from tests.e2e_support import LocalFederation, small_job

FLOOD_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "flood.py"
PER = 100_000  # results are reported per this many junk messages


@dataclass(frozen=True)
class FloodPlan:
    junk_hb: int = 100_000
    junk_upd: int = 100_000
    # Validly signed heartbeat storms, one process each, as fast as each can sign. w05 is
    # listed but its worker process is not running (a stolen key of an idle participant):
    # the job waits for it as a fifth worker, so round 1 opens only once the storm runs,
    # and while it is alive it is in every cohort and sends nothing, so those rounds close
    # at their deadline with the four real updates; the flood thus always overlaps the
    # rounds, however fast the coordinator is. w01 is a running worker whose key also
    # signs a storm from another process (its honest process must keep working).
    storm_workers: tuple[str, ...] = ("w05", "w01")
    storm_count: int = 100_000
    running_workers: tuple[str, ...] = ("w01", "w02", "w03", "w04")
    listed_workers: int = 5
    rounds: int = 5
    deadline_s: float = 4.0
    # The junk is spread evenly over this window (as fast as possible if the publisher
    # cannot keep up), so that it hits the rounds rather than only the start.
    flood_window_s: float = 10.0
    flood_max_seconds: float = 20.0
    job_timeout_s: float = 90.0
    job_id: str = "e2e-flood"


@dataclass
class FloodResult:
    plan: dict
    job_ok: bool = False
    job_problem: str = ""
    coordinator_rc: int | None = None
    summary: dict = field(default_factory=dict)
    publishers: dict = field(default_factory=dict)
    junk_sent: int = 0
    storm_sent: int = 0
    coordinator_rss_before_flood_mb: float = 0.0
    coordinator_peak_rss_mb: float = 0.0
    coordinator_rss_increase_mb: float = 0.0
    audit_records: int = 0
    coordinator_log_bytes: int = 0
    per_100k_junk: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)


class RssSampler:
    """Samples one process's RSS every `every` s in a thread; also reads the kernel's
    peak (VmHWM), which catches spikes between samples."""

    def __init__(self, pid: int, every: float = 0.1):
        self.proc = psutil.Process(pid)
        self.every = every
        self.peak = 0
        self.last = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.last = self.proc.memory_info().rss
                hwm = _vm_hwm(self.proc.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                return
            self.peak = max(self.peak, self.last, hwm)
            self._stop.wait(self.every)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _vm_hwm(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def wait_for_log_event(path: Path, event: str, timeout: float) -> None:
    """Bounded wait until a JSON log line with this event appears."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and f'"{event}"' in path.read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise AssertionError(f"no {event} in {path} within {timeout} s")


def start_publisher(fed: LocalFederation, name: str, kind: str, count: int, plan: FloodPlan,
                    key: Path | None = None, rate: float = 0.0) -> subprocess.Popen:
    argv = [sys.executable, str(FLOOD_SCRIPT), "--nats", fed.nats_url, "--job", fed.job.job,
            "--prefix", fed.job.transport.prefix, "--kind", kind, "--count", str(count),
            "--max-seconds", str(plan.flood_max_seconds), "--go-file", str(go_file(fed)), "--max-wait", "180",
            "--federation", str(fed.run_dir / "federation.yaml"), "--rate", str(rate)]
    if key is not None:
        argv += ["--key", str(key)]
    return fed.group.start(name, argv)


def go_file(fed: LocalFederation) -> Path:
    return fed.run_dir / "flood.go"


def wait_until_ready(fed: LocalFederation, names: list[str], timeout: float) -> None:
    """Bounded wait until every publisher printed its ready line (or died)."""
    deadline = time.monotonic() + timeout
    pending = set(names)
    while pending and time.monotonic() < deadline:
        for name in list(pending):
            log = fed.run_dir / "logs" / f"{name}.log"
            if (log.exists() and '"ready"' in log.read_text(errors="replace")) or fed.group.procs[name].poll() is not None:
                pending.discard(name)
        time.sleep(0.05)
    if pending:
        raise AssertionError(f"flood publishers not ready within {timeout} s: {sorted(pending)}")


def log_times(path: Path, event: str) -> list[float]:
    """Wall-clock times (s) of a JSON log event."""
    from datetime import datetime

    times = []
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        if line.startswith("{") and f'"{event}"' in line:
            try:
                stamp = json.loads(line)["timestamp"]
            except (ValueError, KeyError):
                continue
            times.append(datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp())
    return times


def publisher_report(fed: LocalFederation, name: str) -> dict:
    """The JSON line a publisher printed last (its log is its stdout)."""
    lines = (fed.run_dir / "logs" / f"{name}.log").read_text(errors="replace").splitlines()
    for line in reversed(lines):
        if line.startswith("{") and '"kind"' in line:
            return json.loads(line)
    return {"sent": 0, "error": "\n".join(lines[-5:])}


async def audit_record_count(url: str, job: JobSpec) -> int:
    nc = await connect(url, "flood-audit-count", first_connect_timeout=10)
    try:
        info = await nc.jetstream().stream_info(Subjects(job.job, prefix=job.transport.prefix).audit_stream)
        return info.state.messages
    finally:
        await nc.close()


def check_job(summary: dict, plan: FloodPlan) -> str:
    """'' when every round completed on time, else what went wrong."""
    if not summary:
        return "no summary.json"
    problems = []
    if summary.get("reason") != "completed":
        problems.append(f"reason {summary.get('reason')!r}")
    if summary.get("rounds_completed") != plan.rounds:
        problems.append(f"rounds_completed {summary.get('rounds_completed')} != {plan.rounds}")
    rounds = summary.get("rounds", [])
    failed = [r.get("round") for r in rounds if r.get("status") != "aggregated"]
    if failed:
        problems.append(f"rounds not aggregated: {failed}")
    # On time: a round closes at its deadline at the latest, plus slack for a busy 2-core box.
    late = [(r.get("round"), round(r.get("seconds", 0), 2)) for r in rounds
            if r.get("seconds", 0) > plan.deadline_s * 1.5 + 1.0]
    if late:
        problems.append(f"rounds late (round, seconds): {late}")
    return "; ".join(problems)


def run_flooded_job(run_dir: Path, nats_url: str, plan: FloodPlan) -> dict:
    """Run the job, flood it while it runs, measure; never raises for a failed job
    (the caller asserts), so the numbers are there either way. Writes
    run_dir/flood-result.json."""
    run_dir = Path(run_dir)
    idle_storms = [w for w in plan.storm_workers if w not in plan.running_workers]
    job = small_job(plan.job_id, rounds=plan.rounds, min_workers=len(plan.running_workers) + len(idle_storms),
                    min_updates=len(plan.running_workers) - 1, deadline_s=plan.deadline_s)
    fed = LocalFederation(run_dir, nats_url, job, plan.listed_workers)
    result = FloodResult(plan=asdict(plan))
    coordinator_log = run_dir / "logs" / "coordinator.log"
    t0 = time.monotonic()
    sampler = None
    try:
        coordinator = fed.start_coordinator()
        for worker in plan.running_workers:
            fed.start_worker(worker)
        sampler = RssSampler(coordinator.pid).start()
        # The publishers start with the workers and wait, ready, for the go file, so
        # that their start-up costs do not decide when the flood hits.
        wait_for_log_event(coordinator_log, "coordinator.started", timeout=120)
        publishers = {
            f"flood-{kind}": start_publisher(fed, f"flood-{kind}", kind, count, plan, rate=count / plan.flood_window_s)
            for kind, count in (("junk-hb", plan.junk_hb), ("junk-upd", plan.junk_upd)) if count > 0
        }
        for worker in plan.storm_workers:
            name = f"flood-signed-hb-{worker}"
            publishers[name] = start_publisher(fed, name, "signed-hb", plan.storm_count, plan, key=fed.key(worker))
        wait_until_ready(fed, list(publishers), timeout=120)
        for worker in plan.running_workers:
            wait_for_log_event(run_dir / "logs" / f"{worker}.log", "worker.started", timeout=120)
        time.sleep(2 * job.transport.heartbeat_s)  # the coordinator has seen every real worker
        result.coordinator_rss_before_flood_mb = sampler.last / 2**20
        result.seconds["to_flood"] = round(time.monotonic() - t0, 2)
        flood_started = time.monotonic()
        go_file(fed).touch()
        for name, proc in publishers.items():
            try:
                proc.wait(timeout=plan.flood_max_seconds + 30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            result.publishers[name] = publisher_report(fed, name)
        result.seconds["flood"] = round(time.monotonic() - flood_started, 2)
        result.junk_sent = sum(r.get("sent", 0) for n, r in result.publishers.items() if "junk" in n)
        result.storm_sent = sum(r.get("sent", 0) for n, r in result.publishers.items() if "signed-hb" in n)

        remaining = max(5.0, plan.job_timeout_s - (time.monotonic() - flood_started))
        try:
            result.coordinator_rc = coordinator.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            result.job_problem = f"coordinator still running {plan.job_timeout_s:.0f} s after the flood began"
        result.seconds["job"] = round(time.monotonic() - t0, 2)
        fed.wait_all(timeout=10 if result.coordinator_rc is not None else 1)
        # Count audit records while the server still holds them (the caller owns it).
        result.audit_records = asyncio.run(audit_record_count(nats_url, job))
    finally:
        if sampler is not None:
            sampler.stop()
        fed.stop()

    result.coordinator_peak_rss_mb = sampler.peak / 2**20 if sampler else 0.0
    result.coordinator_rss_increase_mb = max(0.0, result.coordinator_peak_rss_mb - result.coordinator_rss_before_flood_mb)
    result.coordinator_log_bytes = coordinator_log.stat().st_size if coordinator_log.exists() else 0
    # How much of the flood hit the job while its rounds ran (both clocks are wall time).
    opened, closed = log_times(coordinator_log, "round.opened"), log_times(coordinator_log, "round.closed")
    starts = [r["start_wall"] for r in result.publishers.values() if "start_wall" in r]
    ends = [r["end_wall"] for r in result.publishers.values() if "end_wall" in r]
    if opened and starts and ends:
        job_end = max(closed) if closed else time.time()
        result.seconds["flood_while_rounds_ran"] = round(max(0.0, min(max(ends), job_end) - max(min(starts), min(opened))), 2)
        result.seconds["rounds_span"] = round(job_end - min(opened), 2)
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        try:
            result.summary = json.loads(summary_path.read_text())
        except ValueError as exc:  # e.g. NaN written by an old coordinator
            result.summary = {"unreadable": repr(exc)}
    problem = check_job(result.summary, plan)
    result.job_problem = "; ".join(p for p in (result.job_problem, problem) if p)
    result.job_ok = not result.job_problem
    scale = PER / max(1, result.junk_sent)
    result.per_100k_junk = {
        "audit_records": round(result.audit_records * scale, 1),
        "coordinator_log_bytes": round(result.coordinator_log_bytes * scale),
        "coordinator_rss_increase_mb": round(result.coordinator_rss_increase_mb * scale, 1),
    }
    out = asdict(result)
    out["summary"] = {k: result.summary.get(k) for k in ("reason", "rounds_completed", "updates_accepted",
                                                         "updates_rejected", "final_accuracy", "wall_seconds")}
    out["summary"]["rounds"] = [{k: r.get(k) for k in ("round", "status", "seconds", "accepted")}
                                for r in result.summary.get("rounds", [])]
    (run_dir / "flood-result.json").write_text(json.dumps(out, indent=2, default=str))
    return out


def format_result(out: dict) -> str:
    per = out["per_100k_junk"]
    pubs = ", ".join(f"{n.removeprefix('flood-')}={r.get('sent', 0)} ({r.get('rate')}/s)"
                     for n, r in out["publishers"].items())
    return "\n".join([
        f"flood: {out['junk_sent']} junk + {out['storm_sent']} signed heartbeats: {pubs}",
        f"job: ok={out['job_ok']} {out['job_problem'] or ''} rc={out['coordinator_rc']} "
        f"summary={json.dumps(out['summary'])}",
        f"coordinator: RSS before flood {out['coordinator_rss_before_flood_mb']:.0f} MB, peak "
        f"{out['coordinator_peak_rss_mb']:.0f} MB (+{out['coordinator_rss_increase_mb']:.0f} MB); "
        f"audit records {out['audit_records']}; log {out['coordinator_log_bytes']} bytes",
        f"per 100k junk: audit records {per['audit_records']}, log bytes {per['coordinator_log_bytes']}, "
        f"RSS increase {per['coordinator_rss_increase_mb']} MB",
        f"seconds: {out['seconds']}",
    ])
