"""WorkerService: a data holder's side of the federation, as a thin adapter around WorkerCore.

Heartbeats on core NATS; follows the control stream (``ControlFollower``); every
verified control message becomes a ``ControlVerified`` event for the sans-I/O
``WorkerCore``, whose actions this service runs: training and evaluation in a thread
(``LocalTrainer``, the same code ``fedbus sim`` runs), publishing signed updates and
reports under the run they answer, persisting what it sent (``WorkerStateStore``) so a
reopened round can be answered again. Spans join the round's trace.

A worker pool (``fedbus.worker.pool``, a testing aid) runs many of these in one process:
it ``attach``es each to a shared connection, hands each its verified control messages
(``handle_verified``) and calls ``beat`` on its own schedule; ``SharedTraining`` is what
they share.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import structlog
import torch

from fedbus.allocator import keep_large_buffers_mapped
from fedbus.sizing import model_fits
from fedbus.audit import AuditTrail
from fedbus.audit.queue import AuditQueue, report_rejections
from fedbus.bus import JOB_STREAMS_WAIT_S, NatsCredentials, Subjects, connect, wait_for_stream
from fedbus.bus.follower import ControlFollower  # (re-exported: it lived here)
from fedbus.crypto.envelopes import Rejection, now_ms
from fedbus.crypto.federation import Federation
from fedbus.crypto.keys import Identity
from fedbus.crypto.keyevents import KeyChange
from fedbus.crypto.sealing import unsealed_recipients, update_seal_target
from fedbus.jobspec import JobSpec
from fedbus.keywatch import REVOKED_EXIT_CODE, KeyWatch, own_key_lost
from fedbus.messaging import Messenger, Received, verifier_for
from fedbus.protocol.codec import spec_of
from fedbus.protocol.messages import Heartbeat, RoundClose
from fedbus.rejections import RejectionLedger
from fedbus.tasks import Task, call_train, load_task, training_context, warm_up_torch
from fedbus.telemetry import current_traceparent, get_tracer, trace_context_from_traceparent
from fedbus.telemetry.metrics import count_rejection, metrics
from fedbus.telemetry.stacks import stop_tasks
from fedbus.worker.attacks import Attack
from fedbus.worker.slowdown import Slowdown
from fedbus.worker.core import (
    KEEP_SENT,
    Action,
    ControlVerified,
    Evaluate,
    Exit,
    Ignore,
    PublishEvalReport,
    PublishUpdate,
    Reject,
    Train,
    WorkerCore,
    WorkFailed,
)
from fedbus.protocol.tensor_groups import split_groups
from fedbus.secagg.errors import SecAggAbort, SecAggFailed
from fedbus.secagg.rounds import flat_delta
from fedbus.worker.secure import KEEP_ROUNDS, SimulatedDropout, WorkerSecureRounds
from fedbus.worker.state import WorkerStateStore, default_state_dir
from fedbus.worker.trainer import LocalTrainer

log = structlog.get_logger("fedbus.worker")

CONNECT_TIMEOUT_S = 60.0
# Testing only: a directory where a secure-aggregation worker also saves each round's plaintext
# delta (<id>-r<round>.npy), so an end-to-end test can compare the secure sum with FedAvg.
DEBUG_DUMP_ENV = "FEDBUS_TEST_SECAGG_DUMP"
# Control messages verified together before any is acted on (bounded: each may carry a model).
CONTROL_BATCH = 64


@dataclass
class SharedTraining:
    """What the workers of one process train with: the task, and a module that a worker pool
    shares (None: each worker builds its own). ``slot`` lets one of them train or evaluate
    at a time, since every Train / Evaluate loads the received model into the module."""

    task: Task
    model: torch.nn.Module | None = None
    keep_sent: int = KEEP_SENT
    slot: asyncio.Lock = field(default_factory=asyncio.Lock)


def control_event(got: Received, now: int) -> ControlVerified:
    h = got.header
    return ControlVerified(got.fields, got.tensors, h.run, h.round, h.nonce, h.ts, now, h.trace)


class WorkerService:
    def __init__(self, job: JobSpec, federation: Federation, identity: Identity, nats_url: str,
                 partition: int | None = None, attack: Attack | None = None,
                 state_dir: str | os.PathLike[str] | None = None, slowdown: Slowdown | None = None,
                 credentials: NatsCredentials | None = None, dropout: SimulatedDropout | None = None,
                 shared: SharedTraining | None = None):
        # The key itself is checked once the job's key events are replayed (it may be a rotated one).
        listed = federation.listed_as(identity, "worker", check_key=False)
        keep_large_buffers_mapped()  # freed model buffers go back to the OS (fedbus/allocator.py)
        self.job = job
        self.federation = federation
        self.identity = identity
        self.region = listed.region
        self.nats_url = nats_url
        self.credentials = credentials
        self.subjects = Subjects(job.job, prefix=job.transport.prefix)
        self.partition = federation.partition_of(identity.id) if partition is None else partition
        self.num_partitions = len(federation.workers())
        self.attack = attack
        self.slowdown = slowdown
        self.store = WorkerStateStore(Path(state_dir) if state_dir is not None
                                      else default_state_dir(job.job, identity.id))
        # A worker pool (fedbus.worker.pool) shares one task, one module and one training slot
        # among the workers it hosts; a worker of its own has them to itself.
        self.shared = shared if shared is not None else SharedTraining(load_task(job.task))
        self.trainer = LocalTrainer(self.shared.task, job, worker_id=identity.id, partition=self.partition,
                                    num_partitions=self.num_partitions, attack=attack,
                                    state_loader=self.store.load_strategy, model=self.shared.model)
        self.model_spec = spec_of(self.trainer.model.state_dict())
        self.core = WorkerCore(identity.id, self.partition, self.num_partitions, job.seed, self.model_spec,
                               sent=self.store.load_updates(), deterministic=job.deterministic,
                               skip_closed_rounds=job.mode == "sync", keep_sent=self.shared.keep_sent)
        # A control body carries at most the model's tensors and as many again of strategy extras.
        self.verifier = verifier_for(job, federation, max_tensors=2 * len(self.model_spec) + 16)
        # Refuses to start (SealingUnavailable) when seal_updates is true and a recipient has no key.
        self._unsealed = unsealed_recipients(job.security.seal_updates, federation,
                                             regional=job.topology == "regional")
        self.rejections = RejectionLedger(int(job.security.audit_interval_s * 1000),
                                          lambda sender: federation.get(sender) is not None,
                                          on_count=count_rejection)
        self.tracer = get_tracer("fedbus.worker")
        self.messenger: Messenger | None = None
        self.audit: AuditQueue | None = None
        self.follower: ControlFollower | None = None
        self._inbox: asyncio.Queue = asyncio.Queue()
        self._done = asyncio.Event()
        self.exit_code = 0
        self.keys: KeyWatch | None = None
        # privacy.secure_aggregation: the rounds' SecAgg+ exchanges, on their own inbox so the key
        # phases go on while this worker trains; the base model of each round trained (for Δ).
        self.secure = WorkerSecureRounds(identity.id, job.job) if job.privacy.secure_aggregation else None
        self._secagg_inbox: asyncio.Queue = asyncio.Queue()
        self._bases: OrderedDict = OrderedDict()
        self.dropout = dropout  # testing only (--simulate-dropout): crash, or go quiet, before a message
        self._silenced: set[int] = set()

    @property
    def status(self) -> str:
        return self.core.status

    @property
    def rounds_trained(self) -> int:
        return self.core.rounds_trained

    @property
    def num_samples(self) -> int:
        return self.trainer.num_samples

    @property
    def stopped(self) -> bool:
        """The job is over for this worker, or its key was revoked or rotated away."""
        return self._done.is_set()

    async def wait_done(self) -> None:
        await self._done.wait()

    def warm_up(self) -> None:
        """Run the real train and evaluate paths once on a throwaway copy, so the first
        round does not pay PyTorch's one-time costs (seconds on a busy machine)."""
        warm_up_torch()
        task, data = self.trainer.task, self.trainer.data
        scratch = copy.deepcopy(self.trainer.model)
        ctx = training_context(job_seed=self.job.seed, run=None, worker_id=self.identity.id, partition=self.partition,
                               num_partitions=self.num_partitions, round_=0)
        # Warm-up never trains with DP-SGD: its steps would count against the worker's own ε.
        call_train(task, scratch, data.train, self.job.train.model_copy(update={"dp_sgd_noise_multiplier": 0.0}),
                   context=ctx,
                   global_state=scratch.state_dict() if self.job.train.proximal_mu > 0 else None)
        if len(data.val) > 0:
            task.evaluate(scratch, data.val)

    async def run(self) -> int:
        too_large = model_fits(self.job, self.trainer.model.state_dict())
        if too_large is not None:  # its updates would be refused by every recipient
            log.error("job.refused", reason="model_too_large", detail=too_large)
            return 2
        # Announce ourselves (heartbeats) only once we can train at full speed.
        await asyncio.to_thread(self.warm_up)

        async def on_reconnected() -> None:
            if self.follower is not None:
                self.follower.on_reconnected()
            if self.keys is not None:
                self.keys.on_reconnected()

        self.nc = await connect(self.nats_url, name=f"fedbus-worker-{self.identity.id}",
                                first_connect_timeout=CONNECT_TIMEOUT_S, reconnected_cb=on_reconnected,
                                credentials=self.credentials, participant=self.identity.id)
        # A worker creates nothing: a secured server (`fedbus nats config`) lets it publish its
        # own subjects and read what it needs, not manage streams. It waits, bounded, for the
        # coordinator's control stream and (regional) for its aggregator's update stream of
        # its region. On a regional leaf node the job's streams are the hub's, reached through
        # the hub's JetStream domain; its region's update stream is in the leaf's own.
        hub_domain = self.job.transport.hub_domain
        self.js = self.nc.jetstream(domain=hub_domain) if hub_domain else self.nc.jetstream()
        try:
            await wait_for_stream(self.js, self.subjects.ctl_stream, JOB_STREAMS_WAIT_S)
            if self.job.topology == "regional":
                await wait_for_stream(self.nc.jetstream(), self.subjects.region_upd_stream(self.region),
                                      JOB_STREAMS_WAIT_S)
            else:
                await wait_for_stream(self.js, self.subjects.upd_stream, JOB_STREAMS_WAIT_S)
            # Every past key event is applied before anything is trusted or sent.
            self.keys = KeyWatch(self.js, self.subjects, self.federation, self.job.security,
                                 on_change=self._on_key_change)
            if not await self.keys.start_as(self.identity):
                return REVOKED_EXIT_CODE
            self.attach(self.nc, self.js)
            self.follower = ControlFollower(self.js, self.subjects.ctl_all, self._route_control,
                                            stream=self.subjects.ctl_stream, skip=frozenset({self.keys.subject}))
            await self.follower.start()
            tasks = [asyncio.create_task(self._heartbeat()), asyncio.create_task(self._follow_control()),
                     asyncio.create_task(self.audit.run()), asyncio.create_task(self._audit_rejections()),
                     asyncio.create_task(self._follow_secagg())]
            if self.attack is not None:
                log.warning("attack.simulation_enabled", kind=self.attack.kind, param=self.attack.param)
            if self.slowdown is not None:
                log.warning("slowdown.simulation_enabled", factor=self.slowdown.factor)
            if self._unsealed:
                log.warning("sealing.unavailable", recipients=self._unsealed,
                            note="updates to these recipients travel in the clear: no encryption_key listed")
            log.info("worker.started", worker=self.identity.id, partition=self.partition,
                     samples=self.num_samples, nats=self.nats_url, state_dir=str(self.store.root),
                     stored_updates=len(self.core.sent))
            await self._done.wait()
            await stop_tasks(tasks)
            await self.follower.stop()
            report_rejections(self.rejections.flush(now_ms()), self.audit)
            await self.audit.drain()
            await self.keys.stop()
        finally:
            with contextlib.suppress(Exception):
                await self.nc.close()
        log.info("worker.stopped", worker=self.identity.id, rounds_trained=self.rounds_trained)
        return self.exit_code

    def attach(self, nc, js) -> None:
        """Use this connection to sign and publish as this worker, with its own audit chain."""
        self.nc, self.js = nc, js
        self.messenger = Messenger(nc, js, self.identity, self.subjects,
                                   inline_max_bytes=self.job.transport.inline_max_bytes)
        # Its own audit chain: what it refused (in aggregate), on <prefix>.<job>.audit.<id>.
        self.audit = AuditQueue(AuditTrail(js, self.subjects, self.identity))
        self.audit.submit("worker.started", region=self.region, partition=self.partition)

    def _on_key_change(self, change: KeyChange) -> None:
        """A key event was applied: if it revoked this worker or rotated its key away, stop
        (whatever it sent from now on would be refused)."""
        if own_key_lost(self.federation, self.identity, change):
            self.exit_code = REVOKED_EXIT_CODE
            self._done.set()

    async def _heartbeat(self) -> None:
        while True:
            await self.beat()
            await asyncio.sleep(self.job.transport.heartbeat_s)

    async def beat(self) -> None:
        """One signed heartbeat (core NATS: a lost one is replaced by the next)."""
        body = Heartbeat(region=self.region, num_samples=self.num_samples, partition=self.partition,
                         status=self.status, capabilities={"task": self.job.task})
        try:
            await self.messenger.publish(self.subjects.hb(self.identity.id), body, round=0, persist=False)
        except Exception as exc:  # the bus reconnects on its own; keep beating
            log.warning("heartbeat.failed", error=repr(exc))

    async def _follow_control(self) -> None:
        while True:
            batch = [await self._inbox.get()]
            while not self._inbox.empty() and len(batch) < CONTROL_BATCH:
                batch.append(self._inbox.get_nowait())
            received = []
            for msg in batch:
                try:
                    received.append(await self.messenger.receive(self.verifier, msg.data))
                except Rejection as rej:
                    self._control_rejected(rej, msg.subject)
            await self.handle_verified(received)

    async def handle_verified(self, received: list[Received]) -> None:
        """A batch of verified control messages, in stream order."""
        # Everything that queued while this worker trained is looked at before any of it
        # is acted on: a round already closed is not trained (skip_closed_rounds).
        for got in received:
            if isinstance(got.fields, RoundClose):
                self.core.note_closed(got.header.run, got.header.round)
        for got in received:
            await self.on_control(got)

    async def _route_control(self, msg) -> None:
        secagg = self.secure is not None and f"{self.subjects.ctl('secagg')}." in msg.subject
        await (self._secagg_inbox if secagg else self._inbox).put(msg)

    async def _follow_secagg(self) -> None:
        """The coordinator's secagg.* messages, in stream order, beside (not behind) training."""
        while True:
            msg = await self._secagg_inbox.get()
            try:
                got = await self.messenger.receive(self.verifier, msg.data)
                if self.federation.get(got.header.sender).role != "coordinator":
                    raise Rejection("role_not_allowed", "only the coordinator runs a whole-cohort round", got.header)
            except Rejection as rej:
                self._control_rejected(rej, msg.subject)
                continue
            h = got.header
            try:
                sends, rejections = self.secure.on_message(h.run, h.round, got.fields)
                for bad in rejections:
                    self.rejections.record("secagg", bad.worker, bad.reason, bad.detail, now_ms())
                    log.warning("secagg.rejected", reason=bad.reason, dealer=(bad.worker or "")[:64], round=h.round)
                await self._send_secagg(h.run, h.round, sends)
            except (SecAggAbort, SecAggFailed) as exc:
                event = "secagg.round_failed" if isinstance(exc, SecAggFailed) else "secagg.aborted"
                log.error(event, round=h.round, reason=exc.reason, detail=exc.detail[:200])
            except Exception as exc:  # one bad round never takes the worker down
                log.exception("secagg.failed_step", round=h.round, error=repr(exc))

    async def _send_secagg(self, run: str | None, round_: int, sends) -> None:
        for send in sends:
            d = self.dropout
            if d is not None and (d.phase, d.round) == (send.phase, round_):
                log.warning("secagg.simulated_dropout", phase=send.phase, round=round_, silent=d.silent)
                if not d.silent:
                    os._exit(17)  # a crash: nothing flushed, nothing said goodbye
                self._silenced.add(round_)
            if round_ in self._silenced:
                continue
            await self.messenger.publish(self.subjects.upd(self.region, self.identity.id), send.body, send.tensors,
                                         round=round_, run=run)
            log.info(f"secagg.sent_{send.phase}", round=round_)

    async def _mask_update(self, action: PublishUpdate) -> None:
        """Secure aggregation: the update's delta goes only as a masked input, never in plaintext."""
        base = self._bases.pop((action.run, action.round), None)
        if action.resend or base is None:
            log.warning("secagg.no_resend", round=action.round, run=action.run,
                        note="a masked input belongs to its round's exchange and is not sent again")
            return
        state, _ = split_groups(action.tensors)
        delta = flat_delta(state, base)
        dump = os.environ.get(DEBUG_DUMP_ENV)
        if dump:  # testing only: the plaintext delta, so a test can check the secure sum against it
            np.save(Path(dump) / f"{self.identity.id}-r{action.round}.npy", delta)
        await self._send_secagg(action.run, action.round, self.secure.provide(action.run, action.round, delta))
        log.info("secagg.delta_ready", round=action.round, run=action.run, values=delta.size)

    def _control_rejected(self, rej: Rejection, subject: str) -> None:
        """Junk on the control stream costs one log line and one audit record per sender and
        reason per interval, not one per message (anyone who may publish there could flood
        every worker's log and audit chain)."""
        sender = rej.header.sender if rej.header else None
        if self.rejections.record("control", sender, rej.reason, rej.detail, now_ms()) \
                and rej.reason != "replayed_nonce":
            log.warning("control.rejected", reason=rej.reason, detail=rej.detail[:200], subject=subject[:200],
                        note="further ones this interval are aggregated")

    async def _audit_rejections(self) -> None:
        interval_s = self.job.security.audit_interval_s
        while True:
            await asyncio.sleep(min(interval_s, 1.0))
            if self.rejections.due(now_ms()):
                report_rejections(self.rejections.flush(now_ms()), self.audit)

    async def on_control(self, got: Received) -> None:
        """One verified control message: the core decides, this runs what it decided."""
        parent = trace_context_from_traceparent(got.header.trace)
        attrs = {"fedbus.round": got.header.round, "fedbus.worker": self.identity.id}
        try:
            with self.tracer.start_as_current_span("worker.fetch", context=parent, attributes=attrs) \
                    if got.header.type == "round.open" else contextlib.nullcontext():
                actions = self.core.handle(control_event(got, now_ms()))
            await self._run_actions(actions, parent, attrs)
        except Exception as exc:  # never let one bad round take the worker down
            log.exception("control.failed", type=got.header.type, error=repr(exc))

    async def _run_actions(self, actions: list[Action], parent, attrs) -> None:
        pending = list(actions)
        while pending:
            action = pending.pop(0)
            match action:
                case Train():
                    if self.secure is not None:
                        self._bases[(action.run, action.round)] = action.model
                        while len(self._bases) > KEEP_ROUNDS:
                            self._bases.popitem(last=False)
                    with self.tracer.start_as_current_span("worker.train", context=parent, attributes=attrs) as span:
                        try:
                            done, trained_s = await self._in_slot(self.trainer.run_train, action)
                            metrics().trained(trained_s)  # the training itself, not a simulated stretch
                            await self._stretch(trained_s, action.round)
                        except Exception:
                            pending += self.core.handle(WorkFailed("train", action.run, action.round))
                            raise
                        span.set_attribute("fedbus.num_steps", done.fields.num_steps)
                    pending += self.core.handle(done)
                case Evaluate():
                    with self.tracer.start_as_current_span("worker.evaluate", context=parent, attributes=attrs):
                        try:
                            done, _ = await self._in_slot(self.trainer.run_evaluate, action)
                        except Exception:
                            pending += self.core.handle(WorkFailed("evaluate", action.run, action.round))
                            raise
                    pending += self.core.handle(done)
                case PublishUpdate():
                    await self._publish_update(action, parent, attrs)
                case PublishEvalReport():
                    await self.messenger.publish(self.subjects.metrics(self.identity.id), action.fields,
                                                 round=action.round, run=action.run, trace=current_traceparent())
                    metrics().local_metrics("eval", action.fields.metrics)
                    log.info("eval.sent", round=action.round, run=action.run,
                             accuracy=round(float(action.fields.metrics.get("accuracy", float("nan"))), 4))
                case Exit():
                    log.info("job.done", reason=action.reason, rounds=action.rounds_completed)
                    self._done.set()
                case Reject():
                    log.warning("control.rejected", reason=action.reason, type=action.type, round=action.round,
                                run=action.run, detail=action.detail)
                case Ignore():
                    if action.reason == "deadline_passed":
                        log.info("round.missed", round=action.round, run=action.run, reason=action.reason)
                    else:
                        log.debug("control.ignored", reason=action.reason, type=action.type, round=action.round,
                                  run=action.run)

    async def _in_slot(self, work, action):
        """Training and evaluation run in a thread, one at a time per shared module; returns
        the result and the seconds it took (without the wait for the slot)."""
        async with self.shared.slot:
            started = time.perf_counter()
            return await asyncio.to_thread(work, action), time.perf_counter() - started

    async def _stretch(self, trained_s: float, round_: int) -> None:
        """Testing only (--simulate-slowdown): make this round's training last factor x as long.

        An asyncio sleep, not a sleep in the training thread: heartbeats go on, so the
        coordinator sees a live but slow worker, which is what a straggler is."""
        if self.slowdown is None:
            return
        extra = self.slowdown.extra_seconds(trained_s)
        log.info("slowdown.wait", round=round_, trained_s=round(trained_s, 4), extra_s=round(extra, 4))
        await asyncio.sleep(extra)

    async def _publish_update(self, action: PublishUpdate, parent, attrs) -> None:
        if self.secure is not None:
            return await self._mask_update(action)
        f = action.fields
        with self.tracer.start_as_current_span("worker.upload", context=parent, attributes=attrs):
            # Looked up per update, so a key the federation gains or changes while running is used.
            seal_to = update_seal_target(self.job.security.seal_updates, self.federation, self.identity.id,
                                         regional=self.job.topology == "regional")
            await self.messenger.publish(self.subjects.upd(self.region, self.identity.id), action.fields,
                                         action.tensors, round=action.round, run=action.run,
                                         trace=current_traceparent(), seal_to=seal_to)
            # Logged inside the span: the line carries the round's trace id.
            log.info("update.resent" if action.resend else "update.sent", round=action.round, run=action.run,
                     samples=f.num_samples, steps=f.num_steps,
                     loss=round(float(f.train_metrics.get("loss", float("nan"))), 4))
        if not action.resend:
            metrics().local_metrics("train", f.train_metrics)
            metrics().local_metrics("eval", f.eval_metrics)
            # Persisted after the publish, off the round's critical path (an fsync costs ~8 ms).
            # See fedbus.worker.state for what a crash between the steps leaves.
            state = self.trainer.pipeline.state_dict()
            await asyncio.to_thread(self._persist, action, state)

    def _persist(self, action: PublishUpdate, strategy_state: dict) -> None:
        try:
            if strategy_state:
                self.store.save_strategy(action.run, strategy_state)
            self.store.save_update(action.run, action.round, action.fields, action.tensors)
        except OSError as exc:  # a full disk costs the ability to resend, not the round
            log.warning("state.write_failed", error=repr(exc), state_dir=str(self.store.root))
