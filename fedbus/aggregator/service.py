"""AggregatorService: a region's `fedbus aggregator`, a thin adapter around AggregatorCore.

It follows the control stream (the coordinator's round.open gives the round, its cohort,
deadline and base model; job.done ends it), listens to its region's workers' heartbeats
(their declared sample counts bound their claims, as at the coordinator), pulls its
region's updates (``upd.<region>.<worker>``, a durable consumer the server filters to the
region's listed workers), verifies each exactly as the coordinator does, and publishes
the region's signed partial aggregate on ``agg.<region>`` with every contributor's own
signed update header as proof. Updates are acknowledged only once JetStream acknowledged
the partial that holds them; until then they are kept alive (``in_progress``).
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog
import torch
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from opentelemetry import trace as otel_trace

from fedbus.aggregator.buffered import AckKeys, AsyncAggregatorCore
from fedbus.aggregator.core import AggregatorCore, PartialPublished, PublishPartial, RoundOpened
from fedbus.aggregator.wire import wire_partial
from fedbus.audit import AuditTrail
from fedbus.audit.queue import AuditQueue, report_rejections
from fedbus.bus import JOB_STREAMS_WAIT_S, NatsCredentials, Subjects, connect, ensure_region_updates, wait_for_stream
from fedbus.aggregation.specs import build_rule
from fedbus.coordinator.factory import policy_from, rule_for
from fedbus.coordinator.machine import WorkerRevoked
from fedbus.coordinator.ratelimit import TokenBuckets
from fedbus.coordinator.rounds import AckThrough, DuplicateIgnored, RejectUpdate, Tick, UpdateReceived, WorkerSeen
from fedbus.crypto.envelopes import Rejection, now_ms
from fedbus.crypto.federation import Federation
from fedbus.crypto.keys import Identity, b64, unb64
from fedbus.crypto.sealing import unsealed_recipients
from fedbus.crypto.proofs import proof_of
from fedbus.crypto.keyevents import KeyChange
from fedbus.jobspec import JobSpec
from fedbus.keywatch import REVOKED_EXIT_CODE, KeyWatch, own_key_lost
from fedbus.messaging import Messenger, verifier_for
from fedbus.protocol.envelope import SIGNATURE_LEN, decode_header, split_frame
from fedbus.protocol.messages import Heartbeat, JobDone, Partial, RoundOpen, Update, finite_metrics
from fedbus.protocol.tensor_groups import split_groups
from fedbus.registry.retention import stream_retention
from fedbus.rejections import RejectionLedger
from fedbus.tasks import load_task
from fedbus.telemetry import get_tracer, trace_context_from_traceparent
from fedbus.telemetry.metrics import count_rejection, metrics
from fedbus.telemetry.stacks import stop_tasks
from fedbus.transforms import build_worker_pipeline, decode_received
from fedbus.bus.follower import ControlFollower

log = structlog.get_logger("fedbus.aggregator")

TICK_S = 0.05
ACK_WAIT_S = 10.0
CONNECT_TIMEOUT_S = 60.0
FETCH_BATCH = 64
RECENT_SCAN = 512  # partials looked back through on the stream by a restarted async aggregator
NOT_YET_OPEN_DELAY_S = 0.5  # redelivery delay of an update whose round this aggregator has not seen open yet
NOT_YET_OPEN_TRIES = 40  # ~20 s of waiting, then it is refused (an update for a round that never opens)


class AggregatorService:
    def __init__(self, job: JobSpec, federation: Federation, identity: Identity, region: str, nats_url: str,
                 *, credentials: NatsCredentials | None = None):
        # The key itself is checked once the job's key events are replayed (it may be a rotated one).
        me = federation.listed_as(identity, "aggregator", check_key=False)
        if me.region != region:
            raise ValueError(f"aggregator {identity.id} is listed for region {me.region!r}, not {region!r}")
        self.job, self.federation, self.identity, self.region, self.nats_url = job, federation, identity, region, nats_url
        self.credentials = credentials
        self.subjects = Subjects(job.job, prefix=job.transport.prefix)
        self.members = [w.id for w in federation.workers() if w.region == region]
        task = load_task(job.task)
        torch.manual_seed(job.seed)
        initial = {k: v.detach().clone() for k, v in task.build_model(job.task_params).state_dict().items()}
        # The last 20% of a round (at most 2 s) is left for the partial to reach the coordinator.
        margin = int(min(2.0, 0.2 * job.round_deadline_s) * 1000)
        if job.mode == "async":
            # FedBuff through regions: one partial per base version every region_buffer_size updates.
            self.core = AsyncAggregatorCore(region, self.members, policy_from(job, federation), rule_for(job),
                                            initial, buffer_size=job.async_.region_buffer_size,
                                            max_staleness=job.async_.max_staleness)
        elif job.region_strategy is not None:
            self.core = AggregatorCore(region, self.members, policy_from(job, federation),
                                       build_rule(job.region_strategy), initial, close_margin_ms=margin,
                                       job_rule=rule_for(job).describe())
        else:
            self.core = AggregatorCore(region, self.members, policy_from(job, federation), rule_for(job), initial,
                                       close_margin_ms=margin)
        self.verifier = verifier_for(job, federation, max_tensors=2 * len(initial) + 16, receiver=identity)
        # Refuses to start (SealingUnavailable) when seal_updates is true and a recipient has no key.
        unsealed_recipients(job.security.seal_updates, federation, regional=True)
        self.pipeline = build_worker_pipeline(job)
        sec = job.security
        self.ledger = RejectionLedger(int(sec.audit_interval_s * 1000), lambda s: federation.get(s) is not None,
                                      on_count=count_rejection)
        self.hb_buckets = TokenBuckets(sec.rate.heartbeats_per_s, sec.rate.heartbeat_burst)
        self.upd_buckets = TokenBuckets(sec.rate.updates_per_s, sec.rate.update_burst)
        self.tracer = get_tracer("fedbus.aggregator")
        self.run_id: str | None = None
        self.audit: AuditQueue | None = None
        self._unacked: dict[tuple[int, str], list] = {}  # (round or ticket, worker) -> held messages
        self._inbox: asyncio.Queue = asyncio.Queue()
        self._actions: asyncio.Queue = asyncio.Queue()
        self._done = asyncio.Event()
        self.exit_code = 0
        self.keys: KeyWatch | None = None

    async def run(self) -> int:
        async def on_reconnected() -> None:
            if self.keys is not None:
                self.keys.on_reconnected()

        self.nc = await connect(self.nats_url, name=f"fedbus-aggregator-{self.identity.id}",
                                first_connect_timeout=CONNECT_TIMEOUT_S, credentials=self.credentials,
                                participant=self.identity.id, reconnected_cb=on_reconnected)
        # The job's streams (control, partials, KV, models) are the hub's; this region's
        # updates are in a stream of the local JetStream (the region's leaf, if it has one).
        hub_domain = self.job.transport.hub_domain
        self.js = self.nc.jetstream(domain=hub_domain) if hub_domain else self.nc.jetstream()
        self.local_js = self.nc.jetstream()
        try:
            # The coordinator creates the job's streams; an aggregator creates only what it owns,
            # its region's update stream (a secured server allows it nothing more).
            await wait_for_stream(self.js, self.subjects.ctl_stream, JOB_STREAMS_WAIT_S)
            self.upd_stream = await ensure_region_updates(self.local_js, self.subjects, self.region,
                                                          replicas=self.job.transport.replicas,
                                                          **stream_retention(self.job))
            # Every past key event is applied before anything is trusted or sent.
            self.keys = KeyWatch(self.js, self.subjects, self.federation, self.job.security,
                                 on_change=self._on_key_change)
            if not await self.keys.start_as(self.identity):
                return REVOKED_EXIT_CODE
            self.messenger = Messenger(self.nc, self.js, self.identity, self.subjects,
                                       inline_max_bytes=self.job.transport.inline_max_bytes)
            await self._learn_last_partial()
            # Its own audit chain: what it refused (in aggregate), on <prefix>.<job>.audit.<id>.
            self.audit = AuditQueue(AuditTrail(self.js, self.subjects, self.identity))
            self.audit.submit("aggregator.started", region=self.region)
            follower = ControlFollower(self.js, self.subjects.ctl_all, self._inbox.put, stream=self.subjects.ctl_stream,
                                       skip=frozenset({self.keys.subject}))
            await follower.start()
            subs = [await self.nc.subscribe(self.subjects.hb(w), cb=self._on_heartbeat) for w in self.members]
            tasks = [asyncio.create_task(self._follow_control()), asyncio.create_task(self._consume()),
                     asyncio.create_task(self._tick()), asyncio.create_task(self._act()),
                     asyncio.create_task(self._keep_alive()), asyncio.create_task(self.audit.run())]
            log.info("aggregator.started", aggregator=self.identity.id, region=self.region, workers=len(self.members),
                     nats=self.nats_url)
            await self._done.wait()
            await stop_tasks(tasks)
            report_rejections(self.ledger.flush(now_ms()), self.audit)
            await self.audit.drain()
            for sub in subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            await follower.stop()
            await self.keys.stop()
        finally:
            with contextlib.suppress(Exception):
                await self.nc.close()
        log.info("aggregator.stopped", region=self.region, partials=self.core.partials_published,
                 rejected=dict(self.ledger.totals))
        return self.exit_code

    def _on_key_change(self, change: KeyChange) -> None:
        """A key event was applied: a revoked (or rotated) worker of the region leaves later
        cohorts at once; if it revoked this aggregator or rotated its key away, stop."""
        if change.participant in self.members:
            self.core.handle(WorkerRevoked(change.participant))
        if own_key_lost(self.federation, self.identity, change):
            self.exit_code = REVOKED_EXIT_CODE
            self._done.set()

    async def _learn_last_partial(self) -> None:
        """A restarted aggregator must not publish a second partial for a round it already
        published (its updates may not have been acknowledged before it died)."""
        try:
            last = await self.js.get_last_msg(self.subjects.agg_stream, self.subjects.agg(self.region))
            header = decode_header(split_frame(last.data)[0])
        except Exception:
            return
        if header.sender == self.identity.id and header.run:
            self.core.note_published(header.run, header.round)
            log.info("aggregator.found_published", round=header.round, run=header.run)
        if isinstance(self.core, AsyncAggregatorCore):
            await self._learn_recent_forwards()

    async def _learn_recent_forwards(self) -> None:
        """Async: which (worker, ticket) updates this aggregator already forwarded, from its
        last partials on the stream (bounded), so their redeliveries after a restart are
        duplicates, not news to forward again."""
        stream, subject = self.subjects.agg_stream, self.subjects.agg(self.region)
        try:
            last_seq = (await self.js.stream_info(stream)).state.last_seq
        except Exception:
            return
        found = 0
        for seq in range(last_seq, max(0, last_seq - RECENT_SCAN), -1):
            try:
                msg = await self.js.get_msg(stream, seq=seq)
                if msg.subject != subject:
                    continue
                stored = int(msg.time.timestamp() * 1000) if getattr(msg, "time", None) else None
                got = await self.messenger.receive(self.verifier, msg.data, stored_ms=stored)
            except Exception:  # deleted, foreign or junk: not ours to learn from
                continue
            if got.header.sender != self.identity.id or not isinstance(got.fields, Partial):
                continue
            for worker, digest_b64, proof_b64 in zip(got.fields.workers, got.fields.digests, got.fields.proofs):
                with contextlib.suppress(Exception):
                    ticket = decode_header(unb64(proof_b64)[:-SIGNATURE_LEN]).round
                    self.core.recent[(worker, ticket)] = unb64(digest_b64)
                    found += 1
        if found:
            log.info("aggregator.found_forwarded", updates=found)

    # ---- inputs ------------------------------------------------------------------------

    def _feed(self, event) -> list:
        actions = self.core.handle(event)
        for a in actions:
            self._actions.put_nowait(a)
        return actions

    def _rejected(self, kind: str, reason: str, detail: str, sender: str | None, subject: str) -> None:
        if self.ledger.record(kind, sender, reason, detail, now_ms()):
            log.warning(f"{kind}.rejected", reason=reason, detail=detail[:200], subject=subject[:200],
                        sender=(sender or "")[:64], note="further ones this interval are aggregated")

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            self._feed(Tick(now_ms()))
            if self.ledger.due(now_ms()):
                report_rejections(self.ledger.flush(now_ms()), self.audit)

    async def _on_heartbeat(self, msg) -> None:
        token = msg.subject.rsplit(".", 1)[-1]
        if not self.hb_buckets.allow(token, now_ms()):
            return self._rejected("heartbeat", "rate_limited", "heartbeat budget spent", token, msg.subject)
        try:
            got = await self.messenger.receive(self.verifier, msg.data, sender_token=token)
        except Rejection as rej:
            return self._rejected("heartbeat", rej.reason, rej.detail, rej.header.sender if rej.header else None,
                                  msg.subject)
        hb: Heartbeat = got.fields  # type: ignore[assignment]
        self._feed(WorkerSeen(got.header.sender, hb.num_samples, now_ms()))
        return None

    async def _follow_control(self) -> None:
        while True:
            msg = await self._inbox.get()
            try:
                got = await self.messenger.receive(self.verifier, msg.data)
            except Rejection as rej:
                self._rejected("control", rej.reason, rej.detail, rej.header.sender if rej.header else None,
                               msg.subject)
                continue
            fields, h = got.fields, got.header
            if isinstance(fields, RoundOpen) and h.run:
                self.run_id = h.run
                model, _ = split_groups(got.tensors or {})
                self._feed(RoundOpened(h.run, fields.round, fields.model_version, tuple(fields.cohort),
                                       fields.deadline_ms, model, now_ms(), h.trace, tuple(fields.declared)))
            elif isinstance(fields, JobDone) and h.run and h.run == self.run_id:
                log.info("job.done", reason=fields.reason)
                self._done.set()

    async def _consume(self) -> None:
        durable = f"aggregator-{self.region}"
        subjects = self.subjects.upd_listed((self.region, w) for w in self.members)
        config = ConsumerConfig(durable_name=durable, deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.EXPLICIT,
                                ack_wait=ACK_WAIT_S, max_ack_pending=10_000, filter_subjects=subjects)
        js, stream = self.local_js, self.upd_stream

        async def bind():
            try:
                await js.add_consumer(stream, config)
            except Exception as exc:
                log.warning("consumer.recreated", durable=durable, error=repr(exc))
                with contextlib.suppress(Exception):
                    await js.delete_consumer(stream, durable)
                await js.add_consumer(stream, config)
            return await js.pull_subscribe_bind(durable, stream)

        psub = await bind()
        failures = 0
        while not self._done.is_set():  # (see the coordinator's _consume: fetch may swallow a cancel)
            try:
                msgs = await psub.fetch(batch=FETCH_BATCH, timeout=0.5)
                failures = 0
            except (TimeoutError, asyncio.TimeoutError):
                continue
            except Exception as exc:
                if self.nc.is_closed:
                    return
                failures += 1
                log.warning("consumer.fetch_failed", error=repr(exc))
                await asyncio.sleep(0.2)
                if failures % 10 == 0:  # the consumer may be gone (deleted, or a server lost it): bind again
                    with contextlib.suppress(Exception):
                        psub = await bind()
                continue
            for msg in msgs:
                hold = False
                try:
                    hold = await self._on_update(msg)
                except Exception as exc:  # one message's bug must not stop the region
                    log.exception("message.handler_failed", error=repr(exc))
                if not hold:
                    with contextlib.suppress(Exception):
                        await msg.ack()

    async def _on_update(self, msg) -> bool:
        parts = msg.subject.split(".")
        token = parts[-1]
        try:
            md = msg.metadata
            delivered, stored_ms = int(md.num_delivered), int(md.timestamp.timestamp() * 1000)
        except Exception:
            delivered, stored_ms = 1, None
        if delivered == 1 and not self.upd_buckets.allow(token, now_ms()):
            self._rejected("update", "rate_limited", "update budget spent", token, msg.subject)
            return False
        try:
            got = await self.messenger.receive(self.verifier, msg.data, sender_token=token, stored_ms=stored_ms,
                                               offload=True,
                                               round_ok=lambda h: self.core.accepts(h.run, h.round))
            if got.header.type != Update.TYPE:
                raise Rejection("unknown_type", f"{got.header.type} on an update subject", got.header)
            sender = self.federation.get(got.header.sender)
            if sender is None or sender.region != self.region or parts[-2] != self.region:
                raise Rejection("wrong_region", f"{got.header.sender} is not a worker of region {self.region}",
                                got.header)
            upd: Update = got.fields  # type: ignore[assignment]
            # The receiving half of the workers' pipeline (every stage's decode, in reverse).
            update = decode_received(self.pipeline, got.header, upd, got.tensors,
                                     self.core.base_for(upd.base_version))
        except Rejection as rej:
            h = rej.header
            if (rej.reason == "wrong_round" and h is not None and delivered <= NOT_YET_OPEN_TRIES
                    and self.core.opens_soon(h.run, h.round)):
                # The round.open of this update has not been handled yet (a restart catching up
                # on the control stream, or a large model still being fetched): ask for it again
                # shortly instead of acknowledging it away.
                with contextlib.suppress(Exception):
                    await msg.nak(delay=NOT_YET_OPEN_DELAY_S)
                return True
            if not (delivered > 1 and rej.reason == "replayed_nonce"):
                self._rejected("update", rej.reason, rej.detail, h.sender if h else None, msg.subject)
            return False
        h = got.header
        event = UpdateReceived(worker_id=h.sender, round=h.round, now_ms=now_ms(), digest=h.digest,
                               base_version=upd.base_version, update=update,
                               train_metrics=upd.train_metrics, proof=proof_of(msg.data))
        actions = self._feed(event)
        if any(isinstance(a, (RejectUpdate, DuplicateIgnored)) and a.worker_id == h.sender for a in actions):
            for a in actions:
                if isinstance(a, RejectUpdate):
                    self._rejected("update", a.reason, a.detail, a.worker_id, msg.subject)
            return False
        self._unacked.setdefault((h.round, h.sender), []).append(msg)
        metrics().accepted()
        return True

    async def _keep_alive(self) -> None:
        while True:
            await asyncio.sleep(ACK_WAIT_S / 4)
            for msgs in list(self._unacked.values()):
                for msg in msgs:
                    with contextlib.suppress(Exception):
                        await msg.in_progress()

    # ---- outputs -----------------------------------------------------------------------

    async def _act(self) -> None:
        while True:
            action = await self._actions.get()
            try:
                if isinstance(action, PublishPartial):
                    await self._publish(action)
                elif isinstance(action, AckThrough):
                    await self._ack([k for k in self._unacked if k[0] <= action.round])
                elif isinstance(action, AckKeys):
                    await self._ack(action.keys)
            except Exception as exc:  # the updates stay unacknowledged: a restart publishes them again
                log.exception("action.failed", action=type(action).__name__, error=repr(exc))

    async def _ack(self, keys) -> None:
        for key in sorted(keys):
            for msg in self._unacked.pop(key, ()):
                with contextlib.suppress(Exception):
                    await msg.ack()

    async def _publish(self, a: PublishPartial) -> None:
        ctx = trace_context_from_traceparent(a.trace)
        with self.tracer.start_as_current_span("aggregator.publish", context=ctx, attributes={
                "fedbus.round": a.round, "fedbus.region": self.region, "fedbus.contributors": len(a.contributors)}):
            tensors, meta = await asyncio.to_thread(lambda: wire_partial(a.partial))
            body = Partial(round=a.round, region=self.region, base_version=meta["base_version"], rule=meta["rule"],
                           total_weight=meta["total_weight"], workers=[c[0] for c in a.contributors],
                           digests=[b64(c[1]) for c in a.contributors], weights=[c[2] for c in a.contributors],
                           base_versions=[c[3] for c in a.contributors], proofs=[b64(c[4]) for c in a.contributors],
                           scalars=meta["scalars"], groups=meta["groups"],
                           train_metrics=finite_metrics(a.train_metrics), metrics_weight=a.metrics_weight)
            traceparent = None
            span = otel_trace.get_current_span()
            if span.get_span_context().is_valid:
                from fedbus.telemetry import current_traceparent
                traceparent = current_traceparent()
            await self.messenger.publish(self.subjects.agg(self.region), body, tensors, round=a.round, run=a.run,
                                         trace=traceparent)
        log.info("partial.published", round=a.round, region=self.region, contributors=len(a.contributors))
        metrics().partial_published(self.region)
        self._feed(PartialPublished(a.run, a.round, now_ms()))
