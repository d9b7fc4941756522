"""AggregatorCore: a region's aggregator as a sans-I/O state machine.

It follows the coordinator's rounds (``RoundOpened`` from a verified round.open), checks
each of its region's updates exactly as the coordinator does (the same claim caps and
tensor checks, ``MachineBase.update_problem``, and the same rejection names), folds them
into the rule's streaming accumulator, and closes the region's share of the round when
every region member of the cohort reported or ``close_margin_ms`` before the round's
deadline (so the partial reaches the coordinator in time). Closing is a
``PublishPartial`` action; only once JetStream acknowledged the partial
(``PartialPublished``) are the updates inside it acknowledged (``AckThrough``): an
aggregator killed before that loses nothing, its updates come back.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from fedbus.aggregation.base import AggregationRule, InvalidUpdate, State, StrategyConfigError
from fedbus.aggregation.partial import Contributor, PartialAggregate, as_one_contribution
from fedbus.coordinator.machine import MachineBase
from fedbus.coordinator.metrics import weighted_means
from fedbus.coordinator.rounds import (AckThrough, DuplicateIgnored, RejectUpdate, RoundPolicy, Tick, UpdateReceived,
                                       WorkerSeen, fold_update)
from fedbus.protocol.runs import run_started_ms

PUBLISHED_REMEMBERED = 64  # rounds whose partial went out (a restarted aggregator learns the last one)


@dataclass(frozen=True)
class RoundOpened:
    run: str
    round: int
    model_version: int
    cohort: tuple[str, ...]
    deadline_ms: int
    state: State
    now_ms: int
    trace: str | None = None
    declared: tuple[int, ...] = ()  # the coordinator's committed sample counts, in cohort order


@dataclass(frozen=True)
class PartialPublished:
    run: str
    round: int
    now_ms: int


@dataclass(frozen=True)
class PublishPartial:
    """Sign and publish the region's partial of ``round`` on agg.<region>, then feed back
    ``PartialPublished``. ``contributors``: (worker, digest, weight, base version, proof)
    in fold order, the order of ``partial.contributors``."""

    run: str
    round: int
    partial: PartialAggregate
    contributors: tuple[tuple[str, bytes, float, int, bytes], ...]
    train_metrics: dict[str, float]
    metrics_weight: float
    trace: str | None = None


@dataclass
class _Round:
    run: str
    round: int
    version: int
    members: frozenset[str]  # the region's workers in the round's cohort
    deadline_ms: int
    base: State
    accumulator: object
    trace: str | None
    declared: dict[str, int] = field(default_factory=dict)
    reported: dict[str, tuple[bytes, float, int, bytes]] = field(default_factory=dict)  # fold order
    metrics: list[tuple[float, dict[str, float]]] = field(default_factory=list)
    closed: bool = False


class AggregatorCore(MachineBase):
    def __init__(self, region: str, members: list[str], limits: RoundPolicy, rule: AggregationRule,
                 initial_state: State, *, close_margin_ms: int, job_rule: str | None = None):
        self.region = region
        self.members = frozenset(members)
        self._init_checks(limits, rule, initial_state)  # ``rule``: the one applied to this region's updates
        # The coordinator's rule (what its partials must be): None when it is ``rule`` itself.
        self.job_rule = job_rule
        self.close_margin_ms = close_margin_ms
        self.current: _Round | None = None
        self.published: OrderedDict[tuple[str, int], None] = OrderedDict()
        self.partials_published = 0
        # (unused by the aggregator, read by MachineBase's evaluation helpers)
        self.cohort: tuple[str, ...] = ()
        self._eval_reported: set[str] = set()
        self._eval_metrics: list = []

    def base_for(self, version: int) -> State | None:
        """The open round's model when the update claims its version (see MachineBase.base_for)."""
        r = self.current
        return r.base if r is not None and r.version == version else None

    def _declared(self, worker: str) -> int | None:
        # What the coordinator committed with the round (as it caps claims), else the heartbeat.
        r = self.current
        if r is not None and worker in r.declared:
            return r.declared[worker]
        return self.registry.declared(worker)

    def note_published(self, run: str, round_: int) -> None:
        """A partial of (run, round) is already in the stream (a restart found it there)."""
        self.published[(run, round_)] = None
        while len(self.published) > PUBLISHED_REMEMBERED:
            self.published.popitem(last=False)

    def opens_soon(self, run: str | None, round_: int) -> bool:
        """Whether an update for (run, round) may belong to a round this aggregator has not
        seen open yet: none seen, or the next round of the run it follows, or a newer run.
        (Bounded to the next round: a claim about round 10^9 is refused, not kept waiting.)"""
        r = self.current
        if run is None:
            return False
        if r is None:
            return True
        if run == r.run:
            return round_ == r.round + 1
        return run_started_ms(run) > run_started_ms(r.run)

    def accepts(self, run: str | None, round_: int) -> bool:
        r = self.current
        return r is not None and not r.closed and r.run == run and r.round == round_

    # ---- events ------------------------------------------------------------------------

    def _dispatch(self, event, out: list) -> None:
        match event:
            case RoundOpened():
                self._on_round_opened(event, out)
            case WorkerSeen(worker_id=w, num_samples=n, now_ms=now):
                self.registry.seen(w, n, now)
            case UpdateReceived():
                self._close_if_due(event.now_ms, out)
                self._on_update(event, out)
            case Tick(now_ms=now):
                self._close_if_due(now, out)
            case PartialPublished():
                self.note_published(event.run, event.round)
                self.partials_published += 1
                out.append(AckThrough(event.round))
            case _:
                raise TypeError(f"unknown event {event!r}")

    def _on_round_opened(self, ev: RoundOpened, out: list) -> None:
        r = self.current
        if r is not None and r.run == ev.run and ev.round <= r.round:
            return  # the same round announced again (a resumed coordinator), or an older one
        if r is not None and not r.closed and r.reported:
            # The coordinator moved on before this region closed: its updates missed the round.
            out.append(AckThrough(r.round))
        members = frozenset(ev.cohort) & self.members
        declared = dict(zip(ev.cohort, ev.declared)) if len(ev.declared) == len(ev.cohort) else {}
        self.current = _Round(ev.run, ev.round, ev.model_version, members, ev.deadline_ms, ev.state,
                              self.rule.begin(ev.state, ev.model_version), ev.trace,
                              declared={w: n for w, n in declared.items() if n > 0},
                              closed=(ev.run, ev.round) in self.published or not members)

    def _reject(self, ev: UpdateReceived, reason: str, detail: str, out: list) -> None:
        self._reject_worker(ev.worker_id, ev.round, reason, detail, out)

    def _reject_worker(self, worker: str, round_: int, reason: str, detail: str, out: list) -> None:
        self.rejections[reason] += 1
        out.append(RejectUpdate(worker, round_, reason, detail))

    def _on_update(self, ev: UpdateReceived, out: list) -> None:
        r = self.current
        if r is None or r.closed or ev.round != r.round:
            return self._reject(ev, "wrong_round", f"region {self.region} has no open round {ev.round}", out)
        if ev.worker_id not in self.members:
            return self._reject(ev, "wrong_region", f"{ev.worker_id} is not a worker of region {self.region}", out)
        if ev.worker_id not in r.members:
            return self._reject(ev, "not_in_cohort", "", out)
        if ev.worker_id in r.reported:
            if ev.digest and r.reported[ev.worker_id][0] == ev.digest:
                out.append(DuplicateIgnored(ev.worker_id, ev.round))
                return None
            return self._reject(ev, "duplicate_update", "", out)
        if ev.base_version is not None and ev.base_version != r.version:
            return self._reject(ev, "wrong_round", f"trained from version {ev.base_version}, the round's base is "
                                                   f"{r.version}", out)
        reason, detail, _ = self.update_problem(ev, r.base)
        if reason:
            return self._reject(ev, reason, detail, out)
        try:
            fold_update(r.accumulator, ev.update)
        except InvalidUpdate as exc:
            return self._reject(ev, "invalid_update", str(exc), out)
        r.reported[ev.worker_id] = (ev.digest, float(ev.update.num_samples), r.version, ev.proof)
        r.metrics.append((float(ev.update.num_samples), ev.train_metrics))
        if set(r.reported) >= r.members:
            self._close(out)
        return None

    def _close_if_due(self, now: int, out: list) -> None:
        r = self.current
        if r is not None and not r.closed and now >= r.deadline_ms - self.close_margin_ms:
            if r.reported:
                self._close(out)
            else:
                r.closed = True  # nobody of this region answered in time: nothing to send

    def _close(self, out: list) -> None:
        r = self.current
        assert r is not None
        r.closed = True
        if self.job_rule is None:
            partial = r.accumulator.partial()
        else:
            # A region rule of its own (e.g. robust): its result travels as one contribution.
            try:
                result = r.accumulator.finalize()
            except (ValueError, InvalidUpdate, StrategyConfigError) as exc:  # e.g. too few updates for the rule
                for w in r.reported:
                    self._reject_worker(w, r.round, "aggregation_failed", str(exc), out)
                out.append(AckThrough(r.round))
                return
            partial = as_one_contribution(self.job_rule, r.version, r.base, result,
                                          [Contributor(w, r.reported[w][1], r.version) for w in r.reported])
        contributors = tuple((w, *r.reported[w]) for w in (c.worker_id for c in partial.contributors))
        out.append(PublishPartial(r.run, r.round, partial, contributors, weighted_means(r.metrics, "train_"),
                                  sum(w for w, _ in r.metrics), r.trace))


__all__ = ["AggregatorCore", "PartialPublished", "PublishPartial", "RoundOpened"]
