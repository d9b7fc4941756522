"""WorkerPool: many logical workers in one process. A TESTING AND SIMULATION AID.

``fedbus worker --key-dir DIR --ids w0001..w0500`` hosts every listed id as a worker of
its own: its own key, its own signed heartbeats and updates with its own nonces, its own
``WorkerCore`` (cohort membership, run binding, stored updates), its own update pipeline
and data partition, its own audit chain, its own inbox of control messages. To the
coordinator each is a participant like any other, so a few processes put 1,000 real
participants on the bus of one machine (``benchmarks/participants.py``). It is not a
way to deploy: real data holders run one ``fedbus worker`` each.

What the hosted workers share, and why it is safe to:
  * one NATS connection (replies arrive under the default ``_INBOX`` prefix, not one per
    participant: a server whose permissions give each participant only its own inbox and
    subjects, ``fedbus nats config``, refuses a pool; run it against an open local server);
  * one follower of the control stream, and one verification of each control message
    (the coordinator's signature, freshness, nonce): the verified message then goes to
    every hosted worker's inbox, whose core decides on its own;
  * one ``KeyWatch``: a key event that revokes or rotates away a hosted worker stops that
    worker (no more heartbeats, no more updates), the others go on;
  * the task object and one training module (as ``fedbus sim``): every Train / Evaluate
    loads the received model into it first, so hosted workers train one at a time (a
    ``SharedTraining.slot``). Memory per hosted worker is its data partition, its core
    and at most one stored update (``keep_sent=1``).

Heartbeats follow the job's ``transport.heartbeat_s`` per worker, each worker at its own
random phase and every interval jittered by ``HEARTBEAT_JITTER``, so 1,000 workers beat
evenly spread (1,000 / heartbeat_s per second), never in a burst.

Secure aggregation is not supported: its key exchange runs per worker beside training,
which one shared training slot would serialise. The pool exits once every hosted worker
is done (``job.done``, or its key revoked or rotated away), with the highest exit code
among them (4 if any was revoked).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import os
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

import structlog
import torch

from fedbus.bus import JOB_STREAMS_WAIT_S, NatsCredentials, Subjects, connect, wait_for_stream
from fedbus.bus.follower import ControlFollower
from fedbus.crypto.envelopes import Rejection, now_ms
from fedbus.crypto.federation import Federation
from fedbus.crypto.keyevents import KeyChange
from fedbus.crypto.keys import Identity
from fedbus.jobspec import JobSpec
from fedbus.keywatch import REVOKED_EXIT_CODE, KeyWatch, own_key_problem, stop_line
from fedbus.messaging import Received, verifier_for
from fedbus.protocol.codec import spec_of
from fedbus.audit.queue import report_rejections
from fedbus.tasks import load_task
from fedbus.telemetry.stacks import stop_tasks
from fedbus.worker.service import CONNECT_TIMEOUT_S, CONTROL_BATCH, SharedTraining, WorkerService

log = structlog.get_logger("fedbus.worker.pool")

# Each heartbeat interval is heartbeat_s x (1 ± HEARTBEAT_JITTER), uniformly.
HEARTBEAT_JITTER = 0.1
# The most workers one process may host: ids and keys are bounded like any other input.
MAX_POOL = 10_000


class PoolError(ValueError):
    """A pool that cannot run (bad ids, a job feature a pool does not support)."""


def parse_ids(text: str) -> list[str]:
    """``A,B,C`` and ranges ``w0001..w0250`` (same prefix, numbers of the same width), in order.

    Bounded: at most MAX_POOL ids, each range checked before it is expanded."""
    out: list[str] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if ".." not in item:
            out.append(item)
        else:
            first, last = item.split("..", 1)
            out.extend(_expand_range(first, last))
        if len(out) > MAX_POOL:
            raise PoolError(f"more than {MAX_POOL} ids")
    if not out:
        raise PoolError("no worker ids")
    if len(set(out)) != len(out):
        raise PoolError("an id is listed twice")
    return out


def _split_number(token: str) -> tuple[str, str]:
    digits = len(token) - len(token.rstrip("0123456789"))
    if digits == 0:
        raise PoolError(f"range end {token!r} does not end in a number")
    return token[:-digits], token[-digits:]


def _expand_range(first: str, last: str) -> list[str]:
    (p1, n1), (p2, n2) = _split_number(first), _split_number(last)
    if p1 != p2 or len(n1) != len(n2):
        raise PoolError(f"range {first}..{last}: both ends need the same prefix and number width")
    lo, hi = int(n1), int(n2)
    if hi < lo:
        raise PoolError(f"range {first}..{last} is empty")
    if hi - lo + 1 > MAX_POOL:
        raise PoolError(f"range {first}..{last} has more than {MAX_POOL} ids")
    return [f"{p1}{i:0{len(n1)}d}" for i in range(lo, hi + 1)]


class HeartbeatSchedule:
    """Sans-I/O: which hosted workers are due to beat by a given time (monotonic seconds).

    Every worker starts at a random phase in [0, interval) and is then rescheduled
    interval x (1 ± jitter) after its previous slot; a worker whose slot passed during a
    stall beats once and is rescheduled from now, never in a catch-up burst."""

    def __init__(self, ids: Iterable[str], interval_s: float, now: float, *, jitter: float = HEARTBEAT_JITTER,
                 rng: random.Random | None = None):
        self.interval_s = interval_s
        self.jitter = jitter
        self.rng = rng or random.Random()
        self._heap = [(now + self.rng.uniform(0.0, interval_s), i, w) for i, w in enumerate(ids)]
        heapq.heapify(self._heap)

    def next_at(self) -> float:
        return self._heap[0][0] if self._heap else float("inf")

    def due(self, now: float) -> list[str]:
        out = []
        while self._heap and self._heap[0][0] <= now:
            slot, i, worker = heapq.heappop(self._heap)
            out.append(worker)
            step = self.interval_s * (1.0 + self.rng.uniform(-self.jitter, self.jitter))
            # Keeps its phase; a slot that would already be due again (it lagged) counts from now.
            heapq.heappush(self._heap, (slot + step if slot + step > now else now + step, i, worker))
        return out


class WorkerPool:
    def __init__(self, job: JobSpec, federation: Federation, identities: Sequence[Identity], nats_url: str, *,
                 state_root: str | os.PathLike[str] | None = None, credentials: NatsCredentials | None = None):
        if job.privacy.secure_aggregation:
            raise PoolError("a worker pool does not run privacy.secure_aggregation jobs: run one worker per process")
        if not identities:
            raise PoolError("no worker ids")
        if len(identities) > MAX_POOL:
            raise PoolError(f"more than {MAX_POOL} ids")
        self.job = job
        self.federation = federation
        self.nats_url = nats_url
        self.credentials = credentials
        self.subjects = Subjects(job.job, prefix=job.transport.prefix)
        task = load_task(job.task)
        torch.manual_seed(job.seed)
        self.shared = SharedTraining(task, task.build_model(job.task_params), keep_sent=1)
        root = Path(state_root) if state_root is not None else Path(".fedbus-state") / job.job
        self.workers: dict[str, WorkerService] = {}
        for identity in identities:
            self.workers[identity.id] = WorkerService(job, federation, identity, nats_url,
                                                      state_dir=root / identity.id, credentials=credentials,
                                                      shared=self.shared)
        spec = spec_of(self.shared.model.state_dict())
        # One verification per control message, for every hosted worker.
        self.verifier = verifier_for(job, federation, max_tensors=2 * len(spec) + 16)
        self._inboxes: dict[str, asyncio.Queue] = {w: asyncio.Queue() for w in self.workers}
        self._control: asyncio.Queue = asyncio.Queue()
        self.keys: KeyWatch | None = None
        self.follower: ControlFollower | None = None
        self.exit_code = 0

    @property
    def reporter(self) -> WorkerService:
        """The hosted worker whose ledger and audit chain carry junk on the control stream:
        it is verified once for all of them, so it is recorded once, not once per worker."""
        return next(iter(self.workers.values()))

    async def run(self) -> int:
        await asyncio.to_thread(self.reporter.warm_up)  # one module: one warm-up

        async def on_reconnected() -> None:
            for part in (self.follower, self.keys):
                if part is not None:
                    part.on_reconnected()

        first = self.reporter.identity.id
        self.nc = await connect(self.nats_url, name=f"fedbus-worker-pool-{first}+{len(self.workers) - 1}",
                                first_connect_timeout=CONNECT_TIMEOUT_S, reconnected_cb=on_reconnected,
                                credentials=self.credentials)
        hub_domain = self.job.transport.hub_domain
        js = self.nc.jetstream(domain=hub_domain) if hub_domain else self.nc.jetstream()
        try:
            await wait_for_stream(js, self.subjects.ctl_stream, JOB_STREAMS_WAIT_S)
            if self.job.topology == "regional":
                for region in sorted({w.region for w in self.workers.values()}):
                    await wait_for_stream(self.nc.jetstream(), self.subjects.region_upd_stream(region),
                                          JOB_STREAMS_WAIT_S)
            else:
                await wait_for_stream(js, self.subjects.upd_stream, JOB_STREAMS_WAIT_S)
            self.keys = KeyWatch(js, self.subjects, self.federation, self.job.security, on_change=self._on_key_change)
            await self.keys.start()
            for wid, worker in list(self.workers.items()):
                problem = own_key_problem(self.federation, worker.identity)
                if problem is not None:  # revoked or rotated away before it started: not hosted
                    stop_line(worker.identity, problem)
                    del self.workers[wid], self._inboxes[wid]
                    self.exit_code = REVOKED_EXIT_CODE
            if not self.workers:
                return REVOKED_EXIT_CODE
            for worker in self.workers.values():
                worker.attach(self.nc, js)
            self.follower = ControlFollower(js, self.subjects.ctl_all, self._control.put,
                                            stream=self.subjects.ctl_stream, skip=frozenset({self.keys.subject}))
            await self.follower.start()
            tasks = [asyncio.create_task(self._heartbeats()), asyncio.create_task(self._fan_out()),
                     asyncio.create_task(self._audit_rejections())]
            for worker in self.workers.values():
                tasks.append(asyncio.create_task(self._serve(worker)))
                tasks.append(asyncio.create_task(worker.audit.run()))
            log.warning("worker_pool.started", workers=len(self.workers), first=first,
                        samples=sum(w.num_samples for w in self.workers.values()), nats=self.nats_url,
                        note="testing and simulation aid: many logical workers in one process")
            await asyncio.gather(*(w.wait_done() for w in self.workers.values()))
            await stop_tasks(tasks)
            await self.follower.stop()
            for worker in self.workers.values():
                report_rejections(worker.rejections.flush(now_ms()), worker.audit)
            await asyncio.gather(*(w.audit.drain() for w in self.workers.values()))
            await self.keys.stop()
        finally:
            with contextlib.suppress(Exception):
                await self.nc.close()
        codes = [w.exit_code for w in self.workers.values()]
        log.info("worker_pool.stopped", workers=len(codes), rounds_trained=sum(w.rounds_trained
                                                                               for w in self.workers.values()))
        return max([self.exit_code, *codes])

    def _on_key_change(self, change: KeyChange) -> None:
        worker = self.workers.get(change.participant)
        if worker is not None:
            worker._on_key_change(change)  # stops that worker only

    async def _heartbeats(self) -> None:
        loop = asyncio.get_running_loop()
        schedule = HeartbeatSchedule(self.workers, self.job.transport.heartbeat_s, loop.time())
        while True:
            for wid in schedule.due(loop.time()):
                worker = self.workers[wid]
                if not worker.stopped:
                    await worker.beat()
            await asyncio.sleep(max(0.0, schedule.next_at() - loop.time()))

    async def _fan_out(self) -> None:
        """Verify each control message once, then hand it to every hosted worker's inbox."""
        while True:
            batch = [await self._control.get()]
            while not self._control.empty() and len(batch) < CONTROL_BATCH:
                batch.append(self._control.get_nowait())
            received: list[Received] = []
            for msg in batch:
                try:
                    received.append(await self.reporter.messenger.receive(self.verifier, msg.data))
                except Rejection as rej:
                    self.reporter._control_rejected(rej, msg.subject)
            if received:
                for inbox in self._inboxes.values():
                    inbox.put_nowait(received)

    async def _serve(self, worker: WorkerService) -> None:
        """One hosted worker's inbox: its core decides on every verified control message."""
        structlog.contextvars.bind_contextvars(worker=worker.identity.id)  # this task's log lines
        inbox = self._inboxes[worker.identity.id]
        while True:
            batch = list(await inbox.get())
            while not inbox.empty() and len(batch) < CONTROL_BATCH:
                batch.extend(inbox.get_nowait())
            if not worker.stopped:
                await worker.handle_verified(batch)

    async def _audit_rejections(self) -> None:
        interval_s = self.job.security.audit_interval_s
        while True:
            await asyncio.sleep(min(interval_s, 1.0))
            now = now_ms()
            for worker in self.workers.values():
                if worker.rejections.due(now):
                    report_rejections(worker.rejections.flush(now), worker.audit)
