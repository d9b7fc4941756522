"""WorkerService: a data holder's side of the federation.

Heartbeats on core NATS; follows the control stream (an ordered consumer starting at the
last message of each control subject, so a late or restarted worker catches up);
for each round it is selected for: verifies the model, evaluates it on its held-out
split, trains locally and publishes a signed update. Spans join the round's trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy

import structlog
from nats.js.api import DeliverPolicy

from fedbus.bus import Subjects, connect, ensure_job_infrastructure
from fedbus.crypto.envelopes import Rejection, check_tensors, now_ms
from fedbus.crypto.federation import Federation
from fedbus.crypto.keys import Identity
from fedbus.messaging import Messenger, Received, verifier_for
from fedbus.protocol.codec import spec_of
from fedbus.jobspec import JobSpec
from fedbus.protocol.messages import EvalOpen, EvalReport, Heartbeat, JobDone, RoundOpen, Update
from fedbus.protocol.tensor_groups import join_groups, split_groups
from fedbus.tasks import load_task, warm_up_torch
from fedbus.worker.attacks import Attack
from fedbus.worker.trainer import LocalTrainer
from fedbus.telemetry import current_traceparent, get_tracer, trace_context_from_traceparent

log = structlog.get_logger("fedbus.worker")

CONNECT_TIMEOUT_S = 60.0


class WorkerService:
    def __init__(self, job: JobSpec, federation: Federation, identity: Identity, nats_url: str,
                 partition: int | None = None, attack: Attack | None = None):
        listed = federation.listed_as(identity, "worker")
        self.job = job
        self.federation = federation
        self.identity = identity
        self.region = listed.region
        self.nats_url = nats_url
        self.subjects = Subjects(job.job, prefix=job.transport.prefix)
        self.partition = federation.partition_of(identity.id) if partition is None else partition
        self.num_partitions = len(federation.workers())
        self.attack = attack
        self.trainer = LocalTrainer(load_task(job.task), job, partition=self.partition,
                                    num_partitions=self.num_partitions, attack=attack)
        self.model_spec = spec_of(self.trainer.model.state_dict())
        self.verifier = verifier_for(job, federation)
        self.tracer = get_tracer("fedbus.worker")
        self.status = "idle"
        self.rounds_done: set[int] = set()
        self.rounds_trained = 0
        self._inbox: asyncio.Queue = asyncio.Queue()
        self._done = asyncio.Event()

    @property
    def num_samples(self) -> int:
        return self.trainer.num_samples

    def warm_up(self) -> None:
        """Run the real train and evaluate paths once on a throwaway copy, so the first
        round does not pay PyTorch's one-time costs (seconds on a busy machine)."""
        warm_up_torch()
        task, data = self.trainer.task, self.trainer.data
        scratch = copy.deepcopy(self.trainer.model)
        task.train(scratch, data.train, self.job.train, seed=0,
                   global_state=scratch.state_dict() if self.job.train.proximal_mu > 0 else None)
        if len(data.val) > 0:
            task.evaluate(scratch, data.val)

    async def run(self) -> int:
        # Announce ourselves (heartbeats) only once we can train at full speed.
        await asyncio.to_thread(self.warm_up)
        self.nc = await connect(self.nats_url, name=f"fedbus-worker-{self.identity.id}",
                                first_connect_timeout=CONNECT_TIMEOUT_S)
        self.js = self.nc.jetstream()
        try:
            await ensure_job_infrastructure(self.js, self.subjects, replicas=self.job.transport.replicas)
            self.messenger = Messenger(self.nc, self.js, self.identity, self.subjects,
                                       inline_max_bytes=self.job.transport.inline_max_bytes)
            sub = await self.js.subscribe(self.subjects.ctl_all, ordered_consumer=True,
                                          deliver_policy=DeliverPolicy.LAST_PER_SUBJECT, cb=self._inbox.put)
            tasks = [asyncio.create_task(self._heartbeat()), asyncio.create_task(self._follow_control())]
            if self.attack is not None:
                log.warning("attack.simulation_enabled", kind=self.attack.kind, param=self.attack.param)
            log.info("worker.started", worker=self.identity.id, partition=self.partition,
                     samples=self.num_samples, nats=self.nats_url)
            await self._done.wait()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        finally:
            with contextlib.suppress(Exception):
                await self.nc.close()
        log.info("worker.stopped", worker=self.identity.id, rounds_trained=self.rounds_trained)
        return 0

    async def _heartbeat(self) -> None:
        subject = self.subjects.hb(self.identity.id)
        while True:
            body = Heartbeat(region=self.region, num_samples=self.num_samples, partition=self.partition,
                             status=self.status, capabilities={"task": self.job.task})
            try:
                await self.messenger.publish(subject, body, round=0, persist=False)
            except Exception as exc:  # the bus reconnects on its own; keep beating
                log.warning("heartbeat.failed", error=repr(exc))
            await asyncio.sleep(self.job.transport.heartbeat_s)

    async def _follow_control(self) -> None:
        while True:
            msg = await self._inbox.get()
            try:
                got = await self.messenger.receive(self.verifier, msg.data)
            except Rejection as rej:
                level = log.debug if rej.reason == "replayed_nonce" else log.warning
                level("control.rejected", reason=rej.reason, detail=rej.detail, subject=msg.subject)
                continue
            try:
                await self._on_control(got)
            except Exception as exc:  # never let one bad round take the worker down
                log.exception("control.failed", type=got.header.type, error=repr(exc))
                self.status = "idle"

    async def _on_control(self, got: Received) -> None:
        fields = got.fields
        if isinstance(fields, JobDone):
            log.info("job.done", reason=fields.reason, rounds=fields.rounds_completed)
            self.status = "done"
            self._done.set()
        elif isinstance(fields, RoundOpen):
            if self.identity.id in fields.cohort and fields.round not in self.rounds_done:
                await self._train_round(got, fields)
        elif isinstance(fields, EvalOpen):
            if self.identity.id in fields.cohort and fields.round not in self.rounds_done:
                await self._evaluate_round(got, fields)

    def _load_global(self, got: Received) -> dict[str, dict]:
        """Check the model against ours and load it; returns the strategy's extra groups."""
        model, groups = split_groups(got.tensors or {})
        check_tensors(model, self.model_spec, got.header)
        self.trainer.load(model)
        return groups

    async def _train_round(self, got: Received, ro: RoundOpen) -> None:
        self.rounds_done.add(ro.round)
        if now_ms() > ro.deadline_ms:
            log.info("round.missed", round=ro.round, reason="deadline_passed")
            return
        parent = trace_context_from_traceparent(got.header.trace)
        attrs = {"fedbus.round": ro.round, "fedbus.worker": self.identity.id}
        self.status = "training"
        with self.tracer.start_as_current_span("worker.fetch", context=parent, attributes=attrs):
            groups = self._load_global(got)
            global_state = {k: v.detach().clone() for k, v in self.trainer.model.state_dict().items()}
        eval_metrics, eval_samples = {}, 0
        if ro.evaluate and len(self.trainer.data.val) > 0:
            with self.tracer.start_as_current_span("worker.evaluate", context=parent, attributes=attrs):
                ev = self.trainer.evaluate()
                eval_metrics, eval_samples = {"loss": float(ev.loss), "accuracy": float(ev.accuracy)}, ev.num_samples
        settings = self.trainer.settings_for(ro.train)
        with self.tracer.start_as_current_span("worker.train", context=parent, attributes=attrs) as span:
            result = await asyncio.to_thread(self.trainer.train, ro.round, global_state, groups, settings)
            span.set_attribute("fedbus.num_steps", result.num_steps)
        with self.tracer.start_as_current_span("worker.upload", context=parent, attributes=attrs):
            body = Update(round=ro.round, base_version=ro.model_version, num_samples=result.num_samples,
                          num_steps=result.num_steps, train_metrics=result.train_metrics,
                          eval_metrics=eval_metrics, eval_samples=eval_samples, extra_scalars=result.extra_scalars)
            await self.messenger.publish(self.subjects.upd(self.region, self.identity.id), body,
                                         join_groups(result.state, result.extra_groups), round=ro.round,
                                         trace=current_traceparent())
        self.rounds_trained += 1
        self.status = "idle"
        log.info("update.sent", round=ro.round, samples=result.num_samples, steps=result.num_steps,
                 loss=round(float(result.train_metrics.get("loss", float("nan"))), 4))

    async def _evaluate_round(self, got: Received, eo: EvalOpen) -> None:
        self.rounds_done.add(eo.round)
        parent = trace_context_from_traceparent(got.header.trace)
        with self.tracer.start_as_current_span("worker.evaluate", context=parent,
                                               attributes={"fedbus.round": eo.round, "fedbus.worker": self.identity.id}):
            self._load_global(got)
            ev = self.trainer.evaluate()
        body = EvalReport(round=eo.round, model_version=eo.model_version, num_samples=ev.num_samples,
                          metrics={"loss": float(ev.loss), "accuracy": float(ev.accuracy)})
        await self.messenger.publish(self.subjects.metrics(self.identity.id), body, round=eo.round,
                                     trace=current_traceparent())
        log.info("eval.sent", round=eo.round, accuracy=round(float(ev.accuracy), 4))
