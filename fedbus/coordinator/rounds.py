"""RoundStateMachine: synchronous federated rounds as a sans-I/O state machine.

Events in (a worker was seen, an update arrived, time passed, work finished, a commit
landed), actions out (aggregate, commit, announce, reject). No awaits, no sockets, no
clocks: every event carries the time, so tests drive rounds deterministically and
simulation and deployment run the same code.

Two rules shape the action stream:

* **Heavy work is an action.** Closing a round emits ``Aggregate``; whoever runs the
  machine computes it (the NATS service in a thread, the simulator inline) and feeds back
  ``Aggregated``. The machine never blocks on tensor math.
* **Nothing is announced before it is committed.** Every transition that others will
  hear about (a round opens, a round closes, the job ends) is first proposed as a
  ``Commit`` carrying the whole durable ``JobRecord``; only ``Committed`` releases the
  announcements (``OpenRound``, ``CloseRound``, ``OpenEval``, ``FinishJob``) and the
  ``AckThrough`` that lets the service acknowledge the updates folded into it. A
  round's cohort is part of the commit that opens it, so a resumed coordinator reopens
  the same round with the same cohort and the updates held for it are accepted.

Sync rounds are one policy over model versions: an update names the round it answers,
and the machine folds it into the round's accumulator only while that round is open.
"""

from __future__ import annotations

import enum
import math
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from fedbus.aggregation.base import (AggregationRule, ClientUpdate, Contribution, InvalidUpdate, RoundAggregator,
                                     ServerOptimizer, State, StrategyConfigError, is_averageable)
from fedbus.aggregation.fedavg import FedAvg
from fedbus.aggregation.partial import PartialAggregate
from fedbus.aggregation.staleness import discounted
from fedbus.coordinator.machine import MachineBase
from fedbus.coordinator.metrics import weighted_means
from fedbus.coordinator.records import JobRecord
from fedbus.coordinator.registry import WorkerRegistry
from fedbus.coordinator.sampling import sample_cohort
from fedbus.privacy.budget import PrivacyBudget
from fedbus.protocol.codec import TensorSpec, spec_of


# ---- configuration -------------------------------------------------------------------

@dataclass(frozen=True)
class RoundPolicy:
    rounds: int
    min_workers: int = 1
    cohort_size: int | None = None
    min_updates: int | float = 1  # a count, or a fraction in (0, 1) of each round's cohort
    round_deadline_ms: int = 30_000
    wait_for_workers_ms: int = 120_000
    liveness_ms: int = 5_000
    max_failed_rounds: int = 3
    final_eval: bool = True
    final_eval_deadline_ms: int = 10_000
    seed: int = 0
    # Caps on an update's num_samples claim, besides what the worker declared on its heartbeat.
    max_samples: int | None = None
    max_samples_by_worker: Mapping[str, int] = field(default_factory=dict)
    # Fold a round's updates in worker-id order at its close instead of in arrival order:
    # float sums then do not depend on timing, so a resumed job ends bit-identical to an
    # uninterrupted one. Costs O(cohort x model) memory while the round is open.
    deterministic: bool = False
    # Local training the job asks for: an update's num_steps claim may not exceed
    # epochs x ceil(samples / batch_size) for the samples it may claim.
    epochs: int | None = None
    batch_size: int | None = None
    # A round reopened by a resumed coordinator stays open at least this long: updates
    # held by the dead coordinator come back only once the stream's ack wait has passed,
    # and a worker that died since cannot resend its update.
    reopened_min_ms: int = 0
    # Close as soon as the quorum reported (over-selection) instead of waiting for the cohort.
    close_at_quorum: bool = False
    # Secure aggregation: the round's masked inputs are awaited until round_deadline_ms, then
    # the unmasking may take this much longer before the machine gives up on the round.
    unmask_grace_ms: int = 0
    # An update of the round that just closed, from a cohort member that had not reported:
    # "drop" rejects it (wrong_round); "next_round" folds it into the next round, its delta
    # (against the model it was trained from) scaled by staleness(τ), τ = 1 version.
    late_updates: str = "drop"
    staleness: Callable[[int], float] | None = None

    def quorum(self, cohort_size: int) -> int:
        """Updates a round of ``cohort_size`` workers needs: a count, or ceil(fraction x size)."""
        if isinstance(self.min_updates, float):
            return max(1, math.ceil(self.min_updates * cohort_size - 1e-9))
        return int(self.min_updates)

    @property
    def least_quorum(self) -> int:
        """The smallest quorum a round can have (what rule preconditions are checked against)."""
        return self.quorum(self.cohort_size if self.cohort_size is not None else self.min_workers)

    @property
    def live_needed(self) -> int:
        """Live workers needed to open a round (a fraction of any cohort is reachable with one)."""
        return 1 if isinstance(self.min_updates, float) else max(1, int(self.min_updates))


# ---- events ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Start:
    now_ms: int


@dataclass(frozen=True)
class WorkerSeen:
    worker_id: str
    num_samples: int
    now_ms: int


@dataclass(frozen=True)
class Tick:
    now_ms: int


@dataclass(frozen=True)
class UpdateReceived:
    """An update whose envelope verified; its content is checked here.

    ``round`` is the envelope header's round (the verifier makes the body agree with it);
    ``digest`` the body digest, so an identical resend is told apart from a second update.
    """

    worker_id: str
    round: int
    update: ClientUpdate
    now_ms: int
    train_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    eval_samples: int = 0
    digest: bytes = b""
    base_version: int | None = None  # the model version it was trained from (None: the round's)
    proof: bytes = b""  # the worker's signed header (a regional aggregator forwards it in its partial)


