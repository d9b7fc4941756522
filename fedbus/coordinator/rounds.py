"""RoundStateMachine: synchronous federated rounds as a sans-I/O state machine.

Events in (a worker was seen, an update arrived, time passed), actions out (open a round,
close it, reject an update, finish the job). No awaits, no sockets, no clocks: every
event carries the time, so tests drive rounds deterministically and simulation and
deployment run the same code. The NATS service (``coordinator.service``) only
translates between the bus and these events and actions.
"""

from __future__ import annotations

import enum
import random
from collections import Counter
from dataclasses import dataclass, field

from fedbus.aggregation.base import (AggregationRule, ClientUpdate, InvalidUpdate, RoundAggregator,
                                     ServerOptimizer, State, StrategyConfigError, is_averageable)
from fedbus.aggregation.fedavg import FedAvg
from fedbus.crypto.envelopes import Rejection, check_tensors
from fedbus.protocol.codec import TensorSpec, spec_of


# ---- configuration -------------------------------------------------------------------

@dataclass(frozen=True)
class RoundPolicy:
    rounds: int
    min_workers: int = 1
    cohort_size: int | None = None
    min_updates: int = 1
    round_deadline_ms: int = 30_000
    wait_for_workers_ms: int = 120_000
    liveness_ms: int = 5_000
    max_failed_rounds: int = 3
    final_eval: bool = True
    final_eval_deadline_ms: int = 10_000
    seed: int = 0


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
    """An update whose envelope verified; its content is checked here."""

    worker_id: str
    round: int
    update: ClientUpdate
    now_ms: int
    train_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    eval_samples: int = 0


@dataclass(frozen=True)
class EvalReceived:
    worker_id: str
    round: int
    num_samples: int
    metrics: dict[str, float]
    now_ms: int


@dataclass(frozen=True)
class MessageRejected:
    """The service rejected a message before it reached the machine; count it here."""

    reason: str


# ---- actions ---------------------------------------------------------------------------

@dataclass(frozen=True)
class OpenRound:
    round: int
    model_version: int
    cohort: tuple[str, ...]
    deadline_ms: int
    state: State
    broadcast: dict[str, State] = field(default_factory=dict)  # strategy extras, by group name


@dataclass(frozen=True)
class CloseRound:
    round: int
    model_version: int
    status: str  # "aggregated" | "failed"
    accepted: tuple[str, ...]
    rejected: dict[str, int]
    seconds: float
    state: State
    metrics: dict[str, float]


@dataclass(frozen=True)
class RejectUpdate:
    worker_id: str
    round: int
    reason: str
    detail: str


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


Event = Start | WorkerSeen | Tick | UpdateReceived | EvalReceived | MessageRejected
Action = OpenRound | CloseRound | RejectUpdate | OpenEval | FinishJob


class Phase(enum.Enum):
    CREATED = "created"
    WAITING_FOR_WORKERS = "waiting_for_workers"
    ROUND_OPEN = "round_open"
    EVALUATING = "evaluating"
    DONE = "done"


def _weighted_means(pairs: list[tuple[int, dict[str, float]]], prefix: str) -> dict[str, float]:
    totals: Counter[str] = Counter()
    weights: Counter[str] = Counter()
    for n, metrics in pairs:
        for key, value in metrics.items():
            totals[key] += n * float(value)
            weights[key] += n
    return {f"{prefix}{k}": totals[k] / weights[k] for k in totals if weights[k] > 0}


