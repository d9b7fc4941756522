"""VersionStateMachine: asynchronous federation (FedBuff, FedAsync) as a sans-I/O state machine.

No rounds: the machine hands *assignments* to idle live workers — at most ``concurrency``
train at once — and every ``buffer_size`` verified updates make the next model version.
It speaks the sync machine's vocabulary (``rounds.py``), so the NATS service, the
simulator and the workers run it unchanged:

* ``OpenRound`` is a dispatch: ``round`` is a ticket (monotonic over the job), ``cohort``
  the workers told to train ``model_version`` now. A worker answers exactly as in a sync
  round: its update's header round is the ticket, its body's base_version the version.
* An update is checked like a sync one (claims bounded, tensors checked), then weighed by
  its staleness τ = current version − base version: rejected as ``too_stale`` beyond
  ``max_staleness``, else folded into the buffer as s(τ)·Δ (FedBuff) or α·s(τ)·(y − x_t)
  (FedAsync). Δ is taken against the model the worker trained from, so the machine keeps
  the last ``max_staleness`` + 1 models.
* A full buffer becomes ``Aggregate`` (off the loop); ``Aggregated`` proposes the commit of
  version + 1; once ``Committed``, the folded updates are acknowledged (``AckUpdates``)
  and the version is announced as ``CloseRound(round = model_version = version)``.

Nothing is announced before it is committed: a dispatch is a commit too (the record
lists every outstanding assignment), so a resumed coordinator knows who is training what
and re-announces it. Updates stay unacknowledged until the version that folds them is
committed; after a crash they come back and are accepted again (the record lists them),
and the record's recent folds make a redelivered, already-committed update a duplicate.
Updates arriving while a version is being aggregated or committed wait, and are folded
into the next buffer with the staleness they have then.
"""

from __future__ import annotations

import enum
import hashlib
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

from fedbus.aggregation import fedasync, fedbuff
from fedbus.aggregation.base import AggregationRule, ClientUpdate, InvalidUpdate, ServerOptimizer, State, is_averageable
from fedbus.aggregation.fedavg import FedAvg
from fedbus.aggregation.staleness import Staleness, polynomial
from fedbus.coordinator.machine import MachineBase
from fedbus.coordinator.metrics import weighted_means
from fedbus.coordinator.records import JobRecord
from fedbus.coordinator.registry import WorkerRegistry
from fedbus.aggregation.partial import discounted_partial
from fedbus.coordinator.rounds import (AckThrough, Aggregate, Aggregated, AggregationFailed, CloseRound, Commit,
                                       CommitFailed, Committed, Deferred, DuplicateIgnored, EvalReceived, FinishJob,
                                       MessageRejected, OpenEval, PartialReceived, OpenRound, RejectUpdate,
                                       RoundPolicy, Start, Tick, UpdateReceived, WorkerSeen, close_row)
from fedbus.protocol.codec import TensorSpec, spec_of

# Folded (worker, ticket) pairs of committed versions remembered, to tell a redelivery after
# a crash from news; at least this many, and four buffers' worth.
RECENT_FOLDS = 256
# Expired assignments whose late update is still welcome (if not too stale), at most.
LATE_TICKETS = 10_000


@dataclass(frozen=True)
class AsyncPolicy:
    """``base`` carries what both modes share (versions to commit as ``rounds``, liveness,
    waiting, caps on claims, final evaluation); ``round_deadline_ms`` is how long an
    assignment holds its slot."""

    base: RoundPolicy
    buffer_size: int = 3
    concurrency: int | None = None
    staleness: Staleness = field(default_factory=polynomial)
    max_staleness: int = 10
    algorithm: str = "fedbuff"  # "fedbuff" | "fedasync"
    server_lr: float = 1.0
    alpha: float = 0.6


@dataclass(frozen=True)
class AckUpdates:
    """These (worker, ticket) updates are committed (or refused after being held): acknowledge them."""

    keys: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Assignment:
    worker: str
    ticket: int
    version: int
    issued_ms: int


@dataclass
class _Buffered:
    worker: str
    ticket: int
    base_version: int
    digest: bytes
    samples: int
    staleness: int = 0
    excused: bool = False  # accepted by a dead predecessor: not refused for staleness
    region: str = ""  # topology: regional: whose partial carried it


class Phase(enum.Enum):
    CREATED = "created"
    WAITING_FOR_WORKERS = "waiting_for_workers"
    RUNNING = "running"
    EVALUATING = "evaluating"
    DONE = "done"


