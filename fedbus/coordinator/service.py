"""CoordinatorService: wires the RoundStateMachine to NATS JetStream.

It translates and persists only: heartbeats and verified updates become events; actions
become commits, signed publishes, spans, audit records and the run summary. All round
logic lives in ``coordinator.rounds``; heavy work (aggregation, server evaluation,
encoding, saving) runs in threads so heartbeats and ack keep-alives never starve.

What a hostile sender can cost the coordinator is bounded here:

* every rejection is counted exactly and reported in aggregate (``RejectionLedger``): at
  most one log line and one audit record per (sender, reason) and interval;
* heartbeats and updates pass a per-sender token bucket before any signature is checked;
* audit records go through their own bounded queue, never through the action queue that
  opens and closes rounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, OrderedDict
from pathlib import Path

import structlog
import torch
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from opentelemetry import trace as otel_trace

from fedbus.allocator import keep_large_buffers_mapped
from fedbus.spill import prepare_page_out, remove_leftovers, state_bytes
from fedbus.sizing import model_fits, scaled_round_deadline_s
from fedbus.atomicfile import atomic_torch_save
from fedbus.audit import AuditTrail
from fedbus.audit.queue import AuditQueue, rejection_fields, report_rejections
from fedbus.bus import NatsCredentials, Subjects, connect, ensure_job_infrastructure
from fedbus.bus.follower import ControlFollower
from fedbus.bus.layout import purge_stream_except
from fedbus.coordinator.announcements import eval_open_message, round_open_message
from fedbus.coordinator.factory import history_versions, machine_for
from fedbus.coordinator.jobstate import JobStateError, JobStateStore
from fedbus.coordinator.registrar import Registrar, purge_acknowledged
from fedbus.coordinator.machine import WorkerRevoked
from fedbus.rejections import RejectionLedger
from fedbus.coordinator.ratelimit import TokenBuckets
from fedbus.coordinator.rounds import (
    AGGREGATION_ERRORS,
    AckThrough,
    Aggregate,
    AggregationFailed,
    Aggregated,
    CloseRound,
    Commit,
    CommitFailed,
    Committed,
    Deferred,
    DuplicateIgnored,
    EvalReceived,
    FinishJob,
    InternalError,
    MessageRejected,
    OpenEval,
    OpenRound,
    PartialReceived,
    RejectUpdate,
    RollbackRefused,
    RollbackRequested,
    Start,
    Tick,
    UpdateReceived,
    WorkerSeen,
    close_row,
)
from fedbus.coordinator.secure_rounds import SecureRounds
from fedbus.coordinator.summary import RunSummary
from fedbus.coordinator.versions import AckUpdates
from fedbus.crypto.envelopes import Rejection, now_ms
from fedbus.crypto.federation import Federation
from fedbus.crypto.keys import Identity, unb64
from fedbus.crypto.keyevents import KeyChange
from fedbus.crypto.sealing import unsealed_recipients
from fedbus.jobspec import JobSpec
from fedbus.keywatch import KeyWatch, stored_ms_of
from fedbus.messaging import Messenger, verifier_for
from fedbus.coordinator.partials import verified_partial
from fedbus.privacy.budget import privacy_summary
from fedbus.protocol.envelope import SIGNATURE_LEN, BlobPointer, decode_header
from fedbus.protocol.messages import (EvalReport, Heartbeat, JobDone, ModelCommand, Partial, RoundClose, Update,
                                      finite_metrics)
from fedbus.protocol.runs import new_run_id
from fedbus.registry.models import load_version
from fedbus.registry.retention import stream_retention
from fedbus.tasks import load_task
from fedbus.secagg.exchange import WORKER_TYPES as SECAGG_TYPES
from fedbus.transforms import build_worker_pipeline, decode_received
from fedbus.telemetry import get_tracer, inject_trace_headers
from fedbus.telemetry.metrics import count_rejection, metrics
from fedbus.telemetry.stacks import stop_tasks

log = structlog.get_logger("fedbus.coordinator")

TICK_S = 0.05
# Short, so a crashed coordinator's unacknowledged updates come back quickly; the service
# extends it with in_progress() for updates it holds until their round commits.
ACK_WAIT_S = 10.0
CONNECT_TIMEOUT_S = 60.0
FETCH_BATCH = 64
# A commit is retried for this long: longer than a JetStream leader election after a
# SIGKILLed cluster node (5-12 s measured, each attempt waiting up to nats-py's 5 s).
COMMIT_BUDGET_S = 30.0
ACCEPTED_NONCES = 100_000  # nonces of accepted updates remembered, to tell copies from attacks
# Heartbeat gaps longer than this mean the worker was away (dead, restarted, partitioned),
# not that the coordinator was slow to listen: they are left out of max_heartbeat_gap_s.
HEARTBEAT_GAP_ALIVE_S = 30.0
REPORT_MANIFEST_WAIT_S = 5.0  # the run report waits this long at most for the final manifest
# A listed worker whose heartbeats were refused this often since its last cool-down is
# storming: unsubscribe it for a while (shorter than any liveness window, >= 5 s).
HB_STORM_REFUSALS = 1_000
HB_COOL_DOWN_S = 2.0
LIVE_WORKERS_EVERY_TICKS = 10  # the live-workers gauge is refreshed every 0.5 s


def _seq(msg) -> int | None:
    """The stream sequence of a JetStream message (None if it has no metadata)."""
    try:
        return int(msg.metadata.sequence.stream)
    except Exception:
        return None


# A model this large waits for its next use in a file mapping (CoordinatorService._page_out_model):
# 256 MiB, where a third copy of the model starts to matter next to the interpreter's ~0.35 GB.
DEFAULT_PAGE_OUT_ABOVE = 256 * 1024 * 1024


class CoordinatorService:
    def __init__(self, job: JobSpec, federation: Federation, identity: Identity, nats_url: str, run_dir: Path,
                 *, resume: bool = False, credentials: NatsCredentials | None = None,
                 span_file: str | Path | None = None, page_out_above: int | None = DEFAULT_PAGE_OUT_ABOVE):
        federation.listed_as(identity, "coordinator")
        keep_large_buffers_mapped()  # freed update buffers go back to the OS (fedbus/allocator.py)
        self.job = job
        self.federation = federation
        self.identity = identity
        self.nats_url = nats_url
        self.credentials = credentials
        self.run_dir = Path(run_dir)
        self.span_file = span_file  # the run report's waterfall and training times come from it
        # Models of at least this many bytes wait for their next use in a file mapping (None: never).
        self.page_out_above = page_out_above
        self._paged_version: int | None = None
        remove_leftovers(self.run_dir / "spill")  # a kill mid page-out leaves its file behind
        self._final_manifest: dict | None = None
        self.subjects = Subjects(job.job, prefix=job.transport.prefix)
        self.task = load_task(job.task)
        torch.manual_seed(job.seed)
        self.model = self.task.build_model(job.task_params)
        self.test_data = self.task.server_test_data(job.task_params, job.seed) if job.evaluation.server_test else None
        if self.test_data is not None:
            self.task.evaluate(self.model, self.test_data)  # pay torch's one-time costs before round 1
        if self.test_data is None:
            # Nothing will evaluate with the module: its tensors become the initial model as
            # they are (no clone) and the module is let go, so a large model is held once.
            initial = {k: v.detach() for k, v in self.model.state_dict().items()}
            self.model = None
        else:
            initial = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        # A model over the job's message limit is refused at start (run), with the limit to raise.
        self.too_large = model_fits(job, initial)
        deadline = scaled_round_deadline_s(job, initial)  # the default follows the model's size
        if deadline != job.round_deadline_s:
            job = self.job = job.model_copy(update={"round_deadline_s": deadline})
        self.machine = machine_for(job, initial, num_workers_total=len(federation.workers()),
                                   federation=federation, reopened_min_ms=int((ACK_WAIT_S + 2.0) * 1000))
        # A body carries at most the model's tensors and as many again of strategy extras.
        self.verifier = verifier_for(job, federation, max_tensors=2 * len(initial) + 16, receiver=identity)
        # Refuses to start (SealingUnavailable) when seal_updates is true and a recipient has no key.
        self._unsealed = unsealed_recipients(job.security.seal_updates, federation,
                                             regional=job.topology == "regional")
        self.pipeline = build_worker_pipeline(job)  # its decode half turns wire updates into contributions
        self.summary = RunSummary(job=job.job, task=job.task, rounds_planned=job.rounds)
        self.tracer = get_tracer("fedbus.coordinator")
        self._round_spans: dict[int, otel_trace.Span] = {}
        self.resume = resume
        self.run_id: str = ""
        sec = job.security
        self.ledger = RejectionLedger(int(sec.audit_interval_s * 1000),
                                      lambda sender: self.federation.get(sender) is not None,
                                      on_count=count_rejection)
        self._accepted_counted = 0  # machine.accepted_total already added to the live counter
        self.hb_buckets = TokenBuckets(sec.rate.heartbeats_per_s, sec.rate.heartbeat_burst)
        self.upd_buckets = TokenBuckets(sec.rate.updates_per_s, sec.rate.update_burst)
        # Accepted updates are acknowledged only once the model that folds them is committed:
        # a crash before that leaves them in the stream for the next coordinator (see
        # jobstate). Keyed by (round, worker) — in async mode (ticket, worker).
        self._unacked: dict[tuple[int, str], list] = {}
        self._held_nonces: set[bytes] = set()
        # nonce -> stream sequence of recently accepted updates (bounded): tells a redelivery
        # from a replay when a server restart has reset delivery counts
        self._accepted_nonces: OrderedDict[bytes, int | None] = OrderedDict()
        self._unfed_rejections: Counter[str] = Counter()
        self._actions: asyncio.Queue = asyncio.Queue()
        self._done = asyncio.Event()
        # When this process last handled a verified heartbeat of each worker (monotonic s):
        # the gaps between them show whether the event loop kept listening (summary.json).
        self._last_heartbeat: dict[str, float] = {}
        self._gap_logged = 0.0  # one heartbeat.gap line per stall, not one per worker
        # Fetched messages not handled yet, by consumer: a batch of large updates can take
        # longer than the ack wait to work through, so the batch is kept alive too.
        self._in_hand: dict[str, list] = {}
        self.exit_code = 0
        self.already_done = False
        self._done_record = None  # the committed record of a job found finished at --resume
        self._recovered_close: dict | None = None
        self.keys: KeyWatch | None = None
        # privacy.secure_aggregation: each round's SecAgg+ exchange (workers' secagg.* arrive as updates).
        self.secure = SecureRounds(
            job, self.machine.rule, self.machine.policy.quorum, self._publish_secagg,
            lambda reason, detail, sender, round_: self._rejected("secagg", reason, detail, sender, "", round_),
            self._feed) if job.privacy.secure_aggregation is not None else None
        self.model_commands: ControlFollower | None = None
        self._started_ms = now_ms()  # model commands stored before this process started are not redone

    async def _publish_secagg(self, suffix: str, body, round_: int) -> None:
        await self.messenger.publish(self.subjects.ctl(suffix), body, round=round_, run=self.run_id)

    def _update_round_ok(self, h) -> bool:
        if self.secure is not None and h.type in SECAGG_TYPES:
            return self.secure.accepts(h)  # Rejection (oversize) for a masked input longer than the round's
        return self.machine.accepts_round(h.type, h.round)

    # ---- lifecycle ---------------------------------------------------------------------

    async def run(self) -> RunSummary:
        started = time.perf_counter()
        if self.too_large is not None:
            # Refused before anything is published: workers would refuse every round.open.
            log.error("job.refused", reason="model_too_large", detail=self.too_large)
            self.summary.reason = "model_too_large"
            self.summary.error = self.too_large
            self.exit_code = 2
            await asyncio.to_thread(self.summary.write, self.run_dir / "summary.json")
            return self.summary

        async def on_reconnected() -> None:
            if self.keys is not None:
                self.keys.on_reconnected()
            if self.model_commands is not None:
                self.model_commands.on_reconnected()

        self.nc = await connect(self.nats_url, name=f"fedbus-coordinator-{self.identity.id}",
                                first_connect_timeout=CONNECT_TIMEOUT_S, credentials=self.credentials,
                                participant=self.identity.id, reconnected_cb=on_reconnected)
        self.js = self.nc.jetstream()
        write_summary = True
        try:
            await ensure_job_infrastructure(self.js, self.subjects, replicas=self.job.transport.replicas,
                                            regional=self.job.topology == "regional", **stream_retention(self.job))
            # Every past key event is applied before any message is verified.
            self.keys = KeyWatch(self.js, self.subjects, self.federation, self.job.security,
                                 on_change=self._on_key_change, on_reject=self._key_event_rejected)
            await self.keys.start()
            self.jobstate = JobStateStore(self.nc, self.js, self.job.job, self.identity,
                                          keep_versions=history_versions(self.job))
            self.registrar = Registrar(self.nc, self.js, self.job, self.federation, self.identity, self.jobstate)
            self.messenger = Messenger(self.nc, self.js, self.identity, self.subjects,
                                       inline_max_bytes=self.job.transport.inline_max_bytes)
            if self.resume:
                if not await self._restore():
                    write_summary = False  # a finished job's results stay as they are
                    await self._announce_done_again()
                    return self.summary
            else:
                await self._fresh_start()
            self.audit = AuditTrail(self.js, self.subjects, self.identity)
            self.audit_queue = AuditQueue(self.audit)
            await self.audit.resume()
            self.model_commands = ControlFollower(self.js, self.subjects.ctl(ModelCommand.TYPE), self._on_model_command,
                                                  stream=self.subjects.ctl_stream)
            await self.model_commands.start()
            await self.audit.publish("job.resumed" if self.resume else "job.started", job=self.job.job,
                                     run=self.run_id, rounds=self.job.rounds)
            last = self._recovered_close
            if last is not None and await self.audit.recent("round.closed", round=last["round"], run=self.run_id) is None:
                # (The predecessor may have audited the close and died before summarising it.)
                await self.audit.publish("round.closed", round=last["round"], run=self.run_id, status=last["status"],
                                         model_version=last["model_version"],
                                         accepted=last.get("accepted_workers", []), recovered=True)
            # Every incarnation is on record at once, even one killed before its first round.
            await asyncio.to_thread(self.summary.write, self.run_dir / "summary.json")
            await self._subscribe_heartbeats()
            workers = self.federation.workers()
            reports = sorted(self.subjects.metrics(w.id) for w in workers)
            if self.job.topology == "regional":
                # Partials of the regions that have an aggregator; raw updates are never read.
                regions = sorted({p.region for p in self.federation.aggregators()})
                intake = self._consume([self.subjects.agg(r) for r in regions], self.subjects.agg_stream,
                                       "coordinator-partials", self._on_partial)
            else:
                intake = self._consume(self.subjects.upd_listed((w.region, w.id) for w in workers),
                                       self.subjects.upd_stream, "coordinator-updates", self._on_update)
            tasks = [asyncio.create_task(intake),
                     asyncio.create_task(self._consume(reports, self.subjects.metrics_stream,
                                                      "coordinator-metrics", self._on_eval_report)),
                     asyncio.create_task(self._tick()),
                     asyncio.create_task(self._keep_unacked_alive()),
                     asyncio.create_task(self.audit_queue.run()),
                     asyncio.create_task(self._act())]
            if self._unsealed:
                log.warning("sealing.unavailable", recipients=self._unsealed,
                            note="updates to these recipients travel in the clear: no encryption_key listed")
            log.info("coordinator.started", job=self.job.job, run=self.run_id, nats=self.nats_url,
                     rounds=self.job.rounds, min_workers=self.job.cohort.min_workers,
                     strategy=self.machine.rule.describe(),
                     server_optimizer=self.machine.optimizer.name if self.machine.optimizer else "none")
            self._accepted_counted = self.machine.accepted_total  # (a resumed run's earlier ones were counted)
            metrics().job_started(self.job.round_deadline_s)
            self._feed(Start(now_ms()))
            await self._done.wait()
            await self._flush_rejections(final=True)
            self._final_manifest = await self._read_final_manifest()
            await stop_tasks(tasks)
            if self.secure is not None:
                await self.secure.close()
            await self.keys.stop()
            await self.model_commands.stop()
            with contextlib.suppress(Exception):
                await self.hb_nc.close()
        finally:
            if write_summary:
                self.summary.add_wall(time.perf_counter() - started)
                self.summary.set_rejections(self.ledger.totals)
                self.summary.write(self.run_dir / "summary.json")
                self._write_report()
            # Every publish was acknowledged already; drain() would wait on the pull consumers.
            with contextlib.suppress(Exception):
                await self.nc.close()
        return self.summary

    async def _read_final_manifest(self) -> dict | None:
        """The final version's manifest for the run report: the one this process wrote, else
        the registry's (a resumed run's final version may predate it); None if neither."""
        version = self.summary.model_version
        try:
            last = self.registrar.last
            if last is not None and last.version == version:
                return last.model_dump(mode="json")
            manifest = await asyncio.wait_for(self.registrar.registry.manifest(version), REPORT_MANIFEST_WAIT_S)
        except Exception as exc:  # none kept, unreadable or slow: the report says it is missing
            log.warning("report.manifest_unavailable", version=version, error=repr(exc)[:200])
            return None
        return manifest.model_dump(mode="json")

    def _write_report(self) -> None:
        """report.html in the run directory (fedbus.report), after summary.json. The job is
        over by now (job.done is out); a report that cannot be written is logged, never fatal."""
        started = time.perf_counter()
        try:
            # Imported here: plotly is needed once, at the end, not at every coordinator's start-up.
            from fedbus.report import write_report

            manifest = self._final_manifest
            registrar = getattr(self, "registrar", None)
            if manifest is None and registrar is not None and registrar.last is not None:
                manifest = registrar.last.model_dump(mode="json")  # stopped before the job's end: the latest one
            path = write_report(self.run_dir, span_file=self.span_file,
                                job=self.job.model_dump(mode="json", by_alias=True), manifest=manifest)
        except Exception as exc:
            log.warning("report.failed", run_dir=str(self.run_dir), error=repr(exc)[:300])
            return
        log.info("report.written", path=str(path), seconds=round(time.perf_counter() - started, 3))

    async def _restore(self) -> bool:
        """Load the committed job; False when it had already finished (nothing to do)."""
        committed = await self.jobstate.load()
        if committed is None:
            raise JobStateError(f"nothing committed for job {self.job.job!r}: start without --resume")
        self.run_id = committed.run
        if committed.record.phase == "done":
            self.already_done = True
            self._done_record = committed.record
            log.info("coordinator.already_done", job=self.job.job, run=self.run_id,
                     reason=committed.record.reason, rounds_completed=committed.record.rounds_completed)
            return False
        self.machine.restore(committed.record, committed.model, committed.strategy_state, committed.history)
        try:  # a crash between the commit and the manifest write lost the manifest: write it now
            await self.registrar.recover(committed.record, committed.model, self.run_id, now_ms())
        except Exception as exc:  # the registry never fails the job; the next commit writes its own
            self.registrar.manifested = committed.record.model_version
            log.warning("registry.manifest_failed", version=committed.record.model_version, error=repr(exc)[:300])
        previous = RunSummary.load(self.run_dir / "summary.json", run=self.run_id)
        if previous is not None:
            self.summary = previous
        self.summary.run = self.run_id
        self.summary.incarnations += 1
        last = committed.record.last_close
        if last is not None and not any(r.get("round") == last.get("round") for r in self.summary.rounds):
            # The commit that closed this round landed, but the coordinator died before it
            # was summarised and audited: both happen now.
            self.summary.add_round(last)
            self._recovered_close = last
        self.summary.rounds_completed = committed.record.rounds_completed
        self.summary.model_version = committed.record.model_version
        if self.summary.resumed_from_round is None:
            self.summary.resumed_from_round = committed.record.round - (committed.record.phase == "round_open")
        log.info("coordinator.resumed", run=self.run_id, round=committed.record.round,
                 phase=committed.record.phase, model_version=committed.record.model_version,
                 rounds_completed=committed.record.rounds_completed)
        return True

    async def _fresh_start(self) -> None:
        """A new coordinator run of a job starts from scratch: old control events and
        updates of the same job id must not leak into it."""
        # Key events are the job's, not a run's: a revoked key stays revoked in the next run.
        with contextlib.suppress(Exception):
            await purge_stream_except(self.js, self.subjects.ctl_stream, keep=self.keys.subject)
        for stream in (self.subjects.upd_stream, self.subjects.metrics_stream, self.subjects.agg_stream):
            with contextlib.suppress(Exception):
                await self.js.purge_stream(stream)
        for stream, durable in ((self.subjects.upd_stream, "coordinator-updates"),
                                (self.subjects.metrics_stream, "coordinator-metrics"),
                                (self.subjects.agg_stream, "coordinator-partials")):
            with contextlib.suppress(Exception):
                await self.js.delete_consumer(stream, durable)
        for region in sorted({a.region for a in self.federation.aggregators()}):
            # Each region's updates (in its leaf's domain, named after the region, if it has one).
            js = self.nc.jetstream(domain=region) if self.job.transport.hub_domain else self.js
            # (Its aggregator's consumer is left alone: the aggregator may already be running.)
            with contextlib.suppress(Exception):
                await js.purge_stream(self.subjects.region_upd_stream(region))
        await self.jobstate.reset()
        await self.registrar.registry.reset()
        self.run_id = new_run_id(now_ms())
        self.summary.run = self.run_id
        self.summary.incarnations = 1

    # ---- inputs ------------------------------------------------------------------------

    def _feed(self, event) -> list:
        # Rejections counted so far go in first, so a round that this event closes lists
        # every rejection that arrived while it was open (not only those a tick fed).
        self._feed_rejections()
        actions = self.machine.handle(event)
        for action in actions:
            self._actions.put_nowait(action)
        return actions

    async def _tick(self) -> None:
        ticks = 0
        while True:
            await asyncio.sleep(TICK_S)
            self._feed(Tick(now_ms()))
            ticks += 1
            if ticks % LIVE_WORKERS_EVERY_TICKS == 0:  # (an O(workers) scan: not on every tick)
                metrics().live_workers(len(self.machine.alive_workers(now_ms())))
            if self.ledger.due(now_ms()):
                await self._flush_rejections()

    def _feed_rejections(self) -> None:
        """Hand the machine the rejections it has not counted yet, in aggregate."""
        if self._unfed_rejections:
            for reason, count in self._unfed_rejections.items():
                self.machine.handle(MessageRejected(reason, count))
            self._unfed_rejections.clear()

    def _rejected(self, kind: str, reason: str, detail: str, sender: str | None, subject: str,
                  round_: int | None, *, counted_by_machine: bool = False) -> None:
        """Count a rejection exactly; log it only when it is the first of its kind this interval."""
        if not counted_by_machine:
            self._unfed_rejections[reason] += 1  # fed to the machine in aggregate, before its next event
        if self.ledger.record(kind, sender, reason, detail, now_ms()):
            log.warning(f"{kind}.rejected", reason=reason, detail=detail[:200], subject=subject[:200],
                        sender=(sender or "")[:64], round=round_, note="further ones this interval are aggregated")

    async def _flush_rejections(self, final: bool = False) -> None:
        reports = self.ledger.flush(now_ms())
        if not final:
            return report_rejections(reports, self.audit_queue)
        report_rejections(reports, None)
        for rep in reports:  # the job is over: written now, not queued
            await self.audit.publish("rejections", **rejection_fields(rep))

    def _on_key_change(self, change: KeyChange) -> None:
        participant = self.federation.get(change.participant)
        if participant is not None and participant.role == "worker":
            # Revoked, or rotated to a key it has yet to restart with: no longer alive to us.
            self.machine.handle(WorkerRevoked(change.participant))
        # Audited when it happens; a resumed coordinator's replay of old events is not news.
        # (The coordinator's own key is never a key event's target: see fedbus.crypto.keyevents.)
        queue = getattr(self, "audit_queue", None)
        if self.keys is None or not self.keys.synced or queue is None:
            return
        queue.submit("keys.applied", participant=change.participant, action=change.action, signer=change.signer,
                     seq=change.seq, public_key=change.public_key, reason=change.reason)

    def _key_event_rejected(self, rej: Rejection, subject: str) -> None:
        h = rej.header
        self._rejected("keys", rej.reason, rej.detail, h.sender if h else None, subject, None)

    async def _subscribe_heartbeats(self) -> None:
        """One subscription per listed worker, on a connection of its own.

        The server then drops heartbeats under any other id, and a storm from a listed
        worker is parsed on a socket that commits and publishes do not share, so their
        acks never queue behind it. A worker that overspends its budget by far is
        unsubscribed for a cool-down shorter than the liveness window."""
        self.hb_nc = await connect(self.nats_url, name=f"fedbus-coordinator-{self.identity.id}-heartbeats",
                                   first_connect_timeout=CONNECT_TIMEOUT_S, credentials=self.credentials,
                                   participant=self.identity.id)
        self._hb_subs: dict[str, object] = {}
        self._hb_refused: Counter[str] = Counter()
        for worker in self.federation.workers():
            await self._subscribe_heartbeat(worker.id)

    async def _subscribe_heartbeat(self, worker: str) -> None:
        self._hb_subs[worker] = await self.hb_nc.subscribe(self.subjects.hb(worker), cb=self._on_heartbeat)

    async def _cool_down(self, worker: str) -> None:
        sub = self._hb_subs.pop(worker, None)
        if sub is None:
            return
        log.warning("heartbeat.storm_cooldown", worker=worker, seconds=HB_COOL_DOWN_S)
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        await asyncio.sleep(HB_COOL_DOWN_S)
        self._hb_refused[worker] = 0
        with contextlib.suppress(Exception):
            await self._subscribe_heartbeat(worker)

    async def _on_heartbeat(self, msg) -> None:
        started = time.thread_time()
        handled = False
        try:
            handled = await self._heartbeat(msg)
        finally:  # (no await inside suspends: this is the loop thread's CPU time on one heartbeat)
            self.summary.heartbeat(time.thread_time() - started, handled)

    async def _heartbeat(self, msg) -> bool:
        arrived = time.monotonic()
        token = msg.subject.rsplit(".", 1)[-1]
        now = now_ms()
        if not self.hb_buckets.allow(token, now):
            self._rejected("heartbeat", "rate_limited", "heartbeat budget spent", token, msg.subject, None)
            self._hb_refused[token] += 1
            if self._hb_refused[token] == HB_STORM_REFUSALS:
                asyncio.get_running_loop().create_task(self._cool_down(token))
            return False
        try:
            got = await self.messenger.receive(self.verifier, msg.data, sender_token=token)
        except Rejection as rej:
            h = rej.header
            self._rejected("heartbeat", rej.reason, rej.detail, h.sender if h else None, msg.subject, None)
            return False
        hb: Heartbeat = got.fields  # type: ignore[assignment]
        self._note_heartbeat_gap(got.header.sender, arrived)
        self._feed(WorkerSeen(got.header.sender, hb.num_samples, now_ms()))
        return True

    def _note_heartbeat_gap(self, sender: str, arrived: float) -> None:
        last = self._last_heartbeat.get(sender)
        self._last_heartbeat[sender] = arrived
        gap = arrived - last if last is not None else 0.0
        if gap < HEARTBEAT_GAP_ALIVE_S and gap > self.summary.max_heartbeat_gap_s:
            self.summary.max_heartbeat_gap_s = gap
            hb_s = self.job.transport.heartbeat_s
            if gap > 2 * hb_s and arrived - self._gap_logged > hb_s:  # a new maximum, once per stall
                self._gap_logged = arrived
                log.warning("heartbeat.gap", worker=sender, gap_s=round(gap, 3), phase=self.machine.phase.value)

    async def _consume(self, subjects: list[str], stream: str, durable: str, handler) -> None:
        """Pull from a durable consumer that the server filters to listed workers' subjects:
        junk published under any other id never reaches us, and honest messages never
        queue behind it.

        Messages are handled one at a time. (Reading two 200 MB updates at once measured no
        faster on 2 cores, and two ordered consumers pushing at full speed into one
        connection while the loop folded got it closed by the server as a slow consumer:
        docs/data-path.md.)"""
        config = ConsumerConfig(durable_name=durable, deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.EXPLICIT,
                                ack_wait=ACK_WAIT_S, max_ack_pending=10_000, filter_subjects=subjects)
        try:
            await self.js.add_consumer(stream, config)
        except Exception as exc:  # it exists with another filter (the federation changed): start it afresh
            log.warning("consumer.recreated", durable=durable, error=repr(exc))
            with contextlib.suppress(Exception):
                await self.js.delete_consumer(stream, durable)
            await self.js.add_consumer(stream, config)
        psub = await self.js.pull_subscribe_bind(durable, stream)
        # (nats-py's fetch can swallow a cancellation and time out instead: the loop also
        # ends on its own once the job is done, so shutdown never waits on it.)
        while not self._done.is_set():
            try:
                msgs = await psub.fetch(batch=FETCH_BATCH, timeout=0.5)
            except (TimeoutError, asyncio.TimeoutError):
                continue
            except Exception as exc:  # connection hiccups: keep consuming
                if self.nc.is_closed:
                    return
                log.warning("consumer.fetch_failed", durable=durable, error=repr(exc))
                await asyncio.sleep(0.2)
                continue
            in_hand = self._in_hand[durable] = list(msgs)  # this one and the rest of the batch
            for msg in msgs:
                hold = False
                try:
                    hold = bool(await handler(msg))
                except Exception as exc:  # a bug in one message's handling must not stop the service
                    log.exception("message.handler_failed", subject=msg.subject[:200], error=repr(exc))
                    self._rejected("update", "malformed_body", f"handler failed: {exc!r}", None, msg.subject, None)
                if not hold:
                    with contextlib.suppress(Exception):
                        await msg.ack()
                in_hand.pop(0)

    async def _keep_unacked_alive(self) -> None:
        """Updates wait unacknowledged until their round commits; tell the server we
        are still working on them so it does not redeliver them meanwhile."""
        while True:
            await asyncio.sleep(ACK_WAIT_S / 4)
            for msgs in [*self._unacked.values(), *self._in_hand.values()]:
                for msg in msgs:
                    with contextlib.suppress(Exception):
                        await msg.in_progress()

    async def _ack_through(self, round_: int) -> None:
        await self._ack([k for k in self._unacked if k[0] <= round_])

    async def _ack(self, keys) -> None:
        for key in sorted(keys):
            for msg in self._unacked.pop(key, ()):
                with contextlib.suppress(Exception):
                    await msg.ack()
        if not self._unacked:
            self._held_nonces.clear()

    @staticmethod
    def _delivery(msg) -> tuple[int, int | None]:
        """(how many times delivered, when the stream stored it in ms)."""
        try:
            md = msg.metadata
            return int(md.num_delivered), int(md.timestamp.timestamp() * 1000)
        except Exception:
            return 1, None

    async def _on_update(self, msg) -> bool:
        """Verify an update and feed it to the machine; True to hold it unacknowledged."""
        parts = msg.subject.split(".")
        token = parts[-1]
        delivered, stored_ms = self._delivery(msg)
        if delivered > 1:
            self.summary.redeliveries += 1  # the server gave up waiting for our ack (or we restarted)
        if delivered == 1 and not self.upd_buckets.allow(token, now_ms()):
            self._rejected("update", "rate_limited", "update budget spent", token, msg.subject, None)
            return False
        try:
            got = await self.messenger.receive(
                self.verifier, msg.data, sender_token=token, stored_ms=stored_ms, offload=True,
                round_ok=self._update_round_ok)
            self._expect(got, self._update_types,
                         "an update subject" + (" of a secure-aggregation job" if self.secure is not None else ""))
            sender = self.federation.get(got.header.sender)
            if sender is not None and sender.region != parts[-2]:
                raise Rejection("subject_mismatch", f"region {parts[-2]} is not {sender.region}", got.header)
            if self.secure is not None:  # (a plaintext update was refused by _expect)
                self.secure.offer(got)
                return False  # its round's exchange has it; a redelivery could not be used again
            upd: Update = got.fields  # type: ignore[assignment]
            # The receiving half of the workers' pipeline (every stage's decode, in reverse).
            update = decode_received(self.pipeline, got.header, upd, got.tensors,
                                     self.machine.base_for(upd.base_version))
        except Rejection as rej:
            h = rej.header
            if h is not None and self._copy_of_accepted(rej, h, msg, delivered):
                return h.nonce in self._held_nonces
            self._rejected("update", rej.reason, rej.detail, h.sender if h else None, msg.subject,
                           h.round if h else None)
            return False
        event = UpdateReceived(
            worker_id=got.header.sender, round=got.header.round, now_ms=now_ms(), digest=got.header.digest,
            base_version=upd.base_version, update=update,
            train_metrics=upd.train_metrics, eval_metrics=upd.eval_metrics, eval_samples=upd.eval_samples)
        actions = self._feed(event)
        mine = [a for a in actions if getattr(a, "worker_id", None) == event.worker_id
                and isinstance(a, (RejectUpdate, DuplicateIgnored))]
        if mine:
            return False
        # Held until the model that folds it is committed: its round's, or for a late update
        # (late_updates: next_round) the next round's.
        until = next((a.until_round for a in actions if isinstance(a, Deferred) and a.worker_id == event.worker_id),
                     event.round)
        self.summary.update_bytes += got.header.length  # the signed body length: what crossed the bus
        self._unacked.setdefault((until, event.worker_id), []).append(msg)
        self.summary.updates_sealed += got.sealed
        self._held_nonces.add(got.header.nonce)
        self.registrar.note_update(event.round, event.worker_id, got.header.digest)
        self._accepted_nonces[got.header.nonce] = _seq(msg)
        while len(self._accepted_nonces) > ACCEPTED_NONCES:
            self._accepted_nonces.popitem(last=False)
        log.debug("update.accepted", worker=event.worker_id, round=event.round, samples=upd.num_samples)
        return True

    def _copy_of_accepted(self, rej: Rejection, header, msg, delivered: int) -> bool:
        """Another copy of an update this job already accepted: not an attack, do not report it.

        * A redelivery whose nonce we remember (replayed_nonce on num_delivered > 1, or the
          nonce of an update this process accepted): JetStream gave it back because an ack
          or keep-alive was late or lost. Held ones stay held; the rest are acknowledged.
        * A late copy for a round that already closed (wrong_round) from a worker whose
          update that round accepted: a redelivery after a resume, or a worker's resend of
          its stored update after the round closed without needing it.
        """
        seq = _seq(msg)
        same_message = seq is not None and self._accepted_nonces.get(header.nonce) == seq
        if rej.reason == "replayed_nonce" and (delivered > 1 or same_message):
            # (A server restart can forget delivery counts: the same nonce at the same stream
            # sequence is the message we accepted; at another sequence it is a replay.)
            if header.nonce in self._held_nonces:
                key = (header.round, header.sender)
                if key not in self._unacked:  # a late update held for the round after its own
                    key = next((k for k in self._unacked if k[1] == header.sender and k[0] > header.round), key)
                self._unacked.setdefault(key, []).append(msg)
            log.debug("update.redelivered", sender=header.sender, round=header.round, delivered=delivered)
            return True
        if rej.reason == "wrong_round" and (self.machine.already_accepted(header.sender, header.round)
                                            or (delivered > 1 and header.round < self.machine.round)):
            # Redelivered to a later incarnation, or resent after the round closed without it.
            log.debug("update.copy_after_close", sender=header.sender, round=header.round, delivered=delivered)
            return True
        return False

    @property
    def _update_types(self) -> frozenset[str]:
        """What may arrive on update subjects: updates, or with secure aggregation the workers'
        secagg.* messages."""
        return frozenset(SECAGG_TYPES) if self.secure is not None else frozenset({Update.TYPE})

    def _expect(self, got, msg_type: str | frozenset[str], where: str) -> None:
        """Raise Rejection unless ``got`` is a ``msg_type`` (or one of them) of this run
        (``where``: its subject)."""
        if got.header.type not in ({msg_type} if isinstance(msg_type, str) else msg_type):
            raise Rejection("unknown_type", f"{got.header.type} on {where}", got.header)
        if got.header.run != self.run_id:
            raise Rejection("wrong_run", f"run {got.header.run}", got.header)

    async def _on_partial(self, msg) -> bool:
        """Verify a regional partial aggregate and its contributors' proofs; True to hold it
        unacknowledged until its round commits."""
        region = msg.subject.rsplit(".", 1)[-1]
        delivered, stored_ms = self._delivery(msg)
        if delivered == 1 and not self.upd_buckets.allow(f"agg:{region}", now_ms()):
            self._rejected("partial", "rate_limited", "partial budget spent", region, msg.subject, None)
            return False
        try:
            got = await self.messenger.receive(
                self.verifier, msg.data, stored_ms=stored_ms, offload=True,
                round_ok=lambda h: self.machine.accepts_round(h.type, h.round))
            h = got.header
            self._expect(got, Partial.TYPE, "a partial subject")
            body: Partial = got.fields  # type: ignore[assignment]
            partial, contributors, tickets = await asyncio.to_thread(
                verified_partial, self.federation, self.job.job, self.run_id, got, region,
                same_round=self.job.mode == "sync")
        except Rejection as rej:
            h = rej.header or (got.header if "got" in locals() else None)
            if h is not None and rej.reason == "replayed_nonce" and delivered > 1:
                return False  # a redelivery of a partial this process saw: its round's commit acks it
            self._rejected("partial", rej.reason, rej.detail, h.sender if h else None, msg.subject,
                           h.round if h else None)
            return False
        event = PartialReceived(h.sender, region, h.round, partial, contributors, now_ms(), digest=h.digest,
                                train_metrics=dict(body.train_metrics), metrics_weight=body.metrics_weight,
                                tickets=tickets)
        actions = self._feed(event)
        if any(isinstance(a, (RejectUpdate, DuplicateIgnored)) and a.worker_id == h.sender for a in actions):
            return False
        self.registrar.note_update(h.round, region, h.digest)
        if self.job.mode == "async":
            # Acknowledged when the version folding its updates commits (AckUpdates by worker and ticket).
            for (worker, _, _), ticket in zip(contributors, tickets):
                self._unacked.setdefault((ticket, worker), []).append(msg)
        else:
            self._unacked.setdefault((h.round, h.sender), []).append(msg)
        # Each proof is a contributor's signed update header (verified above): it says whether
        # the update travelled sealed to the region's aggregator.
        self.summary.updates_sealed += sum(decode_header(unb64(p)[:-SIGNATURE_LEN]).sealed_to is not None
                                           for p in body.proofs)
        metrics().partial_accepted(region)
        log.debug("partial.accepted", region=region, round=h.round, contributors=len(contributors))
        return True

    async def _on_eval_report(self, msg) -> bool:
        delivered, stored_ms = self._delivery(msg)
        try:
            got = await self.messenger.receive(self.verifier, msg.data, sender_token=msg.subject.rsplit(".", 1)[-1],
                                               stored_ms=stored_ms,
                                               round_ok=lambda h: self.machine.accepts_round(h.type, h.round))
            self._expect(got, EvalReport.TYPE, "a metrics subject")
        except Rejection as rej:
            h = rej.header
            if not (delivered > 1 and rej.reason in ("replayed_nonce", "wrong_round")):
                self._rejected("metrics", rej.reason, rej.detail, h.sender if h else None, msg.subject,
                               h.round if h else None)
            return False
        rep: EvalReport = got.fields  # type: ignore[assignment]
        self._feed(EvalReceived(got.header.sender, got.header.round, rep.num_samples, rep.metrics, now_ms()))
        return False

    # ---- outputs -----------------------------------------------------------------------

    async def _act(self) -> None:
        while True:
            action = await self._actions.get()
            try:
                await self._perform(action)
            except Exception as exc:
                log.exception("action.failed", action=type(action).__name__, error=repr(exc))
                if isinstance(action, (OpenRound, CloseRound, OpenEval, FinishJob)):
                    # An announcement that cannot go out (after retries) must not leave
                    # workers waiting forever: end the job and say why.
                    await self._stop(f"{type(action).__name__.lower()}_publish_failed", exc)

    async def _announce_done_again(self) -> None:
        """The job's end is committed, but a kill between that commit and the job.done
        announcement would leave the workers waiting for it: announce it again. Workers end
        at the first job.done of the run they serve, so a second one changes nothing."""
        record = self._done_record
        try:
            await self._publish_job_done(record.reason or "completed", record.rounds_completed,
                                         record.model_version, record.round)
        except Exception as exc:  # the results stand; the workers' own deadlines end them
            log.warning("job.done.announce_failed", error=repr(exc)[:300])
            return
        log.info("job.done.announced_again", reason=record.reason, rounds_completed=record.rounds_completed)

    async def _stop(self, reason: str, exc: Exception) -> None:
        self.summary.reason = reason
        self.summary.error = repr(exc)[:300]
        self.exit_code = 1
        with contextlib.suppress(Exception):
            await self._publish_job_done(reason, self.machine.rounds_completed, self.machine.model_version,
                                         self.machine.round)
        self._done.set()

    async def _publish_job_done(self, reason: str, rounds_completed: int, model_version: int, round_: int,
                                metrics: dict | None = None) -> None:
        """The job is over, for the workers of this run: they exit at the first one."""
        await self.messenger.publish(self.subjects.ctl("job.done"), JobDone(
            rounds_completed=rounds_completed, model_version=model_version, metrics=metrics or {}, reason=reason),
            round=round_, run=self.run_id)

    async def _perform(self, action) -> None:
        match action:
            case Aggregate():
                await self._aggregate(action)
            case Commit():
                await self._commit(action)
            case AckThrough():
                await self._ack_through(action.round)
            case AckUpdates():
                await self._ack((ticket, worker) for worker, ticket in action.keys)
            case Deferred():
                log.debug("update.deferred", worker=action.worker_id, round=action.round,
                          until_round=action.until_round)
            case OpenRound():
                await self._open_round(action)
            case CloseRound():
                await self._close_round(action)
            case RejectUpdate():
                self._rejected("update", action.reason, action.detail, action.worker_id, "", action.round,
                               counted_by_machine=True)
            case DuplicateIgnored():
                log.debug("update.duplicate_ignored", worker=action.worker_id, round=action.round)
            case OpenEval():
                await self._open_eval(action)
            case FinishJob():
                await self._finish(action)
            case RollbackRefused():
                self._rejected("models", action.reason, action.detail, None, self.subjects.ctl(ModelCommand.TYPE), None,
                               counted_by_machine=True)
            case InternalError():
                log.error("machine.internal_error", event=action.event, error=action.error)

    async def _aggregate(self, a: Aggregate) -> None:
        span = self._round_spans.get(a.round)
        ctx = otel_trace.set_span_in_context(span) if span else None
        with self.tracer.start_as_current_span("coordinator.aggregate", context=ctx):
            try:
                state = await asyncio.to_thread(a.compute)
            except AGGREGATION_ERRORS as exc:  # e.g. a robust rule whose precondition the updates cannot meet
                self._feed(AggregationFailed(a.round, str(exc), now_ms()))
                return
        # Measured before the commit, so the committed round carries its test metrics.
        with self.tracer.start_as_current_span("coordinator.evaluate", context=ctx):
            metrics = await asyncio.to_thread(self._evaluate, state)
        self._feed(Aggregated(a.round, state, now_ms(), metrics))

    async def _commit(self, c: Commit) -> None:
        error: Exception | None = None
        give_up = time.monotonic() + COMMIT_BUDGET_S
        attempt = 0
        while True:
            attempt += 1
            try:
                await self.jobstate.commit(run=self.run_id, record=c.record, model=c.model,
                                           strategy_state=c.strategy_state, now_ms=now_ms())
                self._feed(Committed(c.seq, now_ms()))
                await self._after_commit(c)
                return
            except Exception as exc:
                error = exc
                log.warning("commit.failed", attempt=attempt, error=repr(exc))
                if "wrong last sequence" in repr(exc).lower():
                    break  # another coordinator advanced the job: retrying cannot help
                if time.monotonic() + 0.5 > give_up:
                    break
                await asyncio.sleep(min(2.0, 0.5 * attempt))
        self.summary.error = repr(error)[:300]
        self.exit_code = 1
        self._feed(CommitFailed(c.seq, repr(error), now_ms()))

    async def _after_commit(self, c: Commit) -> None:
        """The registry and retention follow each commit; neither may fail the job."""
        budget = getattr(self.machine, "privacy", None)
        try:
            await self.registrar.record(c.record, c.model, self.run_id, budget.epsilon if budget else None, now_ms())
        except Exception as exc:
            log.warning("registry.manifest_failed", version=c.record.model_version, error=repr(exc)[:300])
        if c.record.last_close is None:
            return  # retention runs once per closed round
        try:
            await self.registrar.retain(c.record.model_version, self._blobs_done_through(c.record))
            if self.job.topology != "regional" and not self.job.retention.keep_updates:
                await purge_acknowledged(self.js, self.subjects.upd_stream, "coordinator-updates")
        except Exception as exc:
            log.warning("retention.failed", error=repr(exc)[:300])

    def _blobs_done_through(self, record) -> int | None:
        """The last round whose claim-check blobs nothing will read again (sync mode): the
        closed round, minus one if its late updates are still welcome, and below every
        update still held (a late update's blob carries the round before the one that holds it)."""
        if self.job.mode != "sync":
            return None  # async tickets interleave; their blobs are left to the bucket's owner
        through = int(record.last_close["round"]) - (1 if self.job.late_updates == "next_round" else 0)
        if self._unacked:
            through = min(through, min(k[0] for k in self._unacked) - 2)
        return through if through >= 1 else None

    async def _on_model_command(self, msg) -> None:
        """A signed ``fedbus models rollback``: verify it and the target version, then feed it."""
        seq, stored_ms = stored_ms_of(msg)
        if stored_ms is not None and stored_ms < self._started_ms:
            return  # issued before this process ran (an earlier incarnation applied it, or nobody was up)
        try:
            got = await self.messenger.receive(self.verifier, msg.data, stored_ms=stored_ms)
            self._expect(got, ModelCommand.TYPE, "the models subject")
        except Rejection as rej:
            h = rej.header
            self._rejected("models", rej.reason, rej.detail, h.sender if h else None, msg.subject, None)
            return
        cmd: ModelCommand = got.fields  # type: ignore[assignment]
        sender = got.header.sender
        if self.job.mode != "sync":
            self._rejected("models", "rollback_unsupported", "rollback needs mode: sync", sender, msg.subject, None)
            return
        try:
            manifest, state = await load_version(self.registrar.registry, self.nc, self.js, cmd.version)
        except KeyError as exc:
            self._rejected("models", "unknown_version", str(exc), sender, msg.subject, None)
            return
        except Exception as exc:  # forged manifest, tampered or missing object
            self._rejected("models", "invalid_version", repr(exc)[:200], sender, msg.subject, None)
            return
        log.warning("model.rollback_requested", version=cmd.version, digest=manifest.model_digest[:20], signer=sender,
                    seq=seq, reason=cmd.reason[:200], current_version=self.machine.model_version)
        self.audit_queue.submit("model.rollback", version=cmd.version, signer=sender, reason=cmd.reason,
                                model_digest=manifest.model_digest)
        self._feed(RollbackRequested(cmd.version, state, now_ms()))

    def _span_for(self, a: OpenRound):
        """The trace a round.open belongs to: its round's, or in async mode the trace of the
        version being built (one trace per model version: any assignment handed out while
        version v + 1 is built is work towards it, whatever model it carries)."""
        if self.job.mode == "async":
            return self._version_span()
        span = self.tracer.start_span("round", attributes={
            "fedbus.job": self.job.job, "fedbus.run": self.run_id, "fedbus.round": a.round,
            "fedbus.model_version": a.model_version, "fedbus.cohort_size": len(a.cohort)})
        self._round_spans[a.round] = span
        return span

    def _version_span(self):
        key = self.machine.model_version + 1
        if key not in self._round_spans:
            self._round_spans[key] = self.tracer.start_span("version", attributes={
                "fedbus.job": self.job.job, "fedbus.run": self.run_id, "fedbus.model_version": key})
        return self._round_spans[key]

    def _model_by_reference(self, body, tensors: dict, model: dict, version: int):
        """An announcement of a model above the inline limit points at the version's committed
        object (``model``) instead of carrying the model: it is then written once per version
        (by the commit), not once more per announcement, and workers read it from the models
        bucket. The strategy's broadcast groups stay in the body."""
        ref = self.jobstate.model_ref_for(version)
        if ref is None or state_bytes(model) <= self.job.transport.inline_max_bytes:
            return body, tensors
        return (body.model_copy(update={"model": BlobPointer(**ref)}),
                {k: v for k, v in tensors.items() if k not in model})

    async def _page_out_model(self, a: OpenRound) -> None:
        """Move a large model out of anonymous memory until it is needed again.

        Once a round is announced, nothing reads the model until the round is aggregated
        (a lean fold adds updates to its sums, never reads the base): its tensors are written
        to an unlinked file in ``<run-dir>/spill`` and rebound in place to a mapping of it
        (``fedbus.spill.prepare_page_out``), so the memory that holds them is the file's page
        cache, which the kernel may drop and read back, until finalize reads the base again.
        That keeps a round's peak at the sums plus one update in hand (docs/data-path.md). The
        file is written in a worker thread (it only reads the tensors: the commit and the
        registry digest are done, the announcement points at the committed object); the
        rebinding, which swaps storages, runs here on the loop."""
        if (self.page_out_above is None or a.model_version == self._paged_version
                or state_bytes(a.state) < self.page_out_above):
            return
        directory = self.run_dir / "spill"
        try:
            directory.mkdir(exist_ok=True)
            rebind = await asyncio.to_thread(prepare_page_out, a.state, directory)
        except OSError as exc:  # a full or missing disk: the model stays in memory
            log.warning("model.page_out_failed", model_version=a.model_version, error=repr(exc)[:200])
            return
        rebind()
        self._paged_version = a.model_version
        log.info("model.paged_out", model_version=a.model_version, bytes=state_bytes(a.state))

    async def _open_round(self, a: OpenRound) -> None:
        span = self._span_for(a)
        traceparent = inject_trace_headers(otel_trace.set_span_in_context(span)).get("traceparent")
        body, tensors = self._model_by_reference(*round_open_message(self.job, a), a.state, a.model_version)
        await self.messenger.publish(self.subjects.ctl("round.open"), body, tensors,
                                     round=a.round, trace=traceparent, run=self.run_id)
        if self.secure is not None:
            self.secure.open(a)
        await self._page_out_model(a)
        if self.job.mode == "async":
            log.info("work.assigned", ticket=a.round, model_version=a.model_version, workers=len(a.cohort))
        else:
            log.info("round.opened", round=a.round, model_version=a.model_version, cohort=len(a.cohort))

    def _evaluate(self, state) -> dict[str, float]:
        if self.test_data is None:
            return {}
        self.model.load_state_dict(state)
        result = self.task.evaluate(self.model, self.test_data)
        return {"test_loss": float(result.loss), "test_accuracy": float(result.accuracy)}

    async def _close_round(self, a: CloseRound) -> None:
        span = self._round_spans.pop(a.round, None)
        round_metrics = dict(a.metrics)
        body = RoundClose(round=a.round, model_version=a.model_version, status=a.status, accepted=list(a.accepted),
                          rejected=a.rejected, seconds=a.seconds, metrics=finite_metrics(round_metrics))
        # Committed already (the machine announces only what was committed).
        await self.messenger.publish(self.subjects.ctl("round.close"), body, round=a.round, run=self.run_id)
        self.summary.add_round(close_row(a))
        self.summary.rounds_completed = self.machine.rounds_completed
        self.summary.model_version = a.model_version
        self._count_accepted()
        self.summary.set_rejections(self.ledger.totals)
        # Audited before it is summarised: a round in summary.json is in the audit chain.
        await self.audit.publish("round.closed", round=a.round, run=self.run_id, status=a.status,
                                 model_version=a.model_version,
                                 accepted=list(a.accepted))
        self._note_privacy(a.round)
        if self.secure is not None:
            self.summary.privacy["secure_aggregation"] = list(self.secure.rounds)
        await asyncio.to_thread(self.summary.write, self.run_dir / "summary.json")
        metrics().committed(sync=self.job.mode == "sync", round_=a.round, model_version=a.model_version,
                            status=a.status, seconds=a.seconds, staleness=list(a.staleness),
                            model_metrics=round_metrics)
        # In the round's span, so the line carries its trace id.
        with otel_trace.use_span(span, end_on_exit=False) if span else contextlib.nullcontext():
            log.info("version.committed" if self.job.mode == "async" else "round.closed", round=a.round,
                     status=a.status, seconds=round(a.seconds, 4), accepted=len(a.accepted) + len(a.late),
                     staleness=list(a.staleness), **{k: round(v, 4) for k, v in round_metrics.items()})
        if span:
            span.set_attribute("fedbus.status", a.status)
            span.set_attribute("fedbus.accepted", len(a.accepted))
            if a.staleness:
                span.set_attribute("fedbus.staleness", list(a.staleness))
            for k, v in round_metrics.items():
                span.set_attribute(f"fedbus.{k}", v)
            span.end()
        if self.job.mode == "async" and self.machine.rounds_completed < self.job.rounds:
            self._version_span()  # the next version's trace starts when this one is committed

    def _count_accepted(self) -> None:
        """summary.json's updates_accepted, and the live counter by as many: both count the
        updates folded into committed models (held ones come back after a crash)."""
        total = self.machine.accepted_total
        self.summary.updates_accepted = total
        metrics().accepted(total - self._accepted_counted)
        self._accepted_counted = max(self._accepted_counted, total)

    def _note_privacy(self, round_: int | None) -> None:
        """ε so far into summary.json and the log (``privacy.epsilon``), after every round and at the end."""
        budget = getattr(self.machine, "privacy", None)
        if budget is None:
            return
        self.summary.privacy = privacy_summary(self.job, budget)
        metrics().privacy(budget.epsilon, budget.max_epsilon)
        log.info("privacy.epsilon", round=round_, epsilon=round(budget.epsilon, 6), delta=budget.target_delta,
                 max_epsilon=budget.max_epsilon, rounds_accounted=budget.rounds_accounted)

    async def _open_eval(self, a: OpenEval) -> None:
        span = self.tracer.start_span("final_evaluation", attributes={
            "fedbus.job": self.job.job, "fedbus.round": a.round, "fedbus.model_version": a.model_version})
        self._round_spans[a.round] = span
        traceparent = inject_trace_headers(otel_trace.set_span_in_context(span)).get("traceparent")
        body, tensors = self._model_by_reference(*eval_open_message(a), a.state, a.model_version)
        await self.messenger.publish(self.subjects.ctl("eval.open"), body, tensors, round=a.round, trace=traceparent,
                                     run=self.run_id)
        log.info("eval.opened", round=a.round, model_version=a.model_version, cohort=len(a.cohort))

    async def _finish(self, a: FinishJob) -> None:
        for span in self._round_spans.values():
            span.end()
        self._round_spans.clear()
        final = await asyncio.to_thread(self._evaluate, self.machine.state)
        metrics = {**final, **a.metrics}
        self.summary.finish(a.reason, a.rounds_completed, a.model_version, metrics)
        self._count_accepted()
        self._note_privacy(None)
        if a.reason == "commit_failed":
            self.exit_code = 1
        await self._publish_job_done(a.reason, a.rounds_completed, a.model_version, self.machine.round,
                                     finite_metrics(metrics))
        await self.audit.publish("job.done", reason=a.reason, rounds_completed=a.rounds_completed, run=self.run_id)
        if self.job.mode == "sync" and not self.job.retention.keep_updates:
            # Nothing reads this job's claim checks any more: the last rounds' ones (kept while
            # their updates were held) would otherwise stay in the bucket, a model's size each.
            try:
                await self.registrar.retain(a.model_version, self.machine.round)
            except Exception as exc:
                log.warning("retention.failed", error=repr(exc)[:300])
        await asyncio.to_thread(atomic_torch_save, self.machine.state, self.run_dir / "final_model.pt")
        log.info("job.done", reason=a.reason, rounds=a.rounds_completed, **{k: round(v, 4) for k, v in metrics.items()})
        self._done.set()