class RoundStateMachine:
    """Drives one job's synchronous rounds from a global model to the final one."""

    def __init__(self, policy: RoundPolicy, initial_state: State, *, rule: AggregationRule | None = None,
                 optimizer: ServerOptimizer | None = None, num_workers_total: int | None = None):
        self.policy = policy
        self.state = initial_state
        self.model_spec: dict[str, TensorSpec] = spec_of(initial_state)
        # Strategy extras (e.g. SCAFFOLD's Δc) are shaped like the model's float tensors.
        self.float_spec = {k: v for k, v in self.model_spec.items() if is_averageable(initial_state[k])}
        self.rule = rule or FedAvg()
        self.rule.check_cohort(policy.min_updates)
        self.optimizer = optimizer
        self.num_workers_total = num_workers_total
        self.update_groups: tuple[str, ...] = tuple(getattr(self.rule, "update_groups", ()))
        self.last_error: str | None = None
        self.phase = Phase.CREATED
        self.round = 0
        self.model_version = 0
        self.rounds_completed = 0
        self.rejections: Counter[str] = Counter()
        self.accepted_total = 0
        self._workers: dict[str, tuple[int, int]] = {}  # id -> (num_samples, last_seen_ms)
        self._failed_in_a_row = 0
        self._wait_started_ms = 0
        self._reset_round_state()

    def _reset_round_state(self) -> None:
        self.cohort: tuple[str, ...] = ()
        self.deadline_ms = 0
        self._opened_ms = 0
        self._accumulator: RoundAggregator | None = None
        self._reported: set[str] = set()
        self._round_rejections: Counter[str] = Counter()
        self._train_metrics: list[tuple[int, dict[str, float]]] = []
        self._eval_metrics: list[tuple[int, dict[str, float]]] = []

    # ---- queries the service uses while verifying envelopes ---------------------------

    def accepts_round(self, msg_type: str, round_: int) -> bool:
        if msg_type == "update":
            return self.phase is Phase.ROUND_OPEN and round_ == self.round
        if msg_type == "eval.report":
            return self.phase is Phase.EVALUATING and round_ == self.round
        return True

    def awaits_round(self, msg_type: str, round_: int) -> bool:
        """An update for the round about to (re)open, arriving while we still wait for
        workers, e.g. one held in the stream across a coordinator restart: keep it for
        that round instead of rejecting it."""
        return (msg_type == "update" and round_ == self.round + 1
                and self.phase in (Phase.CREATED, Phase.WAITING_FOR_WORKERS))

    @property
    def failed_in_a_row(self) -> int:
        return self._failed_in_a_row

    def alive_workers(self, now_ms: int) -> list[str]:
        return sorted(w for w, (_, seen) in self._workers.items() if now_ms - seen <= self.policy.liveness_ms)

    # ---- the single entry point ----------------------------------------------------

    def handle(self, event: Event) -> list[Action]:
        match event:
            case Start(now_ms=now):
                if self.phase is not Phase.CREATED:
                    return []
                self.phase = Phase.WAITING_FOR_WORKERS
                self._wait_started_ms = now
                return self._maybe_start(now)
            case WorkerSeen(worker_id=w, num_samples=n, now_ms=now):
                self._workers[w] = (n, now)
                if self.phase is Phase.WAITING_FOR_WORKERS:
                    return self._maybe_start(now)
                return []
            case Tick(now_ms=now):
                return self._on_tick(now)
            case UpdateReceived():
                return [*self._deadline_passed(event.now_ms), *self._on_update(event)]
            case EvalReceived():
                return [*self._deadline_passed(event.now_ms), *self._on_eval(event)]
            case MessageRejected(reason=reason):
                self.rejections[reason] += 1
                self._round_rejections[reason] += 1
                return []
        raise TypeError(f"unknown event {event!r}")

    # ---- transitions ---------------------------------------------------------------

    def restore(self, *, round_: int, model_version: int, rounds_completed: int, state: State,
                failed_in_a_row: int = 0) -> None:
        """Continue a job from its last committed round; call before Start.

        The next round opened is ``round_ + 1``: a round that was open but not committed
        when the previous coordinator died is opened again under the same number, so its
        updates still waiting in the stream are accepted.
        """
        if self.phase is not Phase.CREATED:
            raise RuntimeError("restore() must come before Start")
        if spec_of(state) != self.model_spec:
            raise ValueError("the committed model does not match the task's model")
        self.round = round_
        self.model_version = model_version
        self.rounds_completed = rounds_completed
        self.state = state
        self._failed_in_a_row = failed_in_a_row

    def _maybe_start(self, now: int) -> list[Action]:
        if len(self.alive_workers(now)) >= self.policy.min_workers:
            return self._next(now)
        if now - self._wait_started_ms > self.policy.wait_for_workers_ms:
            return [self._finish("not_enough_workers")]
        return []

    def _select_cohort(self, now: int) -> tuple[str, ...]:
        alive = self.alive_workers(now)
        size = self.policy.cohort_size
        if size is None or size >= len(alive):
            return tuple(alive)
        rng = random.Random(self.policy.seed * 1_000_003 + self.round)
        return tuple(sorted(rng.sample(alive, size)))

    def _open_round(self, now: int) -> OpenRound:
        self._reset_round_state()
        self.round += 1
        self.phase = Phase.ROUND_OPEN
        self.cohort = self._select_cohort(now)
        self._opened_ms = now
        self.deadline_ms = now + self.policy.round_deadline_ms
        self._accumulator = self.rule.begin(self.state)
        extra = self.rule.broadcast()
        return OpenRound(self.round, self.model_version, self.cohort, self.deadline_ms, self.state,
                         {self.rule.name: extra} if extra else {})

    def _on_tick(self, now: int) -> list[Action]:
        if self.phase is Phase.WAITING_FOR_WORKERS:
            return self._maybe_start(now)
        if self.phase is Phase.ROUND_OPEN and now >= self.deadline_ms:
            if len(self._reported) >= self.policy.min_updates:
                return self._close_round(now)
            return self._fail_round(now)
        if self.phase is Phase.EVALUATING and now >= self.deadline_ms:
            return [self._finish("completed")]
        return []

    def _deadline_passed(self, now: int) -> list[Action]:
        # Events carry the time: a deadline that passed before this message arrived is
        # handled first, so a late message meets the next phase (late_updates: drop)
        # whether or not the service's timer happened to tick in between.
        if self.phase in (Phase.ROUND_OPEN, Phase.EVALUATING) and now >= self.deadline_ms:
            return self._on_tick(now)
        return []

    def _reject(self, worker: str, round_: int, reason: str, detail: str) -> list[Action]:
        self.rejections[reason] += 1
        self._round_rejections[reason] += 1
        return [RejectUpdate(worker, round_, reason, detail)]

    def _on_update(self, ev: UpdateReceived) -> list[Action]:
        if not self.accepts_round("update", ev.round):
            return self._reject(ev.worker_id, ev.round, "wrong_round", f"round {self.round} is open")
        if ev.worker_id not in self.cohort:
            return self._reject(ev.worker_id, ev.round, "not_in_cohort", "")
        if ev.worker_id in self._reported:
            return self._reject(ev.worker_id, ev.round, "duplicate_update", "")
        try:
            check_tensors(ev.update.state, self.model_spec)
            self._check_extras(ev.update)
            assert self._accumulator is not None
            self._accumulator.add(ev.update)  # InvalidUpdate leaves the aggregator unchanged
        except Rejection as rej:
            return self._reject(ev.worker_id, ev.round, rej.reason, rej.detail)
        except InvalidUpdate as exc:
            return self._reject(ev.worker_id, ev.round, "invalid_update", str(exc))
        self._reported.add(ev.worker_id)
        self.accepted_total += 1
        self._train_metrics.append((ev.update.num_samples, ev.train_metrics))
        if ev.eval_samples > 0:
            self._eval_metrics.append((ev.eval_samples, ev.eval_metrics))
        if self._reported >= set(self.cohort):
            return self._close_round(ev.now_ms)
        return []

    def _check_extras(self, update: ClientUpdate) -> None:
        groups = {k for k, v in update.extra.items() if isinstance(v, dict)}
        if groups != set(self.update_groups):
            raise Rejection("tensor_mismatch", f"tensor groups {sorted(groups)}, expected {list(self.update_groups)}")
        for group in self.update_groups:
            check_tensors(update.extra[group], self.float_spec)

    def _round_metrics(self) -> dict[str, float]:
        metrics = _weighted_means(self._train_metrics, "train_")
        # Workers evaluated the round's base model (version model_version - 1 after close).
        metrics.update(_weighted_means(self._eval_metrics, "federated_"))
        return metrics

    def _close_round(self, now: int) -> list[Action]:
        assert self._accumulator is not None
        try:
            proposal = self._accumulator.result()
        except (StrategyConfigError, InvalidUpdate, ValueError) as exc:
            # e.g. a robust rule whose precondition the arrived updates cannot meet
            self._round_rejections["aggregation_failed"] += 1
            self.last_error = str(exc)
            return self._fail_round(now)
        self.state = self.optimizer.step(self.state, proposal) if self.optimizer else proposal
        self.rule.commit(self._accumulator, self.num_workers_total or len(self._workers))
        self.model_version += 1
        self.rounds_completed += 1
        self._failed_in_a_row = 0
        close = CloseRound(self.round, self.model_version, "aggregated", tuple(sorted(self._reported)),
                           dict(self._round_rejections), (now - self._opened_ms) / 1000.0,
                           self.state, self._round_metrics())
        return [close, *self._next(now)]

    def _fail_round(self, now: int) -> list[Action]:
        self._failed_in_a_row += 1
        close = CloseRound(self.round, self.model_version, "failed", tuple(sorted(self._reported)),
                           dict(self._round_rejections), (now - self._opened_ms) / 1000.0,
                           self.state, self._round_metrics())
        if self._failed_in_a_row >= self.policy.max_failed_rounds:
            return [close, self._finish("quorum_not_reached")]
        return [close, *self._next(now)]

    def _next(self, now: int) -> list[Action]:
        if self.rounds_completed < self.policy.rounds:
            if len(self.alive_workers(now)) < self.policy.min_updates:
                self.phase = Phase.WAITING_FOR_WORKERS
                self._wait_started_ms = now
                return []
            return [self._open_round(now)]
        if self.policy.final_eval and self.alive_workers(now):
            self._reset_round_state()
            self.round += 1
            self.phase = Phase.EVALUATING
            self.cohort = tuple(self.alive_workers(now))
            self._opened_ms = now
            self.deadline_ms = now + self.policy.final_eval_deadline_ms
            return [OpenEval(self.round, self.model_version, self.cohort, self.deadline_ms, self.state)]
        return [self._finish("completed")]

    def _on_eval(self, ev: EvalReceived) -> list[Action]:
        if not self.accepts_round("eval.report", ev.round):
            return self._reject(ev.worker_id, ev.round, "wrong_round", "")
        if ev.worker_id not in self.cohort:
            return self._reject(ev.worker_id, ev.round, "not_in_cohort", "")
        if ev.worker_id in self._reported:
            return self._reject(ev.worker_id, ev.round, "duplicate_update", "")
        self._reported.add(ev.worker_id)
        if ev.num_samples > 0:
            self._eval_metrics.append((ev.num_samples, ev.metrics))
        if self._reported >= set(self.cohort):
            return [self._finish("completed")]
        return []

    def _finish(self, reason: str) -> FinishJob:
        metrics = _weighted_means(self._eval_metrics, "federated_") if self.phase is Phase.EVALUATING else {}
        self.phase = Phase.DONE
        return FinishJob(reason, self.rounds_completed, self.model_version, metrics)
