"""Chaos harness for issue 7, acceptance 4: a long job survives a coordinator SIGKILLed
again and again, workers dying for good and a nats-server restart, and loses nothing.

``ChaosPlan`` draws every random choice from one seed (kill delays, which kill is followed
by a wait longer than ``max_age_s``, which workers die and when, when the nats-server is
restarted), so a red run can be replayed with the same seed. ``ChaosRun`` executes the
plan against real processes: a nats-server of its own (killed and restarted on the same
port and store), ``fedbus coordinator`` / ``fedbus coordinator --resume`` and six
``fedbus worker`` processes through the CLI. Every wait is bounded by the run's budget;
processes are stopped by PID only.

``analyse`` then judges what the processes left behind, never what the harness intended:
``summary.json``, the audit stream, the coordinator logs (when each round opened) and
the workers' logs (``update.sent`` / ``update.resent`` with round and run). The result is
a ``ChaosReport`` whose ``problems`` list is empty for a correct run; ``describe()``
prints the numbers (the test and ``benchmarks/chaos.py`` print the same).

What "0 honest updates lost" means here, precisely: a worker's update for round r counts
as *sent* at the time of the first ``update.sent``/``update.resent`` log line for (worker,
r) of the job's run (the worker logs it after JetStream acknowledged the publish, so the
stream held it by then). The round's *deadline* is the time the coordinator last logged
``round.opened`` for r (a resumed coordinator reopens the round with a fresh deadline)
plus ``round_deadline_s``. An update is *required* when it was sent at least ``LATE_GRACE_S``
before that deadline; every required (worker, r) must be among the accepted workers of
round r (the audit's ``round.closed`` record, else the summary row), whether r was then
aggregated or failed: a failed round must still have accepted it, it only lacked a
quorum. Updates sent within the grace of the deadline or after it are counted but not
required. Workers killed for good are included: an update that reached the stream before
its worker died is still an honest update.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from nats.errors import TimeoutError as NatsTimeoutError

from fedbus.audit.reader import read_chain, verify_audit
from fedbus.bus import KV_BUCKET, EmbeddedNatsServer, Subjects, connect
from fedbus.demo import cli_command
from fedbus.jobspec import JobSpec
from tests.e2e_support import LocalFederation, small_job

CHAOS_JOB = "e2e-chaos"
NUM_WORKERS = 6
# Small, so one resume waits longer than it; but above the 5 s JetStream publish timeout of
# publish_with_retry: an update whose publish is in flight when the nats-server dies is
# retried with the same sealed envelope (same timestamp) and stored ~5 s after sealing.
MAX_AGE_S = 6.0
LONG_WAIT_S = 8.0  # longer than MAX_AGE_S: held updates must be judged by the stream's stored time
MIN_FINAL_ACCURACY = 0.8  # digits MLP: ~0.97 after 36 rounds, ~0.1 for a broken model
LATE_GRACE_S = 0.5  # an update sent this close to its round's deadline may legitimately miss it
PROGRESS_EVENTS = ("round.opened", "eval.opened")
KILL_MODES = ("time", "after_close", "after_commit")
ROUNDS_AFTER_LAST_KILL = 4  # rounds the last incarnation runs without chaos
# Rejections an honest federation must never see (the workers here are all honest).
HONEST_REJECTIONS = ("stale_timestamp", "not_in_cohort", "wrong_run", "replayed_nonce", "excessive_samples",
                     "rate_limited")


class ChaosError(AssertionError):
    """The chaos run could not be carried out as planned (a process hung, the job ended early)."""


def chaos_job(rounds: int = 36, deadline_s: float = 3.5, min_updates: int = 3, epochs: int = 8) -> JobSpec:
    # Cohort = every live worker (no size); final evaluation off so the job ends on its
    # last round; max_age_s small so one resume waits longer than it. More local epochs
    # than the default make a round last a few hundred ms, so eleven kills at random
    # moments fit into the job instead of it finishing between two kills.
    return small_job(CHAOS_JOB, rounds=rounds, min_workers=NUM_WORKERS, min_updates=min_updates,
                     deadline_s=deadline_s, evaluation={"final_round": False},
                     security={"max_age_s": MAX_AGE_S}, train={"epochs": epochs})


# ---- the plan ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ChaosPlan:
    """Every random choice of one chaos run, drawn from ``seed``."""

    seed: int
    # How each coordinator kill is timed, once the incarnation made progress:
    #   "time"          ``delays_s`` (0.3-3 s) later;
    #   "after_close"   ``delays_s`` (0-0.15 s) after its next round.closed log line: between
    #                   a round's announcement, the acks and the next round's commit and open;
    #   "after_commit"  the moment the test sees its next round-closing commit land in the
    #                   KV bucket (a watch): between a round's commit and its announcement.
    modes: tuple[str, ...]
    delays_s: tuple[float, ...]
    long_wait_kill: int  # after this kill, wait LONG_WAIT_S before resuming (and kill while holding updates)
    worker_kills: dict[int, tuple[str, float]]  # during incarnation i: (worker, seconds after progress)
    nats_restart: tuple[int, float]  # during incarnation i, this many seconds after progress
    resume_pauses_s: tuple[float, ...]  # pause between a kill and the resume (other than the long wait)

    @property
    def kills(self) -> int:
        return len(self.delays_s)

    @classmethod
    def draw(cls, seed: int, kills: int = 11, workers: tuple[str, ...] = ()) -> ChaosPlan:
        if kills < 4:
            raise ValueError("a chaos plan needs at least 4 coordinator kills")
        workers = workers or tuple(f"w{i:02d}" for i in range(1, NUM_WORKERS + 1))
        rng = random.Random(seed)
        modes = tuple(rng.choices(KILL_MODES, weights=(2, 1, 1))[0] for _ in range(kills))
        delays = tuple(round({"time": rng.uniform(0.3, 3.0), "after_close": rng.uniform(0.0, 0.15)}.get(m, 0.0), 3)
                       for m in modes)
        middle = list(range(1, kills - 1))
        long_wait = rng.choice(middle)
        victims = rng.sample(workers, 2)
        when = sorted(rng.sample(middle, 2))
        worker_kills = {when[0]: (victims[0], round(rng.uniform(0.0, 1.0), 2)),
                        when[1]: (victims[1], round(rng.uniform(0.0, 1.0), 2))}
        nats_at = rng.choice([i for i in middle if i != long_wait])
        nats_restart = (nats_at, round(rng.uniform(0.2, 1.5), 2))
        pauses = tuple(round(rng.uniform(0.0, 0.5), 2) for _ in range(kills))
        return cls(seed, modes, delays, long_wait, worker_kills, nats_restart, pauses)


# ---- reading what the processes left behind ------------------------------------------------

def read_events(path: Path) -> list[dict]:
    """The JSON log lines of one process (a torn last line or non-JSON output is skipped)."""
    out = []
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        if not line.startswith("{"):
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "event" in rec:
            out.append(rec)
    return out


def log_time(rec: dict) -> float:
    """A log record's wall-clock time in seconds (structlog's ISO UTC timestamp)."""
    return datetime.fromisoformat(str(rec["timestamp"]).replace("Z", "+00:00")).timestamp()


async def read_audit(nats_url: str, job: str, federation) -> tuple[list[dict], list[str]]:
    """The coordinator's audit records in order, and what ``fedbus audit verify`` finds wrong
    with any chain of the job (empty: every signature and link holds)."""
    subjects = Subjects(job)
    nc = await connect(nats_url, name="chaos-auditor", first_connect_timeout=10)
    try:
        js = nc.jetstream()
        verdict = await verify_audit(js, subjects, federation)
        return (await read_chain(js, subjects, "coordinator", federation),
                [p.describe() for p in verdict.problems])
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


async def wait_for_held_updates(nats_url: str, job: str, at_least: int, timeout_s: float) -> int:
    """Poll the coordinator's update consumer until it holds ``at_least`` unacknowledged
    updates (or the timeout passes); the count it saw last."""
    subjects = Subjects(job)
    nc = await connect(nats_url, name="chaos-probe", first_connect_timeout=10)
    held = 0
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                info = await js.consumer_info(subjects.upd_stream, "coordinator-updates")
                held = info.num_ack_pending
                if held >= at_least:
                    return held
            await asyncio.sleep(0.05)
        return held
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


async def kill_at_next_closing_commit(nats_url: str, job: str, proc: subprocess.Popen,
                                     timeout_s: float) -> dict | None:
    """SIGKILL ``proc`` the moment the next commit that closes a round lands in the job's KV
    record (watched, not polled); the committed record, or None if none came in time."""
    nc = await connect(nats_url, name="chaos-commit-watch", first_connect_timeout=10)
    try:
        kv = await nc.jetstream().key_value(KV_BUCKET)
        watcher = await kv.watch(job)
        caught_up = False  # the watch first replays the current value, then a None marker
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                entry = await watcher.updates(timeout=0.5)
            except NatsTimeoutError:
                if proc.poll() is not None:
                    return None
                continue
            if entry is None:
                caught_up = True
                continue
            if not caught_up or not entry.value:
                continue
            record = json.loads(entry.value)["record"]["record"]
            if record.get("last_close"):
                if proc.poll() is None:
                    proc.kill()
                return record
        return None
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


# ---- running the plan ---------------------------------------------------------------------

@dataclass
class ChaosOutcome:
    coordinator_starts: int = 0
    coordinator_kills: int = 0
    resumes: int = 0
    long_waits_s: list[float] = field(default_factory=list)
    held_at_long_wait_kill: int = 0
    workers_killed: list[str] = field(default_factory=list)
    nats_restarts: int = 0
    final_exit_code: int | None = None
    worker_exit_codes: dict[str, int | None] = field(default_factory=dict)
    wall_s: float = 0.0
    timeline: list[str] = field(default_factory=list)
    audit: list[dict] = field(default_factory=list)  # the coordinator's chain
    audit_problems: list[str] = field(default_factory=list)  # in any chain, as fedbus audit verify names them


class ChaosRun:
    def __init__(self, run_dir: Path, plan: ChaosPlan, job: JobSpec | None = None, *, budget_s: float = 330.0):
        self.run_dir = Path(run_dir)
        self.plan = plan
        self.job = job or chaos_job()
        self.budget_s = budget_s
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.server = EmbeddedNatsServer(store_dir=self.run_dir / "nats-store",
                                         log_file=self.run_dir / "logs" / "nats-server.log")
        self.fed: LocalFederation | None = None
        self.outcome = ChaosOutcome()
        self._t0 = 0.0
        self._deadline = 0.0
        # (coordinator log, round.closed count at progress, rounds this incarnation may close)
        self._round_cap: tuple[Path, int, int] | None = None
        self._cap_noted = False

    # -- small bounded helpers

    def _left(self) -> float:
        return self._deadline - time.monotonic()

    def _note(self, what: str) -> None:
        self.outcome.timeline.append(f"{time.monotonic() - self._t0:7.2f}s {what}")

    def _sleep(self, seconds: float, *, capped: bool = False) -> None:
        """Sleep, bounded by the budget; ``capped``: a chaos delay while an incarnation runs,
        cut short once it closed its allowance of rounds (see ``_chaos``)."""
        until = time.monotonic() + max(0.0, min(seconds, self._left()))
        while time.monotonic() < until:
            cap = self._round_cap if capped else None
            if cap is not None and self._count(cap[0], ("round.closed",)) - cap[1] >= cap[2]:
                if not self._cap_noted:
                    self._note(f"{cap[0].stem} closed its allowance of {cap[2]} rounds: no more waiting")
                    self._cap_noted = True
                return
            time.sleep(min(0.02, max(0.0, until - time.monotonic())))

    def coordinator_log(self, n: int) -> Path:
        return self.run_dir / "logs" / f"coordinator-{n:02d}.log"

    def _start_coordinator(self, resume: bool) -> subprocess.Popen:
        assert self.fed is not None
        n = self.outcome.coordinator_starts
        argv = ["coordinator", *self.fed._common("coordinator"), "--key", str(self.fed.key("coordinator")),
                "--run-dir", str(self.run_dir)]
        if resume:
            argv.append("--resume")
        proc = self.fed.group.start(f"coordinator-{n:02d}", cli_command(*argv))
        self.outcome.coordinator_starts += 1
        self.outcome.resumes += int(resume)
        self._note(f"coordinator-{n:02d} started (pid {proc.pid}{', --resume' if resume else ''})")
        return proc

    def _count(self, path: Path, names: tuple[str, ...]) -> int:
        return sum(1 for r in read_events(path) if r["event"] in names)

    def _wait_progress(self, proc: subprocess.Popen, log: Path, names: tuple[str, ...], after: int,
                       timeout_s: float, what: str) -> None:
        """Until the incarnation logged more than ``after`` of ``names``; bounded."""
        deadline = time.monotonic() + min(timeout_s, max(0.0, self._left()))
        while time.monotonic() < deadline:
            if self._count(log, names) > after:
                return
            code = proc.poll()
            if code is not None:
                raise ChaosError(f"{log.stem} exited with {code} while waiting for {what} "
                                 f"(after {self.outcome.coordinator_kills} kills)")
            time.sleep(0.05)
        raise ChaosError(f"{log.stem}: no {what} within {timeout_s:.0f} s")

    def _aggregated_rounds(self) -> set[int]:
        done: set[int] = set()
        for n in range(self.outcome.coordinator_starts):
            for r in read_events(self.coordinator_log(n)):
                if r["event"] == "round.closed" and r.get("status") == "aggregated":
                    done.add(int(r["round"]))
        return done

    def _kill_coordinator(self, proc: subprocess.Popen) -> None:
        if proc.poll() is not None:
            raise ChaosError(f"the coordinator (pid {proc.pid}) had already exited with {proc.returncode} "
                             f"before kill {self.outcome.coordinator_kills + 1}")
        proc.kill()  # SIGKILL: no cleanup, no goodbye
        self._count_kill(proc, "")

    def _count_kill(self, proc: subprocess.Popen, how: str) -> None:
        proc.wait(timeout=10)
        self.outcome.coordinator_kills += 1
        self._note(f"coordinator SIGKILLed {how}(kill {self.outcome.coordinator_kills}, pid {proc.pid}), "
                   f"{len(self._aggregated_rounds())} rounds logged as aggregated so far")

    def _kill_worker(self, worker: str) -> None:
        assert self.fed is not None
        proc = self.fed.group.procs[worker]
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        self.outcome.workers_killed.append(worker)
        self._note(f"worker {worker} SIGKILLed for good (pid {proc.pid})")

    def _restart_nats(self) -> None:
        self.server.kill()  # SIGKILL; the file store survives
        self._note(f"nats-server SIGKILLed (pid {self.server.pid})")
        self._sleep(1.0)
        self.server.start(timeout=30)  # same ports, same store
        self.outcome.nats_restarts += 1
        self._note(f"nats-server restarted (pid {self.server.pid})")

    # -- the run

    def execute(self) -> ChaosOutcome:
        self._t0 = time.monotonic()
        self._deadline = self._t0 + self.budget_s
        try:
            self.server.start(timeout=30)
            self.fed = LocalFederation(self.run_dir, self.server.url, self.job, NUM_WORKERS)
            self._note(f"nats-server {self.server.url} (pid {self.server.pid})")
            proc = self._start_coordinator(resume=False)
            for p in self.fed.federation.workers():
                self.fed.start_worker(p.id, "--state-dir", str(self.run_dir / "state" / p.id))
            proc = self._chaos(proc)
            self._finish(proc)
            self.outcome.audit, self.outcome.audit_problems = asyncio.run(
                read_audit(self.server.url, self.job.job, self.fed.federation))
        finally:
            if self.fed is not None:
                self.fed.group.stop_all(grace=5)
            self.server.stop()
            self.outcome.wall_s = time.monotonic() - self._t0
        return self.outcome

    def _chaos(self, proc: subprocess.Popen) -> subprocess.Popen:
        plan = self.plan
        rounds = self.job.rounds
        for i in range(plan.kills):
            log = self.coordinator_log(self.outcome.coordinator_starts - 1)
            # Progress: this incarnation opened (or reopened) a round. The first start also
            # waits for six workers to come up, which takes longest.
            self._wait_progress(proc, log, PROGRESS_EVENTS, 0, 120 if i == 0 else 60, "round.opened")
            delay = plan.delays_s[i]
            # Keep rounds for the kills still to come, however fast rounds are on this machine:
            # each incarnation may close about its share of the rounds left before it is killed
            # (the kill then comes at the random delay or right after that share, whichever is first).
            left = rounds - len(self._aggregated_rounds())
            allowance = max(1, (left - ROUNDS_AFTER_LAST_KILL) // (plan.kills - i))
            self._round_cap = (log, self._count(log, ("round.closed",)), allowance)
            self._cap_noted = False
            if left <= 2 * (plan.kills - i) + 2:
                delay = min(delay, 0.3)
                self._note(f"only {left} rounds left for {plan.kills - i} kills: delay cut to {delay} s")
            if plan.nats_restart[0] == i:
                self._sleep(plan.nats_restart[1], capped=True)
                closed = self._count(log, ("round.closed",))
                self._restart_nats()
                # The coordinator must get going again after the restart before it is killed.
                self._wait_progress(proc, log, ("round.closed",), closed, 60, "round.closed after the nats restart")
            if i in plan.worker_kills:
                worker, after = plan.worker_kills[i]
                self._sleep(min(after, delay), capped=True)
                self._kill_worker(worker)
                delay = max(0.0, delay - after)
            if i == plan.long_wait_kill:
                # Kill while the coordinator holds updates of an open round, so the resumed
                # one must accept updates older than max_age_s (judged by the stream's time).
                opened = self._count(log, ("round.opened",))
                self._wait_progress(proc, log, ("round.opened",), opened, 30, "a fresh round.opened")
                held = asyncio.run(wait_for_held_updates(self.server.url, self.job.job, 1, min(10.0, self._left())))
                self.outcome.held_at_long_wait_kill = held
                self._note(f"coordinator holds {held} unacknowledged updates")
                self._kill_coordinator(proc)
                killed_at = time.monotonic()
                self._sleep(LONG_WAIT_S)
                waited = round(time.monotonic() - killed_at, 2)  # measured: the test asserts on it
                self.outcome.long_waits_s.append(waited)
                self._note(f"waited {waited} s (> max_age_s {self.job.security.max_age_s}) before resuming")
            elif plan.modes[i] == "after_commit":
                rec = asyncio.run(kill_at_next_closing_commit(self.server.url, self.job.job, proc,
                                                              min(30.0, max(1.0, self._left()))))
                if rec is None:
                    raise ChaosError(f"{log.stem}: no round-closing commit seen within 30 s")
                self._count_kill(proc, f"at the commit closing round {rec['last_close'].get('round')}")
                self._sleep(plan.resume_pauses_s[i])
            else:
                if plan.modes[i] == "after_close":
                    closed = self._count(log, ("round.closed",))
                    self._wait_progress(proc, log, ("round.closed",), closed, 30, "the next round.closed")
                self._sleep(delay, capped=True)
                self._kill_coordinator(proc)
                self._sleep(plan.resume_pauses_s[i])
            self._round_cap = None
            if self._left() <= 0:
                raise ChaosError(f"budget of {self.budget_s:.0f} s spent after {i + 1} kills")
            proc = self._start_coordinator(resume=True)
        return proc

    def _finish(self, proc: subprocess.Popen) -> None:
        assert self.fed is not None
        try:
            self.outcome.final_exit_code = proc.wait(timeout=max(1.0, self._left()))
        except subprocess.TimeoutExpired:
            # SIGINT first: the coordinator logs what it is waiting on (service.interrupted).
            proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            raise ChaosError("the last coordinator did not finish within the budget") from None
        self._note(f"last coordinator exited with {self.outcome.final_exit_code}")
        # Live workers exit on job.done; give them a bounded moment.
        live = {n: p for n, p in self.fed.group.procs.items() if n.startswith("w")}
        until = time.monotonic() + min(30.0, max(1.0, self._left()))
        for name, p in live.items():
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.1, until - time.monotonic()))
            self.outcome.worker_exit_codes[name] = p.poll()


# ---- judging the run ---------------------------------------------------------------------

@dataclass
class ChaosReport:
    problems: list[str] = field(default_factory=list)
    numbers: dict[str, object] = field(default_factory=dict)
    lost: list[tuple[str, int]] = field(default_factory=list)

    def describe(self) -> str:
        lines = [f"{k}: {v}" for k, v in self.numbers.items()]
        if self.problems:
            lines.append(f"PROBLEMS ({len(self.problems)}):")
            lines += [f"  - {p}" for p in self.problems]
        else:
            lines.append("no problems")
        return "\n".join(lines)


def analyse(run_dir: Path, job: JobSpec, outcome: ChaosOutcome) -> ChaosReport:
    rep = ChaosReport()
    problems = rep.problems
    logs = Path(run_dir) / "logs"
    planned = job.rounds

    # -- summary.json: one file for the whole job
    try:
        summary = json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, ValueError) as exc:
        problems.append(f"summary.json unreadable: {exc!r}")
        summary = {"rounds": []}
    run = summary.get("run", "")
    if summary.get("reason") != "completed":
        problems.append(f"summary reason {summary.get('reason')!r} (error {summary.get('error')!r}), not 'completed'")
    if summary.get("rounds_completed") != planned:
        problems.append(f"summary rounds_completed {summary.get('rounds_completed')} != planned {planned}")
    if summary.get("model_version") != planned:
        problems.append(f"summary model_version {summary.get('model_version')} != {planned}")
    if summary.get("incarnations") != outcome.coordinator_starts:
        problems.append(f"summary incarnations {summary.get('incarnations')} != coordinator starts "
                        f"{outcome.coordinator_starts}")
    accuracy = summary.get("final_accuracy")
    if accuracy is None or accuracy < MIN_FINAL_ACCURACY:
        problems.append(f"final test accuracy {accuracy} < {MIN_FINAL_ACCURACY}: the model that came through is broken")
    if outcome.final_exit_code != 0:
        problems.append(f"the last coordinator exited with {outcome.final_exit_code}")
    s_rounds = summary.get("rounds", [])
    s_agg = [r for r in s_rounds if r.get("status") == "aggregated"]
    s_failed = [r for r in s_rounds if r.get("status") != "aggregated"]
    versions = [r["model_version"] for r in s_agg]
    if any(b <= a for a, b in zip(versions, versions[1:])):
        problems.append(f"summary: model versions not strictly increasing: {versions}")
    if versions != list(range(1, planned + 1)):
        missing = sorted(set(range(1, planned + 1)) - set(versions))
        problems.append(f"summary: aggregated model versions are not exactly 1..{planned} "
                        f"(missing {missing}, got {len(versions)} entries)")
    dup_rounds = sorted(r for r, c in Counter(r["round"] for r in s_rounds).items() if c > 1)
    if dup_rounds:
        problems.append(f"summary: rounds listed more than once: {dup_rounds}")
    # Every accepted update belongs to exactly one closed round (a resumed round's held
    # updates are accepted again, by the incarnation that closes it), so over the whole job:
    row_total = sum(int(r.get("accepted", 0)) for r in s_rounds)
    if summary.get("updates_accepted") != row_total:
        problems.append(f"summary updates_accepted {summary.get('updates_accepted')} != {row_total}, the updates "
                        f"accepted by the closed rounds it lists")
    rejected = summary.get("updates_rejected", {}) or {}
    honest_rej = {k: v for k, v in rejected.items() if k in HONEST_REJECTIONS}
    if honest_rej:
        problems.append(f"summary: honest updates rejected: {honest_rej}")

    # -- the audit chain: one for the whole job
    audit = outcome.audit
    seqs = [r.get("seq") for r in audit]
    chain_ok = not outcome.audit_problems
    if not audit:
        problems.append("audit stream is empty")
    if not chain_ok:
        problems.append(f"audit: chain broken ({outcome.audit_problems[0]})")
    if seqs != list(range(1, len(audit) + 1)):
        problems.append(f"audit: seq not contiguous from 1: {_gaps(seqs)}")
    events = Counter(r.get("event") for r in audit)
    if events["job.started"] != 1:
        problems.append(f"audit: {events['job.started']} job.started records, expected 1")
    if events["job.resumed"] != outcome.resumes:
        problems.append(f"audit: {events['job.resumed']} job.resumed records, expected {outcome.resumes}")
    if events["job.done"] != 1:
        problems.append(f"audit: {events['job.done']} job.done records, expected 1")
    runs = {r.get("run") for r in audit if r.get("event") in ("job.started", "job.resumed", "job.done")}
    if runs != {run}:
        problems.append(f"audit: runs {sorted(map(str, runs))} != summary run {run!r}")
    closes = [r for r in audit if r.get("event") == "round.closed"]
    a_dup = sorted(r for r, c in Counter(c["round"] for c in closes).items() if c > 1)
    if a_dup:
        problems.append(f"audit: round.closed more than once for rounds {a_dup}")
    a_close = {c["round"]: c for c in closes}  # aggregated and failed
    a_versions = [c["model_version"] for c in closes if c.get("status") == "aggregated"]
    if any(b <= a for a, b in zip(a_versions, a_versions[1:])):
        problems.append(f"audit: model versions not strictly increasing: {a_versions}")
    s_close = {r["round"]: r for r in s_rounds}
    if set(a_close) != set(s_close):
        problems.append(f"audit and summary disagree on the closed rounds: only in audit "
                        f"{sorted(set(a_close) - set(s_close))}, only in summary {sorted(set(s_close) - set(a_close))}")
    for rnd, r in sorted(s_close.items()):
        c = a_close.get(rnd)
        if c is None:
            continue
        if (c.get("status"), len(c.get("accepted", [])), c.get("model_version")) != \
                (r.get("status"), r.get("accepted"), r.get("model_version")):
            problems.append(f"round {rnd}: summary says {r.get('status')} with {r.get('accepted')} accepted at "
                            f"v{r.get('model_version')}, audit {c.get('status')} with {len(c.get('accepted', []))} "
                            f"at v{c.get('model_version')}")
        elif "accepted_workers" in r and sorted(r["accepted_workers"]) != sorted(c.get("accepted", [])):
            problems.append(f"round {rnd}: summary accepted {r['accepted_workers']}, audit {c.get('accepted')}")
    # Who was accepted in each closed round: the audit record, else the summary's row.
    accepted_by_round: dict[int, list[str]] = {rnd: list(c.get("accepted", [])) for rnd, c in a_close.items()}
    for rnd, r in s_close.items():
        if rnd not in accepted_by_round and "accepted_workers" in r:
            accepted_by_round[rnd] = list(r["accepted_workers"])

    # -- when each round opened last (its final deadline), from the coordinators' logs
    last_open: dict[int, float] = {}
    opens: Counter[int] = Counter()
    logged_closes: Counter[int] = Counter()
    for n in range(outcome.coordinator_starts):
        for rec in read_events(logs / f"coordinator-{n:02d}.log"):
            if rec["event"] == "round.opened":
                rnd = int(rec["round"])
                opens[rnd] += 1
                last_open[rnd] = max(last_open.get(rnd, 0.0), log_time(rec))
            elif rec["event"] == "round.closed":
                logged_closes[int(rec["round"])] += 1
    twice = sorted(r for r, c in logged_closes.items() if c > 1)
    if twice:
        problems.append(f"coordinator logs: rounds closed more than once (across incarnations): {twice}")
    deadline = {rnd: t + job.round_deadline_s for rnd, t in last_open.items()}

    # -- honest updates: what the workers sent against what the rounds accepted
    first_sent: dict[tuple[str, int], float] = {}
    sent = resent = 0
    wrong_run = []
    for p in sorted(logs.glob("w*.log")):
        worker = p.stem
        for rec in read_events(p):
            if rec["event"] not in ("update.sent", "update.resent"):
                continue
            sent += rec["event"] == "update.sent"
            resent += rec["event"] == "update.resent"
            if rec.get("run") != run:
                wrong_run.append((worker, rec.get("round"), rec.get("run")))
                continue
            key = (worker, int(rec["round"]))
            first_sent[key] = min(first_sent.get(key, float("inf")), log_time(rec))
    if wrong_run:
        problems.append(f"updates sent under another run than {run!r}: {wrong_run[:5]}")
    # Required: sent in time, whether the round was then aggregated or failed (a failed round
    # must still have accepted it; it only lacked a quorum).
    failed_rounds = {r["round"] for r in s_failed}
    required = accepted_ok = late = to_failed = 0
    late_list = []
    for (worker, rnd), t in sorted(first_sent.items()):
        to_failed += rnd in failed_rounds
        accepted = accepted_by_round.get(rnd)
        if accepted is None:
            problems.append(f"{worker} sent an update for round {rnd}, which has no close record")
            continue
        in_time = rnd in deadline and t < deadline[rnd] - LATE_GRACE_S
        if worker in accepted:
            accepted_ok += 1
            required += 1
            late += not in_time  # late but still in: counted as accepted
            continue
        if not in_time:
            late += 1
            late_list.append((worker, rnd, round(t - deadline.get(rnd, t), 3)))
            continue
        required += 1
        rep.lost.append((worker, rnd))
    if rep.lost:
        detail = [f"{w}@r{r} sent {deadline[r] - first_sent[(w, r)]:.2f}s before the deadline"
                  f"{' of a failed round' if r in failed_rounds else ''}"
                  f"{' (worker killed later)' if w in outcome.workers_killed else ''}" for w, r in rep.lost[:10]]
        problems.append(f"{len(rep.lost)} honest updates lost: {detail}")
    accepted_total = sum(len(ws) for ws in accepted_by_round.values())
    senders_missing = sorted((w, rnd) for rnd, ws in accepted_by_round.items() for w in ws
                             if (w, rnd) not in first_sent)

    rep.numbers = {
        "wall seconds": round(outcome.wall_s, 1),
        "coordinator starts / SIGKILLs / resumes": (outcome.coordinator_starts, outcome.coordinator_kills,
                                                    outcome.resumes),
        "waits longer than max_age_s before a resume (s)": outcome.long_waits_s,
        "updates held at the long-wait kill": outcome.held_at_long_wait_kill,
        "workers killed for good": outcome.workers_killed,
        "nats-server restarts": outcome.nats_restarts,
        "summary incarnations": summary.get("incarnations"),
        "rounds planned / completed": (planned, summary.get("rounds_completed")),
        "final test accuracy": accuracy,
        "round entries aggregated / failed": (len(s_agg), len(s_failed)),
        "rounds opened more than once (reopened after a resume)": sum(1 for c in opens.values() if c > 1),
        "updates sent / resent (log lines)": (sent, resent),
        "(worker, round) pairs sent": len(first_sent),
        "pairs required / accepted / lost": (required, accepted_ok, len(rep.lost)),
        "pairs late (within grace or after deadline) / sent to rounds that failed": (late, to_failed),
        "late pairs not accepted": late_list[:10],
        "accepted in closed rounds / summary updates_accepted": (accepted_total,
                                                                            summary.get("updates_accepted")),
        "accepted pairs with no update.sent log line": senders_missing[:10],
        "updates rejected (summary)": rejected,
        "audit records / chain ok / job.resumed / round.closed": (len(audit), chain_ok, events["job.resumed"],
                                                                  len(closes)),
        "worker exit codes": outcome.worker_exit_codes,
    }
    return rep


def _gaps(seqs: list) -> str:
    bad = [(i + 1, s) for i, s in enumerate(seqs) if s != i + 1]
    return f"{len(bad)} positions differ, first {bad[:5]}"


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(t[:300] for t in path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def env_seed(default: int) -> int:
    return int(os.environ.get("FEDBUS_CHAOS_SEED", default))