@dataclass
class _Pending:
    seq: int
    kind: str  # "version" | "dispatch" | "eval" | "finish"
    announce: list


class VersionStateMachine(MachineBase):
    """Drives one asynchronous job from the initial model to version ``rounds``."""

    def __init__(self, policy: AsyncPolicy, initial_state: State, *, rule: AggregationRule | None = None,
                 optimizer: ServerOptimizer | None = None, num_workers_total: int | None = None):
        self.policy = policy
        self.base = policy.base
        self.limits = policy.base
        self.state = initial_state
        self.model_spec: dict[str, TensorSpec] = spec_of(initial_state)
        self.float_spec = {k: v for k, v in self.model_spec.items() if is_averageable(initial_state[k])}
        self.rule = rule or FedAvg()
        self.rule.check_cohort(policy.buffer_size)
        self.optimizer = optimizer
        self.num_workers_total = num_workers_total
        self.update_groups: tuple[str, ...] = tuple(getattr(self.rule, "update_groups", ()))
        self.registry = WorkerRegistry(self.base.liveness_ms)
        self.last_error: str | None = None
        self.phase = Phase.CREATED
        self.model_version = 0
        self.rounds_completed = 0  # versions committed by this job
        self.round = 0  # the last ticket issued (the sync machine's round, for the service)
        self.rejections: Counter[str] = Counter()
        self._accepted = 0  # accepted since the start, folded or still held (see accepted_total)
        self.started_ms: int | None = None
        self.history: dict[int, State] = {0: initial_state}
        self.outstanding: dict[str, Assignment] = {}
        self._late_tickets: OrderedDict[tuple[str, int], int] = OrderedDict()  # expired: (w, t) -> version
        self._declared_counts: dict[str, int] = {}  # sample counts of workers with assignments, committed with them
        self._last_assigned: dict[str, int] = {}
        self._buffer: list[_Buffered] = []
        self._accumulator = self.rule.begin(self.state, self.model_version)
        self._waiting: list[tuple[UpdateReceived, _Buffered]] = []  # arrived while a version was in flight
        # Regional partials (each one base version's sums) that arrived while a version was in flight.
        self._waiting_partials: list[tuple[PartialReceived, list[_Buffered]]] = []
        self._recent: OrderedDict[tuple[str, int], bytes] = OrderedDict()  # folded into committed versions
        self._aggregating: Aggregate | None = None
        self._in_flight: list[_Buffered] = []  # the buffer being aggregated and committed
        self._pending: _Pending | None = None
        self._ready: Aggregated | None = None  # an aggregate waiting for a dispatch commit to land
        self._commit_seq = 0
        self._version_started_ms = 0
        self._wait_started_ms = 0
        self._version_rejections: Counter[str] = Counter()
        self._train_metrics: list[tuple[float, dict[str, float]]] = []
        self._resumed: str | None = None  # the committed phase this machine continues from
        # Held updates of a dead predecessor not seen again yet, and until when the last
        # version waits for them (they come back on a resend or after the stream's ack wait).
        self._expected_back: dict[tuple[str, int], int] = {}  # -> the version it trained from (kept)
        self._expect_until_ms = 0
        self._reannounce: list[Assignment] = []
        # final evaluation
        self.cohort: tuple[str, ...] = ()
        self.deadline_ms = 0
        self._eval_reported: set[str] = set()
        self._eval_metrics: list[tuple[float, dict[str, float]]] = []

    # ---- queries the service uses ------------------------------------------------------

    def accepts_round(self, msg_type: str, round_: int) -> bool:
        if msg_type == "update":
            return self.phase is Phase.RUNNING and 0 < round_ <= self.round
        if msg_type == "eval.report":
            return self.phase is Phase.EVALUATING and round_ == self.round
        return True

    @property
    def finished(self) -> bool:
        return self.phase is Phase.DONE

    @property
    def failed_in_a_row(self) -> int:
        return 0

    def alive_workers(self, now_ms: int) -> list[str]:
        return self.registry.alive(now_ms)

    def already_accepted(self, worker: str, ticket: int) -> bool:
        key = (worker, ticket)
        return key in self._recent or any((b.worker, b.ticket) == key for b in self._held())

    @property
    def accepted_total(self) -> int:
        """Updates folded into committed versions. Held ones (buffered, waiting, being
        committed) are not counted yet: after a crash they come back and are accepted again."""
        return self._accepted - len(self._held())

    def _held(self) -> list[_Buffered]:
        return [*self._in_flight, *self._buffer, *(b for _, b in self._waiting),
                *(b for _, entries in self._waiting_partials for b in entries)]

    def _declared(self, worker: str) -> int | None:
        return self._declared_counts.get(worker, self.registry.declared(worker))

    # ---- the single entry point (MachineBase.handle) ------------------------------------

    def _dispatch(self, event, out: list) -> None:
        match event:
            case Start(now_ms=now):
                self._on_start(now, out)
            case WorkerSeen(worker_id=w, num_samples=n, now_ms=now):
                self.registry.seen(w, n, now)
                self._progress(now, out)
            case Tick(now_ms=now):
                self._on_tick(now, out)
            case UpdateReceived():
                self._on_update(event, out)
                self._progress(event.now_ms, out)
            case PartialReceived():
                self._on_partial(event, out)
                self._progress(event.now_ms, out)
            case EvalReceived():
                self._on_eval(event, out)
            case MessageRejected(reason=reason, count=count):
                self.rejections[reason] += count
                self._version_rejections[reason] += count
            case Aggregated():
                self._on_aggregated(event, out)
            case AggregationFailed():
                self._on_aggregation_failed(event, out)
            case Committed():
                self._on_committed(event, out)
            case CommitFailed():
                self._on_commit_failed(event, out)
            case _:
                raise TypeError(f"unknown event {event!r}")

    # ---- resume --------------------------------------------------------------------------

    def restore(self, record: JobRecord, state: State, strategy_state: dict | None = None,
                history: Mapping[int, State] | None = None) -> None:
        """Continue from the last committed record (call before Start).

        Outstanding assignments are re-announced at Start; updates that were accepted but
        not committed come back unacknowledged and are accepted again; folds of committed
        versions are remembered so their redeliveries are duplicates."""
        if self.phase is not Phase.CREATED:
            raise RuntimeError("restore() must come before Start")
        if spec_of(state) != self.model_spec:
            raise ValueError("the committed model does not match the task's model")
        self.model_version = record.model_version
        self.rounds_completed = record.rounds_completed
        self._accepted = record.accepted_total
        self.round = record.round
        self.state = state
        self.started_ms = record.started_ms or None
        self.history = dict(history or {})  # (the store keeps max_staleness versions)
        self.history[self.model_version] = state
        if strategy_state:
            self._load_strategy_state(strategy_state)
        self._accumulator = self.rule.begin(self.state, self.model_version)
        a = record.async_state or {}
        self._declared_counts = {str(k): int(v) for k, v in record.declared.items()}
        for w, ticket, version in a.get("outstanding", ()):
            if int(version) in self.history:
                self._reannounce.append(Assignment(str(w), int(ticket), int(version), 0))
            else:  # its model is gone: its answer is too stale, as it would have been had we lived
                self._late_tickets[(str(w), int(ticket))] = int(version)
        for w, ticket, version in a.get("late", ()):
            self._late_tickets[(str(w), int(ticket))] = int(version)
        for w, ticket, version in a.get("held", ()):
            # Accepted by the dead coordinator, never committed: redelivered once the stream's
            # ack wait passes, and announced again at Start so that the worker resends it now.
            self._late_tickets[(str(w), int(ticket))] = int(version)
            self._expected_back[(str(w), int(ticket))] = int(version)
            if int(version) in self.history:
                self._reannounce.append(Assignment(str(w), int(ticket), int(version), 0))
        for w, ticket, digest in a.get("recent", ()):
            self._recent[(str(w), int(ticket))] = bytes.fromhex(digest)
        self._resumed = record.phase
        self.cohort = tuple(record.cohort)

    def _async_state(self) -> dict:
        held = [[b.worker, b.ticket, b.base_version] for b in self._held()]
        return {"outstanding": [[a.worker, a.ticket, a.version] for a in self.outstanding.values()],
                "late": [[w, t, v] for (w, t), v in self._late_tickets.items()],
                "held": held,
                "recent": [[w, t, d.hex()] for (w, t), d in self._recent.items()]}

    # ---- transitions -------------------------------------------------------------------

    def _on_start(self, now: int, out: list) -> None:
        if self.phase is not Phase.CREATED:
            return
        if self.started_ms is None:
            self.started_ms = now
        self._version_started_ms = now
        if self._resumed == "evaluating":
            self._enter_eval(now, self.cohort, out)
            return
        if self._resumed:
            self.phase = Phase.RUNNING
            # Workers with committed assignments are presumed alive until their heartbeats lapse.
            for a in self._reannounce:
                self.registry.seen(a.worker, self._declared_counts.get(a.worker, 0), now)
            by_ticket: dict[tuple[int, int], list[str]] = {}
            self._expect_until_ms = now + self.base.reopened_min_ms
            for a in self._reannounce:
                if (a.worker, a.ticket) not in self._expected_back:
                    self.outstanding[a.worker] = Assignment(a.worker, a.ticket, a.version, now)
                by_ticket.setdefault((a.ticket, a.version), []).append(a.worker)
            for (ticket, version), workers in sorted(by_ticket.items()):
                out.append(self._open(ticket, version, workers, now))
            self._reannounce = []
            self._progress(now, out)
            return
        self.phase = Phase.WAITING_FOR_WORKERS
        self._wait_started_ms = now
        self._progress(now, out)

    def _on_tick(self, now: int, out: list) -> None:
        if self.phase is Phase.RUNNING:
            self._expire(now)
        elif self.phase is Phase.EVALUATING and now >= self.deadline_ms and self._pending is None:
            self._plan_finish(now, out, "completed")
            return
        self._progress(now, out)

    def _expire(self, now: int) -> None:
        """Assignments past their deadline, or of workers whose heartbeats lapsed, free their
        slot; their update is still used if it arrives before it is too stale."""
        alive = set(self.registry.alive(now))
        for w, a in list(self.outstanding.items()):
            if now - a.issued_ms > self.base.round_deadline_ms or w not in alive:
                del self.outstanding[w]
                self._remember_late((w, a.ticket), a.version)

    def _remember_late(self, key: tuple[str, int], version: int) -> None:
        self._late_tickets[key] = version
        while len(self._late_tickets) > LATE_TICKETS:
            self._late_tickets.popitem(last=False)

    def _progress(self, now: int, out: list) -> None:
        """Whatever can move now: start, aggregate a full buffer, hand out free slots."""
        if self._can_aggregate(now):
            self._begin_aggregation(now, out)  # (its commit waits for any dispatch being committed)
        if self._pending is not None:
            return
        if self.phase is Phase.WAITING_FOR_WORKERS:
            if self.registry.enough_alive(self.base.min_workers, now):
                self.phase = Phase.RUNNING
                self._version_started_ms = now
            elif now - self._wait_started_ms > self.base.wait_for_workers_ms:
                self._plan_finish(now, out, "not_enough_workers")
                return
            else:
                return
        if self.phase is not Phase.RUNNING:
            return
        if self._can_aggregate(now):
            self._begin_aggregation(now, out)
        if self._pending is None:
            self._plan_dispatch(now, out)

    def _can_aggregate(self, now: int) -> bool:
        if self.phase is not Phase.RUNNING or self._in_flight or len(self._buffer) < self.policy.buffer_size:
            return False
        # The last version waits (a bounded while) for updates a dead predecessor held: the
        # job must not end without them.
        last = self.rounds_completed + 1 >= self.base.rounds
        return not (last and self._expected_back and now < self._expect_until_ms)

    def _reject(self, worker: str, ticket: int, reason: str, detail: str, out: list) -> None:
        self.rejections[reason] += 1
        self._version_rejections[reason] += 1
        out.append(RejectUpdate(worker, ticket, reason, detail))

    def _assignment_of(self, worker: str, ticket: int) -> int | None:
        """The version ``ticket`` asked ``worker`` to train, if it is (or was) assigned."""
        a = self.outstanding.get(worker)
        if a is not None and a.ticket == ticket:
            return a.version
        return self._late_tickets.get((worker, ticket))

    def _on_update(self, ev: UpdateReceived, out: list) -> None:
        w, ticket = ev.worker_id, ev.round
        if self.phase is not Phase.RUNNING:
            self._reject(w, ticket, "wrong_round", f"the job is {self.phase.value}", out)
            return
        key = (w, ticket)
        seen = self._recent.get(key)
        if seen is None:
            seen = next((b.digest for b in self._held() if (b.worker, b.ticket) == key), None)
        if seen is not None:
            if ev.digest and seen == ev.digest:
                out.append(DuplicateIgnored(w, ticket))
            else:
                self._reject(w, ticket, "duplicate_update", "", out)
            return
        version = self._assignment_of(w, ticket)
        if version is None:
            self._reject(w, ticket, "not_in_cohort", f"ticket {ticket} is not assigned to {w}", out)
            return
        if ev.base_version is not None and ev.base_version != version:
            self._reject(w, ticket, "wrong_round", f"trained from version {ev.base_version}, ticket {ticket} "
                                                   f"assigned version {version}", out)
            return
        tau = self.model_version - version
        # An update a dead predecessor had accepted keeps its place even if versions were made
        # while it came back (as long as the model it trained from is still known).
        excused = key in self._expected_back
        if (tau > self.policy.max_staleness and not excused) or version not in self.history:
            self._free(w, ticket)
            self._remember_late(key, version)  # a copy of it (a worker's resend) gets the same answer
            self._reject(w, ticket, "too_stale", f"trained from version {version}, {tau} versions behind "
                                                 f"(max_staleness {self.policy.max_staleness})", out)
            return
        reason, detail, _ = self.update_problem(ev, self.state)
        if reason:
            self._reject(w, ticket, reason, detail, out)
            return
        entry = _Buffered(w, ticket, version, ev.digest, int(ev.update.num_samples), excused=excused)
        self._expected_back.pop(key, None)
        if self._in_flight or len(self._buffer) >= self.policy.buffer_size:
            # A version is being made from a full buffer: this one goes into the next buffer,
            # folded against the new model with the staleness it has then.
            self._waiting.append((ev, entry))
        elif not self._fold(ev.update, entry, out):
            return
        self._free(w, ticket)
        self._accepted += 1
        self._train_metrics.append((float(ev.update.num_samples), ev.train_metrics))

    def _on_partial(self, ev: PartialReceived, out: list) -> None:
        """A region's partial of updates trained from one base version (topology: regional):
        every contributor must answer a ticket assigned to it on that version; the sums are
        scaled by s(τ) when folded, as each update would be. All or nothing."""
        def reject(reason: str, detail: str) -> None:
            self.rejections[reason] += 1
            self._version_rejections[reason] += 1
            out.append(RejectUpdate(ev.sender, ev.round, reason, detail))

        if self.phase is not Phase.RUNNING:
            return reject("wrong_round", f"the job is {self.phase.value}")
        version = ev.partial.base_version
        if len(ev.tickets) != len(ev.contributors):
            return reject("malformed_body", "a ticket per contributor is needed")
        entries = []
        for (w, digest, weight), ticket in zip(ev.contributors, ev.tickets):
            key = (w, ticket)
            if key in self._recent or any((b.worker, b.ticket) == key for b in self._held()):
                return reject("duplicate_update", f"{w}'s update of ticket {ticket} is already in")
            assigned = self._assignment_of(w, ticket)
            if assigned is None:
                return reject("not_in_cohort", f"ticket {ticket} is not assigned to {w}")
            if assigned != version:
                return reject("wrong_round", f"{w}'s ticket {ticket} is on version {assigned}, not {version}")
            cap = self.sample_cap(w)
            if cap is None or weight > cap:
                return reject("excessive_samples", f"{w} weighs {weight}, at most {cap} allowed")
            entries.append(_Buffered(w, ticket, version, digest, int(weight), region=ev.region))
        tau = self.model_version - version
        if tau > self.policy.max_staleness or version not in self.history:
            for b in entries:
                self._free(b.worker, b.ticket)
                self._remember_late((b.worker, b.ticket), version)
            return reject("too_stale", f"partial of version {version}, {tau} versions behind")
        if self._in_flight or len(self._buffer) >= self.policy.buffer_size:
            self._waiting_partials.append((ev, entries))
        elif not self._fold_partial(ev, entries, out):
            return None
        for b in entries:
            self._free(b.worker, b.ticket)
        self._accepted += len(entries)
        if ev.metrics_weight > 0:
            self._train_metrics.append((float(ev.metrics_weight), ev.train_metrics))
        return None

    def _fold_partial(self, ev: PartialReceived, entries: list[_Buffered], out: list) -> bool:
        tau = self.model_version - ev.partial.base_version
        scaled = discounted_partial(ev.partial, self.policy.staleness(tau), self.model_version)
        try:
            self._accumulator.merge(scaled)
        except InvalidUpdate as exc:
            self.rejections["invalid_update"] += 1
            out.append(RejectUpdate(ev.sender, ev.round, "invalid_update", str(exc)))
            return False
        for b in entries:
            b.staleness = tau
        self._buffer.extend(entries)
        return True

    def _free(self, worker: str, ticket: int) -> None:
        a = self.outstanding.get(worker)
        if a is not None and a.ticket == ticket:
            del self.outstanding[worker]
        self._late_tickets.pop((worker, ticket), None)

    def _fold(self, update: ClientUpdate, entry: _Buffered, out: list) -> bool:
        entry.staleness = self.model_version - entry.base_version
        try:
            if self.policy.algorithm == "fedasync":
                c = fedasync.contribution(update.worker_id, float(update.num_samples), update.state, self.state,
                                          self.model_version, entry.base_version, self.policy.alpha,
                                          self.policy.staleness, update.extra, num_steps=update.num_steps)
            else:
                c = fedbuff.contribution(update.worker_id, float(update.num_samples), update.state,
                                         self.history[entry.base_version], entry.base_version, self.model_version,
                                         self.policy.staleness, update.extra, num_steps=update.num_steps)
            self._accumulator.fold(c)
        except InvalidUpdate as exc:
            self._reject(entry.worker, entry.ticket, "invalid_update", str(exc), out)
            return False
        self._buffer.append(entry)
        return True

    def _begin_aggregation(self, now: int, out: list) -> None:
        self._in_flight, self._buffer = self._buffer, []
        self._closing_ms = now
        self._aggregating = _BufferAggregate(self.model_version + 1, self._accumulator, self.state, self.rule,
                                             self.optimizer, self.num_workers_total or len(self.registry),
                                             server_lr=self.policy.server_lr)
        out.append(self._aggregating)

    def _on_aggregated(self, ev: Aggregated, out: list) -> None:
        if self._aggregating is None or ev.round != self.model_version + 1:
            return
        if self._pending is not None:  # a dispatch is being committed: propose the version after it
            self._ready = ev
            return
        self._aggregating = None
        folded = self._in_flight
        close = CloseRound(ev.round, ev.round, "aggregated", tuple(b.worker for b in folded),
                           dict(self._version_rejections), (self._closing_ms - self._version_started_ms) / 1000.0,
                           ev.state, {**weighted_means(self._train_metrics, "train_"), **ev.metrics},
                           staleness=tuple(b.staleness for b in folded), tickets=tuple(b.ticket for b in folded),
                           via={b.worker: b.region for b in folded if b.region},
                           elapsed_s=None if self.started_ms is None else (ev.now_ms - self.started_ms) / 1000.0)
        self._next_state = ev.state
        if self.rounds_completed + 1 < self.base.rounds:
            record = self._record("async", version=ev.round, closing=close)
        elif self._final_eval_wanted(ev.now_ms):
            record = self._record("evaluating", version=ev.round, closing=close,
                                  cohort=tuple(self.registry.alive(ev.now_ms)))
        else:
            record = self._record("done", version=ev.round, closing=close, reason="completed")
        self._propose("version", record, [close], ev.state, out)

    def _on_aggregation_failed(self, ev: AggregationFailed, out: list) -> None:
        if self._aggregating is None:
            return
        # The buffer cannot make a model (e.g. a robust rule's precondition): its updates are
        # refused and acknowledged, the version is not made, and a fresh buffer starts.
        self._aggregating = None
        self.last_error = ev.error
        for b in self._in_flight:
            self._accepted -= 1
            self._reject(b.worker, b.ticket, "aggregation_failed", ev.error, out)
        out.append(AckUpdates(tuple((b.worker, b.ticket) for b in self._in_flight)))
        self._in_flight = []
        self._accumulator = self.rule.begin(self.state, self.model_version)
        self._fold_waiting(out)

    def _final_eval_wanted(self, now: int) -> bool:
        return self.base.final_eval and bool(self.registry.alive(now))

    # ---- dispatch ----------------------------------------------------------------------

    def _slots(self) -> int:
        limit = self.policy.concurrency or len(self.registry)
        return max(0, limit - len(self.outstanding))

    def _plan_dispatch(self, now: int, out: list) -> None:
        free = self._slots()
        # While a buffer is being aggregated, a freed worker waits for the new model (a few ms
        # to seconds) rather than train one that is about to be replaced.
        last = self.rounds_completed + 1 >= self.base.rounds and len(self._buffer) + len(self._waiting) >= \
            self.policy.buffer_size
        if free <= 0 or self._in_flight or last or self.rounds_completed >= self.base.rounds:
            return
        busy = set(self.outstanding)
        idle = [w for w in self.registry.alive(now) if w not in busy]
        if not idle:
            return
        # Longest idle first; ties broken by a seeded hash, so no worker id is always first.
        seed = self.base.seed

        def order(w: str) -> tuple[int, bytes]:
            return self._last_assigned.get(w, -1), hashlib.blake2b(f"{seed}:{w}".encode(), digest_size=8).digest()

        chosen = sorted(idle, key=order)[:free]
        self.round += 1
        ticket = self.round
        for w in chosen:
            self.outstanding[w] = Assignment(w, ticket, self.model_version, now)
            self._last_assigned[w] = ticket
            declared = self.registry.declared(w)
            if declared is not None:
                self._declared_counts[w] = declared
        self._declared_counts = {w: n for w, n in self._declared_counts.items()
                          if w in self.outstanding or any(b.worker == w for b in self._held())}
        self._propose("dispatch", self._record("async", version=self.model_version),
                      [("open", ticket, self.model_version, tuple(chosen))], None, out)

    def _open(self, ticket: int, version: int, workers, now: int) -> OpenRound:
        told = self.rule.configure(None, version)
        groups = {k: v for k, v in told.items() if isinstance(v, dict) and v}
        cohort = tuple(sorted(workers))
        declared = tuple(self._declared_counts.get(w, 0) for w in cohort)  # caps downstream (aggregators)
        return OpenRound(ticket, version, cohort, now + self.base.round_deadline_ms, self.history[version], groups,
                         declared)

    # ---- commits -----------------------------------------------------------------------

    def _record(self, phase: str, *, version: int, closing: CloseRound | None = None, reason: str = "",
                cohort: tuple[str, ...] = ()) -> JobRecord:
        completed = self.rounds_completed + (1 if closing is not None else 0)
        return JobRecord(round=self.round, phase=phase, model_version=version, rounds_completed=completed,
                         cohort=cohort, declared=dict(self._declared_counts), accepted_total=self.accepted_total + (len(self._in_flight) if closing else 0),
                         reason=reason, last_close=close_row(closing) if closing else None,
                         started_ms=self.started_ms or 0, async_state=self._async_state())

    def _propose(self, kind: str, record: JobRecord, announce: list, model: State | None, out: list) -> None:
        self._commit_seq += 1
        self._pending = _Pending(self._commit_seq, kind, announce)
        self._pending_record = record
        out.append(Commit(self._commit_seq, record, model if model is not None else self.state,
                          self.strategy_state()))

    def _on_committed(self, ev: Committed, out: list) -> None:
        pending = self._pending
        if pending is None or ev.seq != pending.seq:
            return
        self._pending = None
        record = self._pending_record
        if pending.kind == "version":
            self._after_version(ev.now_ms, record, pending.announce[0], out)
        for item in pending.announce:
            if isinstance(item, tuple) and item[0] == "open":
                _, ticket, version, workers = item
                out.append(self._open(ticket, version, workers, ev.now_ms))
            elif isinstance(item, FinishJob):
                self.phase = Phase.DONE
                out.append(item)
        if record.phase == "evaluating" and self.phase is not Phase.EVALUATING and pending.kind == "version":
            self._enter_eval(ev.now_ms, record.cohort, out)
        elif record.phase == "done" and pending.kind == "version":
            self.phase = Phase.DONE
            out.append(FinishJob(record.reason, self.rounds_completed, self.model_version, {}))
        ready, self._ready = self._ready, None
        if ready is not None:
            self._on_aggregated(ready, out)
        elif self.phase is Phase.RUNNING:
            self._progress(ev.now_ms, out)

    def _after_version(self, now: int, record: JobRecord, close: CloseRound, out: list) -> None:
        folded = self._in_flight
        self._in_flight = []
        self.state = self._next_state
        self.model_version = record.model_version
        self.rounds_completed = record.rounds_completed
        self.history[self.model_version] = self.state
        pinned = set(self._expected_back.values())  # bases of held updates still to come back
        for v in [v for v in self.history if v < self.model_version - self.policy.max_staleness and v not in pinned]:
            del self.history[v]
        keep = max(RECENT_FOLDS, 4 * self.policy.buffer_size)
        for b in folded:
            self._recent[(b.worker, b.ticket)] = b.digest
        while len(self._recent) > keep:
            self._recent.popitem(last=False)
        out.append(AckUpdates(tuple((b.worker, b.ticket) for b in folded)))
        out.append(close)
        self._version_rejections = Counter()
        self._train_metrics = []
        self._version_started_ms = now
        self._accumulator = self.rule.begin(self.state, self.model_version)
        if record.phase == "async":
            self._fold_waiting(out)

    def _fold_waiting(self, out: list) -> None:
        """Fold updates that waited for the new model, oldest first, up to a full buffer
        (FedBuff aggregates exactly buffer_size updates; the rest wait for the next)."""
        refused = []
        while self._waiting_partials and len(self._buffer) < self.policy.buffer_size:
            ev, entries = self._waiting_partials.pop(0)
            tau = self.model_version - ev.partial.base_version
            if tau > self.policy.max_staleness or ev.partial.base_version not in self.history \
                    or not self._fold_partial(ev, entries, out):
                self._accepted -= len(entries)
                if tau > self.policy.max_staleness:
                    self._reject(entries[0].worker, entries[0].ticket, "too_stale",
                                 f"partial of version {ev.partial.base_version}, {tau} versions behind", out)
                refused.extend((b.worker, b.ticket) for b in entries)
        while self._waiting and len(self._buffer) < self.policy.buffer_size:
            ev, entry = self._waiting.pop(0)
            tau = self.model_version - entry.base_version
            if (tau > self.policy.max_staleness and not entry.excused) or entry.base_version not in self.history:
                self._accepted -= 1
                self._reject(entry.worker, entry.ticket, "too_stale",
                             f"trained from version {entry.base_version}, {tau} versions behind", out)
                refused.append((entry.worker, entry.ticket))
            elif not self._fold(ev.update, entry, out):
                self._accepted -= 1
                refused.append((entry.worker, entry.ticket))
        if refused:
            out.append(AckUpdates(tuple(refused)))

    def _on_commit_failed(self, ev: CommitFailed, out: list) -> None:
        pending = self._pending
        if pending is None or ev.seq != pending.seq:
            return
        self._pending = None
        self.last_error = ev.error
        self.phase = Phase.DONE
        out.append(FinishJob("commit_failed", self.rounds_completed, self.model_version, {}))

    # ---- the end ------------------------------------------------------------------------

    def _plan_finish(self, now: int, out: list, reason: str) -> None:
        metrics = weighted_means(self._eval_metrics, "federated_") if self.phase is Phase.EVALUATING else {}
        finish = FinishJob(reason, self.rounds_completed, self.model_version, metrics)
        self._propose("finish", self._record("done", version=self.model_version, reason=reason), [finish], None, out)

    def _enter_eval(self, now: int, cohort, out: list) -> None:
        self.phase = Phase.EVALUATING
        self.outstanding.clear()
        self.round += 1
        self.cohort = tuple(cohort)
        self.deadline_ms = now + self.base.final_eval_deadline_ms
        out.append(OpenEval(self.round, self.model_version, self.cohort, self.deadline_ms, self.state))

    def _on_eval(self, ev: EvalReceived, out: list) -> None:
        if self.phase is not Phase.EVALUATING or ev.round != self.round:
            self._reject(ev.worker_id, ev.round, "wrong_round", "", out)
            return
        reason, detail = self._take_eval_report(ev)
        if reason:
            self._reject(ev.worker_id, ev.round, reason, detail, out)
        elif self.eval_complete and self._pending is None:
            self._plan_finish(ev.now_ms, out, "completed")


@dataclass(frozen=True)
class _BufferAggregate(Aggregate):
    """A buffer's aggregate, applied with the server learning rate (FedBuff's η_g)."""

    server_lr: float = 1.0

    def compute(self) -> State:
        proposal = self.accumulator.finalize()
        if self.server_lr != 1.0:
            proposal = fedbuff.step(self.base_state, self.base_state, proposal, self.server_lr)
        new_state = self.optimizer.step(self.base_state, proposal) if self.optimizer else proposal
        self.rule.commit(self.accumulator, self.num_workers_total)
        return new_state


__all__ = ["AsyncPolicy", "AckUpdates", "Assignment", "VersionStateMachine", "AckThrough", "Deferred"]
