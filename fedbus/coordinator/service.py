"""CoordinatorService: wires the RoundStateMachine to NATS JetStream.

It translates only: heartbeats and verified updates become events; actions become
signed publishes, spans, audit records and the run summary. All round logic lives in
``coordinator.rounds``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import structlog
import torch
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from opentelemetry import trace as otel_trace

from fedbus.aggregation.base import ClientUpdate
from fedbus.audit import AuditTrail
from fedbus.bus import Subjects, connect, ensure_job_infrastructure
from fedbus.coordinator.rounds import (
    CloseRound,
    EvalReceived,
    FinishJob,
    MessageRejected,
    OpenEval,
    OpenRound,
    Phase,
    RejectUpdate,
    Start,
    Tick,
    UpdateReceived,
    WorkerSeen,
)
from fedbus.coordinator.factory import machine_for
from fedbus.coordinator.jobstate import JobStateError, JobStateStore
from fedbus.coordinator.summary import RunSummary
from fedbus.crypto.envelopes import Rejection, now_ms
from fedbus.crypto.federation import Federation
from fedbus.crypto.keys import Identity
from fedbus.messaging import Messenger, verifier_for
from fedbus.jobspec import JobSpec
from fedbus.protocol.tensor_groups import join_groups, split_groups
from fedbus.protocol.messages import EvalOpen, EvalReport, Heartbeat, JobDone, RoundClose, RoundOpen, Update
from fedbus.tasks import load_task
from fedbus.telemetry import get_tracer, inject_trace_headers

log = structlog.get_logger("fedbus.coordinator")

TICK_S = 0.05
# Short, so a crashed coordinator's unacknowledged updates come back quickly; the service
# extends it with in_progress() for updates it holds until their round commits.
ACK_WAIT_S = 10.0
CONNECT_TIMEOUT_S = 60.0
NAK_DELAY_S = 0.5  # redelivery delay for an update whose round is about to reopen


class CoordinatorService:
    def __init__(self, job: JobSpec, federation: Federation, identity: Identity, nats_url: str, run_dir: Path,
                 *, resume: bool = False):
        federation.listed_as(identity, "coordinator")
        self.job = job
        self.federation = federation
        self.identity = identity
        self.nats_url = nats_url
        self.run_dir = Path(run_dir)
        self.subjects = Subjects(job.job, prefix=job.transport.prefix)
        self.task = load_task(job.task)
        torch.manual_seed(job.seed)
        self.model = self.task.build_model(job.task_params)
        self.test_data = self.task.server_test_data(job.task_params, job.seed) if job.evaluation.server_test else None
        if self.test_data is not None:
            self.task.evaluate(self.model, self.test_data)  # pay torch's one-time costs before round 1
        initial = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.machine = machine_for(job, initial, num_workers_total=len(federation.workers()))
        self.verifier = verifier_for(job, federation)
        self.summary = RunSummary(job=job.job, task=job.task, rounds_planned=job.rounds)
        self.tracer = get_tracer("fedbus.coordinator")
        self._round_spans: dict[int, otel_trace.Span] = {}
        self.resume = resume
        # Accepted updates are acknowledged only once their round is committed: a crash
        # before that leaves them in the stream for the next coordinator (see jobstate).
        self._unacked: dict[int, list] = {}
        self._actions: asyncio.Queue = asyncio.Queue()
        self._done = asyncio.Event()

    # ---- lifecycle ---------------------------------------------------------------------

    async def run(self) -> RunSummary:
        started = time.perf_counter()
        self.nc = await connect(self.nats_url, name=f"fedbus-coordinator-{self.identity.id}",
                                first_connect_timeout=CONNECT_TIMEOUT_S)
        self.js = self.nc.jetstream()
        try:
            await ensure_job_infrastructure(self.js, self.subjects, replicas=self.job.transport.replicas)
            self.jobstate = JobStateStore(self.nc, self.js, self.job.job, self.identity)
            if self.resume:
                await self._restore()
            else:
                await self._fresh_start()
                await self.jobstate.reset()
            self.messenger = Messenger(self.nc, self.js, self.identity, self.subjects,
                                       inline_max_bytes=self.job.transport.inline_max_bytes)
            self.audit = AuditTrail(self.js, self.subjects.audit, self.identity.id)
            await self.audit.publish("job.started", job=self.job.job, rounds=self.job.rounds)
            hb_sub = await self.nc.subscribe(self.subjects.hb_all, cb=self._on_heartbeat)
            tasks = [asyncio.create_task(self._consume(self.subjects.upd_all, self.subjects.upd_stream,
                                                      "coordinator-updates", self._on_update)),
                     asyncio.create_task(self._consume(self.subjects.metrics_all, self.subjects.metrics_stream,
                                                      "coordinator-metrics", self._on_eval_report)),
                     asyncio.create_task(self._tick()),
                     asyncio.create_task(self._keep_unacked_alive()),
                     asyncio.create_task(self._act())]
            log.info("coordinator.started", job=self.job.job, nats=self.nats_url, rounds=self.job.rounds,
                     min_workers=self.job.cohort.min_workers, strategy=self.machine.rule.describe(),
                     server_optimizer=self.machine.optimizer.name if self.machine.optimizer else "none")
            self._emit(self.machine.handle(Start(now_ms())))
            await self._done.wait()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await hb_sub.unsubscribe()
        finally:
            self.summary.wall_seconds = time.perf_counter() - started
            self.summary.write(self.run_dir / "summary.json")
            # Every publish was acknowledged already; drain() would wait on the pull consumers.
            with contextlib.suppress(Exception):
                await self.nc.close()
        return self.summary

    async def _restore(self) -> None:
        committed = await self.jobstate.load()
        if committed is None:
            raise JobStateError(f"nothing committed for job {self.job.job!r}: start without --resume")
        self.machine.restore(round_=committed.round, model_version=committed.model_version,
                             rounds_completed=committed.rounds_completed, state=committed.model,
                             failed_in_a_row=committed.failed_in_a_row)
        self.summary.resumed_from_round = committed.round
        log.info("coordinator.resumed", round=committed.round, model_version=committed.model_version,
                 rounds_completed=committed.rounds_completed, phase=committed.phase)

    async def _fresh_start(self) -> None:
        """A new coordinator run of a job starts from scratch: old control events and
        updates of the same job id must not leak into it."""
        for stream in (self.subjects.ctl_stream, self.subjects.upd_stream, self.subjects.metrics_stream):
            with contextlib.suppress(Exception):
                await self.js.purge_stream(stream)
        for stream, durable in ((self.subjects.upd_stream, "coordinator-updates"),
                                (self.subjects.metrics_stream, "coordinator-metrics")):
            with contextlib.suppress(Exception):
                await self.js.delete_consumer(stream, durable)

    # ---- inputs ------------------------------------------------------------------------

    def _emit(self, actions) -> None:
        for action in actions:
            self._actions.put_nowait(action)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            self._emit(self.machine.handle(Tick(now_ms())))

    def _rejected(self, rej: Rejection, kind: str, subject: str) -> None:
        header = rej.header
        self._emit(self.machine.handle(MessageRejected(rej.reason)))
        self.summary.count_rejection(rej.reason)
        log.warning(f"{kind}.rejected", reason=rej.reason, detail=rej.detail, subject=subject,
                    sender=header.sender if header else None, round=header.round if header else None)
        self._actions.put_nowait(("audit", f"{kind}.rejected", {
            "reason": rej.reason, "detail": rej.detail[:200], "subject": subject,
            "sender": header.sender if header else None, "round": header.round if header else None,
            "nonce": header.nonce.hex() if header else None}))

    async def _on_heartbeat(self, msg) -> None:
        token = msg.subject.rsplit(".", 1)[-1]
        try:
            got = await self.messenger.receive(self.verifier, msg.data, sender_token=token)
        except Rejection as rej:
            self._rejected(rej, "heartbeat", msg.subject)
            return
        hb: Heartbeat = got.fields  # type: ignore[assignment]
        self._emit(self.machine.handle(WorkerSeen(got.header.sender, hb.num_samples, now_ms())))

    async def _consume(self, subject: str, stream: str, durable: str, handler) -> None:
        config = ConsumerConfig(durable_name=durable, deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.EXPLICIT,
                                ack_wait=ACK_WAIT_S, max_ack_pending=10_000)
        psub = await self.js.pull_subscribe(subject, durable=durable, stream=stream, config=config)
        while True:
            try:
                # batch=1: with nats-py 2.16 a larger batch after a timed-out fetch can
                # stall until its timeout (a late timeout reply in the shared inbox),
                # which would land directly on round latency; batch=1 never stalled.
                msgs = await psub.fetch(batch=1, timeout=1.0)
            except (TimeoutError, asyncio.TimeoutError):
                continue
            except Exception as exc:  # connection hiccups: keep consuming
                if self.nc.is_closed:
                    return
                log.warning("consumer.fetch_failed", durable=durable, error=repr(exc))
                await asyncio.sleep(0.2)
                continue
            for msg in msgs:
                deferred = False
                try:
                    deferred = bool(await handler(msg))
                except Exception as exc:  # a bug in one message's handling must not stop the service
                    log.exception("message.handler_failed", subject=msg.subject, error=repr(exc))
                if not deferred:
                    with contextlib.suppress(Exception):
                        await msg.ack()

    async def _keep_unacked_alive(self) -> None:
        """Updates wait unacknowledged until their round commits; tell the server we
        are still working on them so it does not redeliver them meanwhile."""
        while True:
            await asyncio.sleep(ACK_WAIT_S / 3)
            for msgs in list(self._unacked.values()):
                for msg in msgs:
                    with contextlib.suppress(Exception):
                        await msg.in_progress()

    async def _ack_through(self, round_: int) -> None:
        for r in sorted(k for k in self._unacked if k <= round_):
            for msg in self._unacked.pop(r):
                with contextlib.suppress(Exception):
                    await msg.ack()

    async def _on_update(self, msg) -> bool:
        parts = msg.subject.split(".")
        token = parts[-1]
        try:
            if self.machine.phase in (Phase.CREATED, Phase.WAITING_FOR_WORKERS):
                # open() checks sender, signature and freshness without remembering the nonce,
                # so a deferred update is accepted in full when it comes back.
                peek = self.verifier.open(msg.data, sender_token=token)
                if self.machine.awaits_round(peek.header.type, peek.header.round):
                    with contextlib.suppress(Exception):
                        await msg.nak(delay=NAK_DELAY_S)
                    return True
            got = await self.messenger.receive(
                self.verifier, msg.data, sender_token=token,
                round_ok=lambda h: self.machine.accepts_round(h.type, h.round))
            if got.header.type != Update.TYPE:
                raise Rejection("unknown_type", f"{got.header.type} on an update subject", got.header)
            sender = self.federation.get(got.header.sender)
            if sender is not None and sender.region != parts[-2]:
                raise Rejection("subject_mismatch", f"region {parts[-2]} is not {sender.region}", got.header)
        except Rejection as rej:
            self._rejected(rej, "update", msg.subject)
            return False
        upd: Update = got.fields  # type: ignore[assignment]
        state, groups = split_groups(got.tensors or {})
        event = UpdateReceived(
            worker_id=got.header.sender, round=upd.round, now_ms=now_ms(),
            update=ClientUpdate(got.header.sender, upd.num_samples, state, upd.num_steps,
                                extra={**upd.extra_scalars, **groups}),
            train_metrics=upd.train_metrics, eval_metrics=upd.eval_metrics, eval_samples=upd.eval_samples)
        actions = self.machine.handle(event)
        accepted = not any(isinstance(a, RejectUpdate) and a.worker_id == event.worker_id for a in actions)
        if accepted:
            self.summary.updates_accepted += 1
            self._unacked.setdefault(upd.round, []).append(msg)  # acked when the round commits
            log.debug("update.accepted", worker=event.worker_id, round=upd.round, samples=upd.num_samples)
        self._emit(actions)
        return accepted

    async def _on_eval_report(self, msg) -> None:
        try:
            got = await self.messenger.receive(self.verifier, msg.data, sender_token=msg.subject.rsplit(".", 1)[-1],
                                               round_ok=lambda h: self.machine.accepts_round(h.type, h.round))
            if got.header.type != EvalReport.TYPE:
                raise Rejection("unknown_type", f"{got.header.type} on a metrics subject", got.header)
        except Rejection as rej:
            self._rejected(rej, "metrics", msg.subject)
            return
        rep: EvalReport = got.fields  # type: ignore[assignment]
        self._emit(self.machine.handle(EvalReceived(got.header.sender, rep.round, rep.num_samples, rep.metrics, now_ms())))

    # ---- outputs -----------------------------------------------------------------------

    async def _act(self) -> None:
        while True:
            action = await self._actions.get()
            try:
                await self._perform(action)
            except Exception as exc:
                log.exception("action.failed", action=type(action).__name__, error=repr(exc))
                if isinstance(action, (CloseRound, FinishJob)):
                    # A round we cannot commit (e.g. another coordinator advanced the job's
                    # KV record) must not be announced or built on: stop, and say why.
                    self.summary.reason = f"stopped: {type(action).__name__} failed ({type(exc).__name__})"
                    self._done.set()

    async def _perform(self, action) -> None:
        match action:
            case ("audit", event, fields):
                await self.audit.publish(event, **fields)
            case OpenRound():
                await self._open_round(action)
            case CloseRound():
                await self._close_round(action)
            case RejectUpdate():
                self.summary.count_rejection(action.reason)
                log.warning("update.rejected", reason=action.reason, detail=action.detail,
                            sender=action.worker_id, round=action.round)
                await self.audit.publish("update.rejected", reason=action.reason, sender=action.worker_id,
                                         round=action.round, detail=action.detail[:200])
            case OpenEval():
                await self._open_eval(action)
            case FinishJob():
                await self._finish(action)

    async def _open_round(self, a: OpenRound) -> None:
        span = self.tracer.start_span("round", attributes={
            "fedbus.job": self.job.job, "fedbus.round": a.round, "fedbus.model_version": a.model_version,
            "fedbus.cohort_size": len(a.cohort)})
        self._round_spans[a.round] = span
        traceparent = inject_trace_headers(otel_trace.set_span_in_context(span)).get("traceparent")
        body = RoundOpen(round=a.round, model_version=a.model_version, cohort=list(a.cohort),
                         deadline_ms=a.deadline_ms, train=self.job.train.model_dump(),
                         evaluate=self.job.evaluation.federated)
        await self.messenger.publish(self.subjects.ctl("round.open"), body, join_groups(a.state, a.broadcast),
                                     round=a.round, trace=traceparent)
        log.info("round.opened", round=a.round, model_version=a.model_version, cohort=len(a.cohort))

    def _evaluate(self, state) -> dict[str, float]:
        if self.test_data is None:
            return {}
        self.model.load_state_dict(state)
        result = self.task.evaluate(self.model, self.test_data)
        return {"test_loss": float(result.loss), "test_accuracy": float(result.accuracy)}

    async def _close_round(self, a: CloseRound) -> None:
        span = self._round_spans.pop(a.round, None)
        ctx = otel_trace.set_span_in_context(span) if span else None
        metrics = dict(a.metrics)
        if a.status == "aggregated":
            with self.tracer.start_as_current_span("coordinator.evaluate", context=ctx):
                metrics.update(self._evaluate(a.state))
        # Commit first, announce second: whoever hears round.close can rely on it surviving us.
        await self.jobstate.commit(round_=a.round, model_version=a.model_version,
                                   rounds_completed=self.machine.rounds_completed,
                                   failed_in_a_row=self.machine.failed_in_a_row, phase="running",
                                   model=a.state, now_ms=now_ms())
        await self._ack_through(a.round)
        body = RoundClose(round=a.round, model_version=a.model_version, status=a.status, accepted=list(a.accepted),
                          rejected=a.rejected, seconds=a.seconds, metrics=metrics)
        await self.messenger.publish(self.subjects.ctl("round.close"), body, round=a.round)
        self.summary.add_round(a.round, a.model_version, a.status, a.seconds, len(a.accepted), a.rejected, metrics)
        await self.audit.publish("round.closed", round=a.round, status=a.status, model_version=a.model_version,
                                 accepted=list(a.accepted))
        log.info("round.closed", round=a.round, status=a.status, seconds=round(a.seconds, 4),
                 accepted=len(a.accepted), **{k: round(v, 4) for k, v in metrics.items()})
        if span:
            span.set_attribute("fedbus.status", a.status)
            span.set_attribute("fedbus.accepted", len(a.accepted))
            for k, v in metrics.items():
                span.set_attribute(f"fedbus.{k}", v)
            span.end()

    async def _open_eval(self, a: OpenEval) -> None:
        span = self.tracer.start_span("final_evaluation", attributes={
            "fedbus.job": self.job.job, "fedbus.round": a.round, "fedbus.model_version": a.model_version})
        self._round_spans[a.round] = span
        traceparent = inject_trace_headers(otel_trace.set_span_in_context(span)).get("traceparent")
        body = EvalOpen(round=a.round, model_version=a.model_version, cohort=list(a.cohort), deadline_ms=a.deadline_ms)
        await self.messenger.publish(self.subjects.ctl("eval.open"), body, a.state, round=a.round, trace=traceparent)
        log.info("eval.opened", round=a.round, model_version=a.model_version, cohort=len(a.cohort))

    async def _finish(self, a: FinishJob) -> None:
        for span in self._round_spans.values():
            span.end()
        self._round_spans.clear()
        final = self._evaluate(self.machine.state)
        metrics = {**final, **a.metrics}
        self.summary.finish(a.reason, a.rounds_completed, a.model_version, metrics)
        await self.jobstate.commit(round_=self.machine.round, model_version=a.model_version,
                                   rounds_completed=a.rounds_completed, failed_in_a_row=self.machine.failed_in_a_row,
                                   phase="done", model=self.machine.state, now_ms=now_ms())
        await self.messenger.publish(self.subjects.ctl("job.done"), JobDone(
            rounds_completed=a.rounds_completed, model_version=a.model_version, metrics=metrics, reason=a.reason),
            round=self.machine.round)
        await self.audit.publish("job.done", reason=a.reason, rounds_completed=a.rounds_completed)
        torch.save(self.machine.state, self.run_dir / "final_model.pt")
        log.info("job.done", reason=a.reason, rounds=a.rounds_completed, **{k: round(v, 4) for k, v in metrics.items()})
        self._done.set()
