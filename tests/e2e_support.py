"""Helpers for end-to-end tests: real nats-server, real CLI processes."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from pathlib import Path

from fedbus.crypto.envelopes import Rejection
from fedbus.crypto.federation import Federation
from fedbus.crypto.keys import Identity
from fedbus.crypto.sealing import Opener
from fedbus.demo import ProcessGroup, cli_command, write_federation
from fedbus.jobspec import CohortSpec, JobSpec


def small_job(job_id: str, *, rounds: int, min_workers: int, min_updates: int, deadline_s: float = 30.0,
              **overrides) -> JobSpec:
    return JobSpec(job=job_id, task="fedbus.tasks.digits:task", rounds=rounds, seed=1,
                   task_params={"model": "mlp", "partition": "iid"},
                   cohort=CohortSpec(min_workers=min_workers, min_updates=min_updates, wait_for_workers_s=120),
                   round_deadline_s=deadline_s, **overrides)


class LocalFederation:
    """Keys, federation file and job spec in a directory, and the CLI processes run from it."""

    def __init__(self, run_dir: Path, nats_url: str, job: JobSpec, num_workers: int, *, regions: int = 1,
                 aggregators: bool = False, credentials_of=None):
        self.run_dir = run_dir
        self.nats_url = nats_url
        # participant id -> its connection options (--tlsca/--tlscert/... ), for a secured server
        self.credentials_of = credentials_of or (lambda participant_id: [])
        self.job = job
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.federation: Federation = write_federation(run_dir, num_workers, regions, aggregators)
        job.dump(run_dir / "job.yaml")
        self.spans = run_dir / "spans.jsonl"
        env = dict(os.environ, FEDBUS_LOG_JSON="1", FEDBUS_SPAN_FILE=str(self.spans))
        self.group = ProcessGroup(run_dir / "logs", env)

    def key(self, participant_id: str) -> Path:
        return self.run_dir / "keys" / f"{participant_id}.key"

    def opener(self) -> Opener:
        """Every update recipient's encryption key (coordinator and aggregators): for tests
        that read the raw, sealed updates off the stream to check what was aggregated."""
        readers = [self.federation.coordinator(), *self.federation.aggregators()]
        return Opener.of(*(Identity.load(self.key(p.id)) for p in readers))

    def _common(self, participant_id: str) -> list[str]:
        return ["--job", str(self.run_dir / "job.yaml"), "--federation", str(self.run_dir / "federation.yaml"),
                "--nats", self.nats_url, *self.credentials_of(participant_id)]

    def start_coordinator(self, *extra: str, resume: bool = False) -> subprocess.Popen:
        """The coordinator, or with ``resume`` a second one (``coordinator-resumed``) continuing its run."""
        return self.group.start("coordinator-resumed" if resume else "coordinator", cli_command(
            "coordinator", *self._common("coordinator"), "--key", str(self.key("coordinator")), "--run-dir", str(self.run_dir),
            *(("--resume",) if resume else ()), *extra))

    def start_workers(self) -> None:
        for w in self.federation.workers():
            self.start_worker(w.id)

    def kill(self, name: str) -> None:
        """SIGKILL one process this federation started (no goodbye) and reap it."""
        proc = self.group.procs[name]
        proc.kill()
        proc.wait()

    def state_dir(self, worker_id: str) -> Path:
        return self.run_dir / "worker-state" / worker_id

    def start_worker(self, worker_id: str, *extra: str) -> subprocess.Popen:
        # Each worker's state stays in the test's directory (the default is under the cwd).
        state = () if "--state-dir" in extra else ("--state-dir", str(self.state_dir(worker_id)))
        return self.group.start(worker_id, cli_command(
            "worker", *self._common(worker_id), "--key", str(self.key(worker_id)), "--id", worker_id, *state, *extra))

    def start_aggregator(self, region: str, *extra: str, name: str | None = None) -> subprocess.Popen:
        agg = f"agg-{region}"
        return self.group.start(name or agg, cli_command(
            "aggregator", *self._common(agg), "--key", str(self.key(agg)), "--id", agg, "--region", region, *extra))

    def run_job(self, *, url_of=None, worker_args=None, timeout: float = 180) -> dict:
        """Coordinator, one aggregator per listed aggregator region, every worker; wait for the
        job (bounded), stop everything, return summary.json. ``url_of(region)``: the NATS URL
        of that region's processes (a leaf node); ``worker_args(worker)``: extra worker options."""
        def where(region: str) -> tuple[str, ...]:
            return ("--nats", url_of(region)) if url_of else ()

        try:
            self.start_coordinator()
            for agg in self.federation.aggregators():
                self.start_aggregator(agg.region, *where(agg.region))
            for w in self.federation.workers():
                self.start_worker(w.id, *where(w.region), *(worker_args(w.id) if worker_args else ()))
            assert self.wait_coordinator(timeout=timeout) == 0, self.tail_logs()
            self.wait_all(timeout=30)
        finally:
            self.stop()
        return self.summary()

    def wait_coordinator(self, timeout: float) -> int:
        proc = self.group.procs["coordinator"]
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"coordinator did not finish in {timeout} s; logs:\n{self.tail_logs()}") from None

    def wait_all(self, timeout: float) -> dict[str, int | None]:
        deadline = time.monotonic() + timeout
        for proc in self.group.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        return {name: p.poll() for name, p in self.group.procs.items()}

    def summary(self) -> dict:
        return json.loads((self.run_dir / "summary.json").read_text())

    def tail_logs(self, lines: int = 15) -> str:
        out = []
        for path in sorted((self.run_dir / "logs").glob("*.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path.name}\n" + "\n".join(t[:300] for t in text))
        return "\n".join(out)

    def stop(self) -> None:
        self.group.stop_all(grace=5)


def wait_for_round(fed: LocalFederation, round_: int, timeout: float) -> None:
    """Block until the coordinator logged round.closed for ``round_`` (bounded); fail early
    if the coordinator exits first."""
    log = fed.run_dir / "logs" / "coordinator.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists():
            for line in log.read_text(errors="replace").splitlines():
                if '"round.closed"' in line and json.loads(line).get("round") == round_:
                    return
        coordinator = fed.group.procs.get("coordinator")
        if coordinator is not None and coordinator.poll() is not None:
            raise AssertionError(f"coordinator exited before round {round_} closed:\n{fed.tail_logs()}")
        time.sleep(0.05)
    raise AssertionError(f"round {round_} did not close within {timeout} s:\n{fed.tail_logs()}")


async def cohort_opens(messenger, verifier, control: asyncio.Queue, worker_id: str, deadline_s: float):
    """Verified round.open messages whose cohort includes ``worker_id``, read from a queue that
    round.open and job.done subscriptions feed, until job.done or the deadline (bounded)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            msg = await asyncio.wait_for(control.get(), timeout=1)
        except asyncio.TimeoutError:
            continue
        if msg.subject.endswith("job.done"):
            return
        try:
            got = await messenger.receive(verifier, msg.data)
        except Rejection:  # e.g. an ordered consumer's redelivery after a reset
            continue
        if worker_id in got.fields.cohort:
            yield got