@dataclass(frozen=True)
class PartialReceived:
    """A regional aggregator's partial aggregate whose envelope and contributor proofs
    verified (topology: regional): ``contributors`` are (worker, update digest, weight)."""

    sender: str
    region: str
    round: int
    partial: PartialAggregate
    contributors: tuple[tuple[str, bytes, float], ...]
    now_ms: int
    digest: bytes = b""
    train_metrics: dict[str, float] = field(default_factory=dict)
    metrics_weight: float = 0.0
    tickets: tuple[int, ...] = ()  # async: the ticket each contributor's update answered (from its proof)


@dataclass(frozen=True)
class SecureSumReceived:
    """Secure aggregation unmasked the round's sum (privacy.secure_aggregation): ``partial``
    holds the survivors' summed deltas, each weighted 1. Nothing else arrives for the round,
    so it closes now."""

    round: int
    partial: PartialAggregate
    survivors: tuple[str, ...]
    now_ms: int


@dataclass(frozen=True)
class SecureAggregationFailed:
    """The round's secure aggregation ended without a sum (``reason``: a name from
    ``fedbus.secagg.errors.FAILURE_REASONS``); nothing was revealed, the round fails."""

    round: int
    reason: str
    detail: str
    now_ms: int


@dataclass(frozen=True)
class EvalReceived:
    worker_id: str
    round: int
    num_samples: int
    metrics: dict[str, float]
    now_ms: int


@dataclass(frozen=True)
class MessageRejected:
    """The service rejected ``count`` messages for ``reason`` before they reached the
    machine; count them here (a flood is fed in aggregate, before the next event)."""

    reason: str
    count: int = 1


@dataclass(frozen=True)
class RollbackRequested:
    """An operator asked (signed ``models`` control event) to continue the job from an
    earlier committed version; ``state`` is that version's model, verified against its
    manifest by the service. Applied at the next point where no commit is in flight and no
    aggregation runs: an open round is abandoned (its updates were trained from the model
    being rolled away from), and version model_version + 1, a copy of ``state`` whose
    parent is ``version``, is committed before the next round opens on it."""

    version: int
    state: State
    now_ms: int


@dataclass(frozen=True)
class Aggregated:
    """The ``Aggregate`` work of a round finished: ``state`` is the next global model,
    ``metrics`` what the service measured on it (server-side test), committed with the round."""

    round: int
    state: State
    now_ms: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class AggregationFailed:
    round: int
    error: str
    now_ms: int


@dataclass(frozen=True)
class Committed:
    """The service persisted the ``Commit`` with this ``seq``."""

    seq: int
    now_ms: int


@dataclass(frozen=True)
class CommitFailed:
    seq: int
    error: str
    now_ms: int


# ---- actions ---------------------------------------------------------------------------

@dataclass(frozen=True)
class OpenRound:
    round: int
    model_version: int
    cohort: tuple[str, ...]
    deadline_ms: int
    state: State
    broadcast: dict[str, State] = field(default_factory=dict)  # strategy extras, by group name
    declared: tuple[int, ...] = ()  # the cohort's committed sample counts, in cohort order (caps downstream)


@dataclass(frozen=True)
class CloseRound:
    round: int
    model_version: int
    status: str  # "aggregated" | "failed" | "rolled_back"
    accepted: tuple[str, ...]
    rejected: dict[str, int]
    seconds: float
    state: State
    metrics: dict[str, float]
    # Late updates of the previous round folded into this one, and the staleness of every
    # folded update (accepted first, then late), in that order.
    late: tuple[str, ...] = ()
    staleness: tuple[int, ...] = ()
    elapsed_s: float | None = None  # seconds since the job started (first incarnation) at the close
    tickets: tuple[int, ...] = ()  # async: the assignment each folded update answered (one per accepted)
    via: dict[str, str] = field(default_factory=dict)  # regional: worker -> the region whose partial held it


@dataclass(frozen=True)
class RejectUpdate:
    worker_id: str
    round: int
    reason: str
    detail: str


@dataclass(frozen=True)
class DuplicateIgnored:
    """The same update again (a worker's resend after a resume, or a redelivery): nothing
    to fold and nothing to report; the service only acknowledges it."""

    worker_id: str
    round: int


@dataclass(frozen=True)
class Deferred:
    """An accepted update that a later aggregation folds (a late update under
    late_updates: next_round): hold it unacknowledged until ``until_round`` commits."""

    worker_id: str
    round: int
    until_round: int


@dataclass(frozen=True)
class OpenEval:
    round: int
    model_version: int
    cohort: tuple[str, ...]
    deadline_ms: int
    state: State


@dataclass(frozen=True)
class FinishJob:
    reason: str
    rounds_completed: int
    model_version: int
    metrics: dict[str, float]


def fold_update(accumulator, update: ClientUpdate) -> None:
    """Fold a verified update into a round's accumulator as a Contribution: its delta from
    the round's base, weighted by its (capped) sample count. InvalidUpdate leaves the
    accumulator unchanged."""
    fold_local = getattr(accumulator, "fold_local_state", None)
    if fold_local is not None:  # streaming rules: no contribution built (lean for big models)
        fold_local(update.worker_id, float(update.num_samples), update.state, update.extra, num_steps=update.num_steps)
        return
    contribution = accumulator.from_local_state(update.worker_id, float(update.num_samples), update.state,
                                                update.extra, num_steps=update.num_steps)
    accumulator.fold(contribution)


@dataclass(frozen=True)
class Aggregate:
    """Heavy work: turn a round's accumulator into the next model. Run ``compute()`` off
    the event loop and feed back ``Aggregated`` (or ``AggregationFailed``).

    ``held``: updates still to fold first, in this order (deterministic mode keeps them
    until the close); any a rule refuses land in ``refused`` as (worker, reason detail).
    """

    round: int
    accumulator: RoundAggregator
    base_state: State
    rule: AggregationRule
    optimizer: ServerOptimizer | None
    num_workers_total: int
    held: tuple[ClientUpdate, ...] = ()
    refused: list[tuple[str, str]] = field(default_factory=list)
    # Late updates of the previous round (late_updates: next_round), folded after the held
    # ones in this order: (update, the version it was trained from, its discount s(τ)).
    late: tuple[tuple[ClientUpdate, int, float], ...] = ()
    late_base: State | None = None  # the model those late updates were trained from
    refused_late: list[tuple[str, str]] = field(default_factory=list)

    def compute(self) -> State:
        for update in self.held:
            try:
                fold_update(self.accumulator, update)
            except InvalidUpdate as exc:
                self.refused.append((update.worker_id, str(exc)))
        for update, base_version, factor in self.late:
            try:
                c = Contribution.from_local_state(update.worker_id, base_version, float(update.num_samples),
                                                  update.state, self.late_base, update.extra,
                                                  num_steps=update.num_steps)
                self.accumulator.fold(discounted(c, factor))
            except InvalidUpdate as exc:
                self.refused_late.append((update.worker_id, str(exc)))
        proposal = self.accumulator.finalize()
        new_state = self.optimizer.step(self.base_state, proposal) if self.optimizer else proposal
        self.rule.commit(self.accumulator, self.num_workers_total)
        return new_state


DP_EPSILON = "dp_epsilon"  # a round's metric: client-level ε at the job's target δ after it
PRIVACY_BUDGET_EXHAUSTED = "privacy_budget_exhausted"  # FinishJob reason

RECENT_ROUNDS = 8  # closed rounds whose accepted workers are remembered (copies arriving late)

AGGREGATION_ERRORS = (StrategyConfigError, InvalidUpdate, ValueError)


def close_row(close: CloseRound) -> dict:
    """A closed round (or committed async version) as summary.json lists it, and as the
    commit that closes it records it: ``folded`` updates, each with its ``staleness``."""
    row = {"round": close.round, "model_version": close.model_version, "status": close.status,
           "seconds": round(close.seconds, 6), "accepted": len(close.accepted),
           "accepted_workers": list(close.accepted), "late_workers": list(close.late),
           "folded": len(close.accepted) + len(close.late) if close.status == "aggregated" else 0,
           "staleness": list(close.staleness), "rejected": dict(close.rejected),
           **{k: float(v) for k, v in close.metrics.items()}}
    if close.elapsed_s is not None:
        row["elapsed_s"] = round(close.elapsed_s, 3)
    if close.tickets:
        row["tickets"] = list(close.tickets)
    if close.via:
        row["via_region"] = dict(sorted(close.via.items()))
    return row


@dataclass(frozen=True)
class Commit:
    """Persist ``record`` (and ``model``, the model of ``record.model_version``, with the
    strategy's server state), then feed back ``Committed(seq)``."""

    seq: int
    record: JobRecord
    model: State
    strategy_state: dict


@dataclass(frozen=True)
class AckThrough:
    """Updates of rounds up to ``round`` are committed: acknowledge them."""

    round: int


@dataclass(frozen=True)
class RollbackRefused:
    """A rollback the machine cannot apply (``reason``: model_mismatch, job_done, unknown_version)."""

    version: int
    reason: str
    detail: str


@dataclass(frozen=True)
class InternalError:
    """An exception escaped while handling ``event``; the actions decided before it are kept."""

    event: str
    error: str


Event = (Start | WorkerSeen | Tick | UpdateReceived | PartialReceived | SecureSumReceived | SecureAggregationFailed
         | EvalReceived | MessageRejected | Aggregated | AggregationFailed | Committed | CommitFailed
         | RollbackRequested)
Action = (OpenRound | CloseRound | RejectUpdate | DuplicateIgnored | Deferred | OpenEval | FinishJob | Aggregate
          | Commit | AckThrough | RollbackRefused | InternalError)


class Phase(enum.Enum):
    CREATED = "created"
    WAITING_FOR_WORKERS = "waiting_for_workers"
    ROUND_OPEN = "round_open"
    AGGREGATING = "aggregating"
    COMMITTING = "committing"
    EVALUATING = "evaluating"
    DONE = "done"


@dataclass
class _Pending:
    """What a proposed commit releases once it lands."""

    seq: int
    record: JobRecord
    announce: list  # actions, deadlines filled in at commit time
    ack_round: int | None


class RoundStateMachine(MachineBase):
    """Drives one job's synchronous rounds from a global model to the final one."""

    def __init__(self, policy: RoundPolicy, initial_state: State, *, rule: AggregationRule | None = None,
                 optimizer: ServerOptimizer | None = None, num_workers_total: int | None = None,
                 privacy: PrivacyBudget | None = None):
        self.policy = policy
        self.privacy = privacy  # asked before every round opens; committed with the strategy state
        self.limits = policy
        self.state = initial_state
        self.model_spec: dict[str, TensorSpec] = spec_of(initial_state)
        # Strategy extras (e.g. SCAFFOLD's Δc) are shaped like the model's float tensors.
        self.float_spec = {k: v for k, v in self.model_spec.items() if is_averageable(initial_state[k])}
        self.rule = rule or FedAvg()
        self.rule.check_cohort(policy.least_quorum)
        self.optimizer = optimizer
        self.num_workers_total = num_workers_total
        self.update_groups: tuple[str, ...] = tuple(getattr(self.rule, "update_groups", ()))
        self.registry = WorkerRegistry(policy.liveness_ms)
        self.last_error: str | None = None
        self.phase = Phase.CREATED
        self.round = 0
        self.model_version = 0
        self.rounds_completed = 0
        self.rejections: Counter[str] = Counter()
        self.accepted_total = 0
        self._failed_in_a_row = 0
        self._wait_started_ms = 0
        self._resumed_phase: str | None = None
        self._commit_seq = 0
        self._pending: _Pending | None = None
        self._recent_accepted: dict[int, frozenset[str]] = {}  # the last few closed rounds
        self.started_ms: int | None = None  # the job's first start (restored on resume)
        # late_updates: next_round: the last closed round whose stragglers are still welcome,
        # who they are, the model they trained from, and those that arrived (folded next).
        self._late_round: int | None = None
        self._late_eligible: frozenset[str] = frozenset()
        self._late_base: State | None = None
        self._late_base_version = 0
        self._late_stash: dict[str, tuple[ClientUpdate, bytes]] = {}
        self._rollback: RollbackRequested | None = None  # waiting for a point where it can apply
        self._parent_version: int | None = None  # of model_version, when a rollback made it
        self._reset_round_state()

    def _reset_round_state(self) -> None:
        self.cohort: tuple[str, ...] = ()
        self.declared: dict[str, int] = {}  # the cohort's declared sample counts, committed with it
        self.deadline_ms = 0
        self._opened_ms = 0
        self._accumulator: RoundAggregator | None = None
        self._reported: dict[str, bytes] = {}  # worker -> digest of its accepted update
        self._partials: dict[str, bytes] = {}  # region -> digest of its merged partial (regional topology)
        self._via: dict[str, str] = {}  # worker -> region whose partial held its update
        self._held: dict[str, ClientUpdate] = {}  # deterministic mode: folded at close, in id order
        self._aggregating: Aggregate | None = None
        self._folded_late: list[tuple[str, int]] = []  # (worker, staleness) of late updates in this aggregate
        self._round_rejections: Counter[str] = Counter()
        self._train_metrics: list[tuple[float, dict[str, float]]] = []
        self._eval_metrics: list[tuple[float, dict[str, float]]] = []
        self._eval_reported: set[str] = set()

    # ---- queries the service uses while verifying envelopes ---------------------------

    def accepts_round(self, msg_type: str, round_: int) -> bool:
        if msg_type in ("update", "partial"):
            return self.phase is Phase.ROUND_OPEN and round_ == self.round
        if msg_type == "eval.report":
            return self.phase is Phase.EVALUATING and round_ == self.round
        return True

    @property
    def failed_in_a_row(self) -> int:
        return self._failed_in_a_row

    @property
    def finished(self) -> bool:
        return self.phase is Phase.DONE

    def alive_workers(self, now_ms: int) -> list[str]:
        return self.registry.alive(now_ms)

    # ---- the single entry point (MachineBase.handle) ------------------------------

    def _dispatch(self, event: Event, out: list[Action]) -> None:
        match event:
            case Start(now_ms=now):
                self._on_start(now, out)
            case WorkerSeen(worker_id=w, num_samples=n, now_ms=now):
                self.registry.seen(w, n, now)
                if self.phase is Phase.WAITING_FOR_WORKERS:
                    self._maybe_start(now, out)
            case Tick(now_ms=now):
                self._on_tick(now, out)
            case UpdateReceived():
                self._deadline_passed(event.now_ms, out)
                self._on_update(event, out)
            case PartialReceived():
                self._deadline_passed(event.now_ms, out)
                self._on_partial(event, out)
            case SecureSumReceived():
                self._on_secure_sum(event, out)
            case SecureAggregationFailed():
                if self.phase is Phase.ROUND_OPEN and event.round == self.round:
                    self._round_fails(f"secagg_{event.reason}", event.detail, event.now_ms, out)
            case EvalReceived():
                self._deadline_passed(event.now_ms, out)
                self._on_eval(event, out)
            case MessageRejected(reason=reason, count=count):
                self.rejections[reason] += count
                self._round_rejections[reason] += count
            case Aggregated():
                self._on_aggregated(event, out)
            case AggregationFailed():
                if self.phase is Phase.AGGREGATING and event.round == self.round:
                    self._round_fails("aggregation_failed", event.error, event.now_ms, out)
            case Committed():
                self._on_committed(event, out)
            case CommitFailed():
                self._on_commit_failed(event, out)
            case RollbackRequested():
                self._on_rollback(event, out)
            case _:
                raise TypeError(f"unknown event {event!r}")

    # ---- resume --------------------------------------------------------------------

    def restore(self, record: JobRecord, state: State, strategy_state: dict | None = None,
                history: Mapping[int, State] | None = None) -> None:
        """Continue a job from its last committed record; call before Start.

        A round that was open when the previous coordinator died is reopened under the
        same number with the same (committed) cohort, so the updates still waiting in the
        stream, and the ones workers resend, are accepted. A waiting job waits for
        ``min_updates`` live workers, not ``min_workers``: workers that died for good must
        not keep it from going on.
        """
        if self.phase is not Phase.CREATED:
            raise RuntimeError("restore() must come before Start")
        if spec_of(state) != self.model_spec:
            raise ValueError("the committed model does not match the task's model")
        self.round = record.round
        self.model_version = record.model_version
        self.rounds_completed = record.rounds_completed
        self.accepted_total = record.accepted_total
        self.state = state
        self._failed_in_a_row = record.failed_in_a_row
        self._resumed_phase = record.phase
        if record.phase in ("round_open", "evaluating"):
            self.cohort = tuple(record.cohort)
            self.declared = dict(record.declared)
        if strategy_state:
            self._load_strategy_state(strategy_state)
        if record.last_close is not None:
            self._remember_accepted(int(record.last_close["round"]), record.last_close.get("accepted_workers", ()))
        self.started_ms = record.started_ms or None
        self._parent_version = record.parent_version
        late = record.late
        if late is not None and history is not None and int(late["base_version"]) in history:
            # Stragglers of the last closed round are still welcome (their updates come back
            # unacknowledged); without the model they trained from they cannot be folded.
            self._late_round = int(late["round"])
            self._late_eligible = frozenset(late.get("eligible", ()))
            self._late_base_version = int(late["base_version"])
            self._late_base = history[self._late_base_version]

    # ---- transitions ---------------------------------------------------------------

    def _on_start(self, now: int, out: list[Action]) -> None:
        if self.phase is not Phase.CREATED:
            return
        if self.started_ms is None:
            self.started_ms = now
        resumed = self._resumed_phase
        if resumed == "done":
            self.phase = Phase.DONE
            return
        if resumed == "round_open":
            # The committed cohort is presumed alive until its heartbeats lapse, so the round
            # after the reopened one does not start from whoever happened to beat first.
            for worker, samples in self.declared.items():
                self.registry.seen(worker, samples, now)
            self._enter_round(now, self.cohort, self.declared)
            self.deadline_ms = now + max(self.policy.round_deadline_ms, self.policy.reopened_min_ms)
            out.append(self._open_round_action())
            return
        if resumed == "evaluating":
            self._enter_eval(now, self.cohort)
            out.append(OpenEval(self.round, self.model_version, self.cohort, self.deadline_ms, self.state))
            return
        self.phase = Phase.WAITING_FOR_WORKERS
        self._wait_started_ms = now
        self._maybe_start(now, out)

    def _quorum_to_start(self) -> int:
        # Round 1 of a fresh run waits for the federation; a resumed job only for a quorum.
        resumed = self._resumed_phase is not None or self.round > 0
        return self.policy.quorum(self.policy.min_workers) if resumed else self.policy.min_workers

    def _maybe_start(self, now: int, out: list[Action]) -> None:
        if self._pending is not None:
            return
        if self.registry.enough_alive(self._quorum_to_start(), now):
            self._plan_next(now, out, closing=None)
        elif now - self._wait_started_ms > self.policy.wait_for_workers_ms:
            self._plan_finish(now, out, "not_enough_workers", closing=None)

    def _on_tick(self, now: int, out: list[Action]) -> None:
        if self._maybe_roll_back(now, out):
            return
        if self.phase is Phase.WAITING_FOR_WORKERS:
            self._maybe_start(now, out)
        elif self.phase is Phase.ROUND_OPEN and now >= self.deadline_ms:
            if len(self._reported) >= self.policy.quorum(len(self.cohort)):
                self._begin_aggregation(now, out)
            else:
                self._fail_round(now, out)
        elif self.phase is Phase.EVALUATING and now >= self.deadline_ms:
            self._plan_finish(now, out, "completed", closing=None)

    def _deadline_passed(self, now: int, out: list[Action]) -> None:
        # Events carry the time: a deadline that passed before this message arrived is
        # handled first, so a late message meets the next phase (late_updates: drop)
        # whether or not the service's timer happened to tick in between.
        if self.phase in (Phase.ROUND_OPEN, Phase.EVALUATING) and now >= self.deadline_ms:
            self._on_tick(now, out)

    def _reject(self, worker: str, round_: int, reason: str, detail: str, out: list[Action]) -> None:
        self.rejections[reason] += 1
        self._round_rejections[reason] += 1
        out.append(RejectUpdate(worker, round_, reason, detail))

    def already_accepted(self, worker: str, round_: int) -> bool:
        """Whether ``worker``'s update for ``round_`` is in the current round or one of the
        last closed ones (a later copy of it is a duplicate, not news)."""
        if round_ == self.round and worker in self._reported:
            return True
        if round_ == self._late_round and worker in self._late_stash:
            return True
        return worker in self._recent_accepted.get(round_, ())

    def _declared(self, worker: str) -> int | None:
        return self.declared.get(worker, self.registry.declared(worker))

    def _is_late(self, ev: UpdateReceived) -> bool:
        return (self.policy.late_updates == "next_round" and ev.round == self._late_round
                and not (self.phase is Phase.ROUND_OPEN and ev.round == self.round))

    def _check_claims(self, ev: UpdateReceived, base: State, out: list[Action]) -> int | None:
        """Bound the update's claims and check its tensors; the sample cap, or None if rejected."""
        reason, detail, cap = self.update_problem(ev, base)
        if reason:
            self._reject(ev.worker_id, ev.round, reason, detail, out)
            return None
        return cap

    def _on_late(self, ev: UpdateReceived, out: list[Action]) -> None:
        """A straggler of the last closed round: kept for the next aggregation (next_round)."""
        w = ev.worker_id
        if w in self._late_stash:
            if ev.digest and self._late_stash[w][1] == ev.digest:
                out.append(DuplicateIgnored(w, ev.round))
            else:
                self._reject(w, ev.round, "duplicate_update", "", out)
            return
        if w not in self._late_eligible:
            self._reject(w, ev.round, "wrong_round", f"round {ev.round} closed and {w} reported in it or "
                                                     f"was not in its cohort", out)
            return
        if ev.base_version is not None and ev.base_version != self._late_base_version:
            self._reject(w, ev.round, "wrong_round", f"trained from version {ev.base_version}, round {ev.round}'s "
                                                     f"base is {self._late_base_version}", out)
            return
        if self._late_base is None or self._check_claims(ev, self._late_base, out) is None:
            return
        self._late_stash[w] = (ev.update, ev.digest)
        self.accepted_total += 1
        # Folded by the next aggregation: held until the round after the late one commits.
        out.append(Deferred(w, ev.round, self._late_round + 1))

    def _on_update(self, ev: UpdateReceived, out: list[Action]) -> None:
        if self._is_late(ev):
            self._on_late(ev, out)
            return
        if not self.accepts_round("update", ev.round):
            self._reject(ev.worker_id, ev.round, "wrong_round", f"round {self.round} is {self.phase.value}", out)
            return
        if ev.worker_id not in self.cohort:
            self._reject(ev.worker_id, ev.round, "not_in_cohort", "", out)
            return
        if ev.worker_id in self._reported:
            if ev.digest and self._reported[ev.worker_id] == ev.digest:
                out.append(DuplicateIgnored(ev.worker_id, ev.round))
            else:
                self._reject(ev.worker_id, ev.round, "duplicate_update", "", out)
            return
        if ev.base_version is not None and ev.base_version != self.model_version:
            self._reject(ev.worker_id, ev.round, "wrong_round",
                         f"trained from version {ev.base_version}, the round's base is {self.model_version}", out)
            return
        cap = self._check_claims(ev, self.state, out)
        if cap is None:
            return
        assert self._accumulator is not None
        if self.policy.deterministic:
            self._held[ev.worker_id] = ev.update
        else:
            try:
                fold_update(self._accumulator, ev.update)  # InvalidUpdate leaves it unchanged
            except InvalidUpdate as exc:
                self._reject(ev.worker_id, ev.round, "invalid_update", str(exc), out)
                return
        self._reported[ev.worker_id] = ev.digest
        self.accepted_total += 1
        self._train_metrics.append((float(ev.update.num_samples), ev.train_metrics))
        if ev.eval_samples > 0:  # weights a metric average: no more than the samples it may claim
            self._eval_metrics.append((float(min(ev.eval_samples, cap)), ev.eval_metrics))
        if set(self._reported) >= set(self.cohort) or (
                self.policy.close_at_quorum and len(self._reported) >= self.policy.quorum(len(self.cohort))):
            self._begin_aggregation(ev.now_ms, out)

    def _on_partial(self, ev: PartialReceived, out: list[Action]) -> None:
        """Merge a region's partial: every contributor a cohort member not yet reported,
        within its sample cap, trained from this round's base; all or nothing."""
        def reject(reason: str, detail: str) -> None:
            self._reject(ev.sender, ev.round, reason, detail, out)

        if not self.accepts_round("update", ev.round):
            return reject("wrong_round", f"round {self.round} is {self.phase.value}")
        if ev.region in self._partials:
            if ev.digest and self._partials[ev.region] == ev.digest:
                out.append(DuplicateIgnored(ev.sender, ev.round))
                return None
            return reject("duplicate_update", f"region {ev.region} already sent its partial of round {ev.round}")
        seen: set[str] = set()
        for worker, _, weight in ev.contributors:
            if worker not in self.cohort:
                return reject("not_in_cohort", f"{worker} is not in round {ev.round}'s cohort")
            if worker in self._reported or worker in seen:
                return reject("duplicate_update", f"{worker}'s update is already in this round")
            seen.add(worker)
            cap = self.sample_cap(worker)
            if cap is None or weight > cap:
                return reject("excessive_samples", f"{worker} weighs {weight}, at most {cap} allowed")
        if any(c.base_version != self.model_version for c in ev.partial.contributors) or \
                ev.partial.base_version != self.model_version:
            return reject("wrong_round", f"partial of base version {ev.partial.base_version}, the round's base is "
                                         f"{self.model_version}")
        assert self._accumulator is not None
        try:
            self._accumulator.merge(ev.partial)  # InvalidUpdate leaves it unchanged
        except InvalidUpdate as exc:
            return reject("invalid_update", str(exc))
        self._partials[ev.region] = ev.digest
        for worker, digest, _ in ev.contributors:
            self._reported[worker] = digest
            self._via[worker] = ev.region
        self.accepted_total += len(ev.contributors)
        if ev.metrics_weight > 0:
            self._train_metrics.append((float(ev.metrics_weight), ev.train_metrics))
        if set(self._reported) >= set(self.cohort) or (
                self.policy.close_at_quorum and len(self._reported) >= self.policy.quorum(len(self.cohort))):
            self._begin_aggregation(ev.now_ms, out)
        return None

    def _on_secure_sum(self, ev: SecureSumReceived, out: list[Action]) -> None:
        """The unmasked sum of the round's survivors: merged like a partial, and the round closes."""
        if self.phase is not Phase.ROUND_OPEN or ev.round != self.round:
            return
        survivors = set(ev.survivors)
        if len(survivors) != len(ev.survivors) or not survivors <= set(self.cohort):
            return self._round_fails("invalid_update", "secure sum of workers outside the cohort", ev.now_ms, out)
        if len(survivors) < self.policy.quorum(len(self.cohort)):
            return self._round_fails("quorum_not_reached", f"{len(survivors)} survivors", ev.now_ms, out)
        assert self._accumulator is not None
        try:
            self._accumulator.merge(ev.partial)  # InvalidUpdate leaves it unchanged
        except InvalidUpdate as exc:
            return self._round_fails("invalid_update", str(exc), ev.now_ms, out)
        for worker in sorted(survivors):
            self._reported[worker] = b""
        self.accepted_total += len(survivors)
        self._begin_aggregation(ev.now_ms, out)
        return None

    def _round_fails(self, reason: str, detail: str, now: int, out: list[Action]) -> None:
        """The round ends without a model, for a named reason (counted in its close)."""
        self._round_rejections[reason] += 1
        self.last_error = detail
        self._fail_round(now, out)

    def _round_metrics(self) -> dict[str, float]:
        metrics = weighted_means(self._train_metrics, "train_")
        # Workers evaluated the round's base model (version model_version - 1 after close).
        metrics.update(weighted_means(self._eval_metrics, "federated_"))
        return metrics

    def _begin_aggregation(self, now: int, out: list[Action]) -> None:
        assert self._accumulator is not None
        held, self._held = self._held, {}
        late = self._take_late()
        self.phase = Phase.AGGREGATING
        self._closing_ms = now
        self._aggregating = Aggregate(self.round, self._accumulator, self.state, self.rule, self.optimizer,
                                      self.num_workers_total or len(self.registry),
                                      held=tuple(held[w] for w in sorted(held)), late=late[0], late_base=late[1])
        self._open_late_window()
        out.append(self._aggregating)

    def _take_late(self) -> tuple[tuple, State | None]:
        """The stragglers of the previous round, for this aggregation, in worker order, each
        with its discount s(τ), τ = versions between its base and this round's base."""
        stash, self._late_stash = self._late_stash, {}
        if not stash:
            return (), None
        tau = self.model_version - self._late_base_version
        factor = self.policy.staleness(tau) if self.policy.staleness else 1.0
        self._folded_late = [(w, tau) for w in sorted(stash)]
        return tuple((stash[w][0], self._late_base_version, factor) for w in sorted(stash)), self._late_base

    def _open_late_window(self) -> None:
        """This round closes: its cohort members that did not report may still be folded next round."""
        if self.policy.late_updates != "next_round":
            return
        self._late_round = self.round
        self._late_eligible = frozenset(self.cohort) - set(self._reported)
        self._late_base = self.state
        self._late_base_version = self.model_version

    def _on_aggregated(self, ev: Aggregated, out: list[Action]) -> None:
        if self.phase is not Phase.AGGREGATING or ev.round != self.round:
            return
        for worker, detail in self._aggregating.refused:  # held updates a rule refused at the close
            self._reported.pop(worker, None)
            self.accepted_total -= 1
            self._reject(worker, self.round, "invalid_update", detail, out)
        refused_late = dict(self._aggregating.refused_late)
        for worker, detail in refused_late.items():
            self.accepted_total -= 1
            self._reject(worker, self.round - 1, "invalid_update", detail, out)
        late = [(w, tau) for w, tau in self._folded_late if w not in refused_late]
        self.state = ev.state
        self._remember_accepted(self.round, self._reported)
        if late:  # a copy of a folded late update is a copy, not news
            prev = self.round - 1
            self._recent_accepted[prev] = self._recent_accepted.get(prev, frozenset()) | {w for w, _ in late}
        self.model_version += 1
        self._parent_version = None
        self.rounds_completed += 1
        self._failed_in_a_row = 0
        privacy = {DP_EPSILON: self.privacy.aggregated()} if self.privacy is not None else {}
        close = CloseRound(self.round, self.model_version, "aggregated", tuple(sorted(self._reported)),
                           dict(self._round_rejections), (self._closing_ms - self._opened_ms) / 1000.0,
                           self.state, {**self._round_metrics(), **ev.metrics, **privacy},
                           late=tuple(w for w, _ in late),
                           staleness=(0,) * len(self._reported) + tuple(t for _, t in late),
                           elapsed_s=self._elapsed(ev.now_ms), via=dict(self._via))
        self._plan_next(ev.now_ms, out, closing=close)

    def _remember_accepted(self, round_: int, workers) -> None:
        self._recent_accepted[round_] = frozenset(workers)
        for old in sorted(self._recent_accepted)[:-RECENT_ROUNDS]:
            del self._recent_accepted[old]

    def _elapsed(self, now: int) -> float | None:
        return None if self.started_ms is None else (now - self.started_ms) / 1000.0

    def _fail_round(self, now: int, out: list[Action]) -> None:
        self._failed_in_a_row += 1
        if self.privacy is not None:
            self.privacy.failed()  # nothing was released
        self._late_stash.clear()  # nothing aggregates them: the failed round's commit acknowledges them
        self._open_late_window()
        close = CloseRound(self.round, self.model_version, "failed", tuple(sorted(self._reported)),
                           dict(self._round_rejections), (now - self._opened_ms) / 1000.0,
                           self.state, self._round_metrics(), elapsed_s=self._elapsed(now))
        if self._failed_in_a_row >= self.policy.max_failed_rounds:
            self._plan_finish(now, out, "quorum_not_reached", closing=close)
        else:
            self._plan_next(now, out, closing=close)

    # ---- planning: every announced transition goes through a commit -------------------

    def _record(self, phase: str, *, round_: int, cohort: tuple[str, ...] = (), declared: dict | None = None,
                reason: str = "", closing: CloseRound | None = None) -> JobRecord:
        late = None
        if self._late_round is not None and self._late_eligible:
            late = {"round": self._late_round, "eligible": sorted(self._late_eligible),
                    "base_version": self._late_base_version}
        return JobRecord(round=round_, phase=phase, model_version=self.model_version,
                         rounds_completed=self.rounds_completed, failed_in_a_row=self._failed_in_a_row,
                         cohort=tuple(cohort), declared=dict(declared or {}), accepted_total=self.accepted_total,
                         reason=reason, last_close=close_row(closing) if closing else None,
                         started_ms=self.started_ms or 0, late=late, parent_version=self._parent_version)

    def _propose(self, record: JobRecord, announce: list, out: list[Action], ack_round: int | None) -> None:
        self._commit_seq += 1
        self._pending = _Pending(self._commit_seq, record, announce, ack_round)
        self.phase = Phase.COMMITTING
        out.append(Commit(self._commit_seq, record, self.state, self.strategy_state()))

    def _plan_next(self, now: int, out: list[Action], closing: CloseRound | None) -> None:
        ack = closing.round if closing else None
        head = [closing] if closing else []
        alive = self.registry.alive(now)
        if self.rounds_completed < self.policy.rounds:
            if len(alive) < self.policy.live_needed:
                self._propose(self._record("waiting", round_=self.round, closing=closing), [*head, "wait"], out, ack)
                return
            cohort = sample_cohort(alive, self.policy.cohort_size, seed=self.policy.seed, round_=self.round + 1)
            if self.privacy is not None:
                # Stop before a round that would take ε past the budget; else note its shape
                # (committed with the round) so that its aggregation is accounted as sampled.
                if not self.privacy.allows(len(alive), len(cohort)):
                    self._plan_finish(now, out, PRIVACY_BUDGET_EXHAUSTED, closing=closing)
                    return
                self.privacy.opened(len(alive), len(cohort))
            declared = {w: self.registry.declared(w) for w in cohort}
            self._propose(self._record("round_open", round_=self.round + 1, cohort=cohort, declared=declared,
                                       closing=closing), [*head, "open_round"], out, ack)
            return
        if self.policy.final_eval and alive:
            self._propose(self._record("evaluating", round_=self.round + 1, cohort=tuple(alive), closing=closing),
                          [*head, "open_eval"], out, ack)
            return
        self._plan_finish(now, out, "completed", closing=closing)

    def _plan_finish(self, now: int, out: list[Action], reason: str, closing: CloseRound | None) -> None:
        metrics = weighted_means(self._eval_metrics, "federated_") if self.phase is Phase.EVALUATING else {}
        finish = FinishJob(reason, self.rounds_completed, self.model_version, metrics)
        self._propose(self._record("done", round_=self.round, reason=reason, closing=closing),
                      [*([closing] if closing else []), finish], out, closing.round if closing else None)

    def _on_committed(self, ev: Committed, out: list[Action]) -> None:
        pending = self._pending
        if pending is None or ev.seq != pending.seq:
            return
        self._pending = None
        if pending.ack_round is not None:
            out.append(AckThrough(pending.ack_round))
        record = pending.record
        for item in pending.announce:
            if item == "wait":
                self._reset_round_state()
                self.phase = Phase.WAITING_FOR_WORKERS
                self._wait_started_ms = ev.now_ms
            elif item == "open_round":
                self.round = record.round
                self._enter_round(ev.now_ms, record.cohort, record.declared)
                out.append(self._open_round_action())
            elif item == "open_eval":
                self.round = record.round
                self._enter_eval(ev.now_ms, record.cohort)
                out.append(OpenEval(self.round, self.model_version, self.cohort, self.deadline_ms, self.state))
            elif isinstance(item, FinishJob):
                self.phase = Phase.DONE
                out.append(item)
            else:
                out.append(item)

    def _on_rollback(self, ev: RollbackRequested, out: list[Action]) -> None:
        if self.phase is Phase.DONE:
            out.append(RollbackRefused(ev.version, "job_done", "the job has finished"))
        elif not 0 <= ev.version <= self.model_version:
            out.append(RollbackRefused(ev.version, "unknown_version",
                                       f"version {ev.version} is not in 0..{self.model_version}"))
        elif spec_of(ev.state) != self.model_spec:
            out.append(RollbackRefused(ev.version, "model_mismatch", "the version's tensors do not fit the task's model"))
        else:
            self._rollback = ev  # a later request replaces one not applied yet
            self._maybe_roll_back(ev.now_ms, out)

    def _maybe_roll_back(self, now: int, out: list[Action]) -> bool:
        """Apply a requested rollback if nothing is in flight (else the next tick tries again)."""
        req = self._rollback
        if req is None or self._pending is not None or self.phase not in (Phase.ROUND_OPEN,
                                                                           Phase.WAITING_FOR_WORKERS):
            return False
        self._rollback = None
        was_open = self.phase is Phase.ROUND_OPEN
        if was_open and self.privacy is not None:
            self.privacy.failed()  # the abandoned round releases nothing
        # Late updates were trained from the lineage being abandoned.
        self._late_stash.clear()
        self._late_round, self._late_eligible, self._late_base = None, frozenset(), None
        self.state = req.state
        self.model_version += 1
        self._parent_version = req.version
        close = None
        if was_open:
            close = CloseRound(self.round, self.model_version, "rolled_back", tuple(sorted(self._reported)),
                               dict(self._round_rejections), (now - self._opened_ms) / 1000.0, self.state, {},
                               elapsed_s=self._elapsed(now))
        self._plan_next(now, out, closing=close)
        return True

    def _on_commit_failed(self, ev: CommitFailed, out: list[Action]) -> None:
        pending = self._pending
        if pending is None or ev.seq != pending.seq:
            return
        # The job's durable state cannot move: announce nothing that was not committed,
        # finish (uncommitted) with a reason everyone can read.
        self._pending = None
        self.last_error = ev.error
        self.phase = Phase.DONE
        out.append(FinishJob("commit_failed", self.rounds_completed, self.model_version, {}))

    def _enter_round(self, now: int, cohort, declared) -> None:
        self._reset_round_state()
        self.phase = Phase.ROUND_OPEN
        self.cohort = tuple(cohort)
        self.declared = {w: n for w, n in dict(declared).items() if n is not None}
        self._opened_ms = now
        self.deadline_ms = now + self.policy.round_deadline_ms + self.policy.unmask_grace_ms
        self._accumulator = self.rule.begin(self.state, self.model_version)

    def _open_round_action(self) -> OpenRound:
        # What every worker is told (the strategy's first half): its tensor groups travel with the model.
        told = self.rule.configure(None, self.model_version)
        groups = {k: v for k, v in told.items() if isinstance(v, dict) and v}
        declared = tuple(self.declared.get(w, 0) for w in self.cohort) if self.declared else ()
        return OpenRound(self.round, self.model_version, self.cohort, self.deadline_ms, self.state, groups, declared)

    def _enter_eval(self, now: int, cohort) -> None:
        self._reset_round_state()
        self.phase = Phase.EVALUATING
        self.cohort = tuple(cohort)
        self._opened_ms = now
        self.deadline_ms = now + self.policy.final_eval_deadline_ms

    def _on_eval(self, ev: EvalReceived, out: list[Action]) -> None:
        if not self.accepts_round("eval.report", ev.round):
            self._reject(ev.worker_id, ev.round, "wrong_round", "", out)
            return
        reason, detail = self._take_eval_report(ev)
        if reason:
            self._reject(ev.worker_id, ev.round, reason, detail, out)
        elif self.eval_complete:
            self._plan_finish(ev.now_ms, out, "completed", closing=None)
