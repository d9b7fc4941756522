"""AsyncAggregatorCore: a region's aggregator in async mode (FedBuff through regions).

The coordinator hands out assignments (a round.open per ticket: the workers told to train
a model version). The region's aggregator follows them, keeps the models of the last
``max_staleness`` + 1 versions it saw, checks each of its workers' updates as the
coordinator does (the ticket must be assigned to the worker, on the version the update
names), and folds it into an accumulator of that update's own base version. Every
``region_buffer_size`` updates (or after ``flush_after_ms`` with fewer), it forwards one
partial per base version: the coordinator, which alone knows the current version, then
weighs each by its staleness s(τ) as it would weigh each update (the bookkeeping stays
intact). Updates are acknowledged once every partial of their flush was acknowledged.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from fedbus.aggregation.base import AggregationRule, InvalidUpdate, State
from fedbus.aggregator.core import PartialPublished, PublishPartial, RoundOpened
from fedbus.coordinator.machine import MachineBase
from fedbus.coordinator.metrics import weighted_means
from fedbus.coordinator.rounds import DuplicateIgnored, RejectUpdate, RoundPolicy, Tick, UpdateReceived, WorkerSeen, \
    fold_update
from fedbus.protocol.runs import run_started_ms

RECENT = 4096  # forwarded (worker, ticket) pairs remembered: a redelivery of one is a duplicate


@dataclass(frozen=True)
class AckKeys:
    """These (ticket, worker) updates are inside acknowledged partials: acknowledge them."""

    keys: tuple[tuple[int, str], ...]


@dataclass
class _Group:
    version: int
    accumulator: object
    reported: dict[tuple[str, int], tuple[bytes, float, int, bytes]] = field(default_factory=dict)


class AsyncAggregatorCore(MachineBase):
    def __init__(self, region: str, members: list[str], limits: RoundPolicy, rule: AggregationRule,
                 initial_state: State, *, buffer_size: int, max_staleness: int, flush_after_ms: int = 1000):
        self.region = region
        self.members = frozenset(members)
        self._init_checks(limits, rule, initial_state)
        self.buffer_size = buffer_size
        self.max_staleness = max_staleness
        self.flush_after_ms = flush_after_ms
        self.run: str | None = None
        self.max_ticket = 0
        self.history: dict[int, State] = {}
        self.assigned: OrderedDict[tuple[str, int], int] = OrderedDict()  # (worker, ticket) -> version
        self.declared: dict[str, int] = {}
        self.groups: dict[int, _Group] = {}
        self.buffered = 0
        self._first_ms: int | None = None
        self.recent: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._flush_seq = 0
        self._flushing: dict[int, tuple[int, tuple[tuple[int, str], ...]]] = {}  # seq -> (partials left, keys)
        self._trace: str | None = None
        self.partials_published = 0
        self.cohort: tuple[str, ...] = ()
        self._eval_reported: set[str] = set()
        self._eval_metrics: list = []
        self._metrics: list[tuple[float, dict[str, float]]] = []

    def _declared(self, worker: str) -> int | None:
        return self.declared.get(worker, self.registry.declared(worker))

    def note_published(self, run: str, round_: int) -> None:
        """(Sync aggregators skip a round already published; flushes here are not rounds.)"""

    def accepts(self, run: str | None, round_: int) -> bool:
        return run is not None and run == self.run and 0 < round_ <= self.max_ticket

    def opens_soon(self, run: str | None, round_: int) -> bool:
        """An update of a ticket not seen yet (its round.open is still on its way)."""
        if run is None:
            return False
        if self.run is None:
            return True
        if run == self.run:
            return self.max_ticket < round_ <= self.max_ticket + 64
        return run_started_ms(run) > run_started_ms(self.run)

    # ---- events ------------------------------------------------------------------------

    def _dispatch(self, event, out: list) -> None:
        match event:
            case RoundOpened():
                self._on_assignment(event)
            case WorkerSeen(worker_id=w, num_samples=n, now_ms=now):
                self.registry.seen(w, n, now)
            case UpdateReceived():
                self._on_update(event, out)
                self._flush_if_due(event.now_ms, out)
            case Tick(now_ms=now):
                self._flush_if_due(now, out)
            case PartialPublished():
                self._on_published(event, out)
            case _:
                raise TypeError(f"unknown event {event!r}")

    def _on_assignment(self, ev: RoundOpened) -> None:
        if self.run is not None and ev.run != self.run and run_started_ms(ev.run) < run_started_ms(self.run):
            return  # an older run's assignment
        if ev.run != self.run:
            self.run, self.max_ticket = ev.run, 0
            self.assigned.clear()
            self.groups.clear()
            self.buffered = 0
        self.max_ticket = max(self.max_ticket, ev.round)
        self._trace = ev.trace
        self.history.setdefault(ev.model_version, ev.state)
        newest = max(self.history)
        for v in [v for v in self.history if v < newest - self.max_staleness]:
            del self.history[v]
        for w, n in zip(ev.cohort, ev.declared):
            if w in self.members and n > 0:
                self.declared[w] = n
        for w in ev.cohort:
            if w in self.members:
                self.assigned[(w, ev.round)] = ev.model_version
        while len(self.assigned) > 10 * max(1, len(self.members)) + 1024:
            self.assigned.popitem(last=False)

    def _reject(self, ev: UpdateReceived, reason: str, detail: str, out: list) -> None:
        self.rejections[reason] += 1
        out.append(RejectUpdate(ev.worker_id, ev.round, reason, detail))

    def _on_update(self, ev: UpdateReceived, out: list) -> None:
        key = (ev.worker_id, ev.round)
        if ev.worker_id not in self.members:
            return self._reject(ev, "wrong_region", f"{ev.worker_id} is not a worker of region {self.region}", out)
        done = self.recent.get(key)
        if done is None:
            done = next((g.reported[key][0] for g in self.groups.values() if key in g.reported), None)
        if done is not None:
            if ev.digest and done == ev.digest:
                out.append(DuplicateIgnored(ev.worker_id, ev.round))
                return None
            return self._reject(ev, "duplicate_update", "", out)
        version = self.assigned.get(key)
        if version is None:
            return self._reject(ev, "not_in_cohort", f"ticket {ev.round} is not assigned to {ev.worker_id}", out)
        if ev.base_version is not None and ev.base_version != version:
            return self._reject(ev, "wrong_round", f"trained from version {ev.base_version}, ticket {ev.round} "
                                                   f"assigned version {version}", out)
        base = self.history.get(version)
        if base is None:
            return self._reject(ev, "too_stale", f"version {version} is older than this region keeps", out)
        reason, detail, _ = self.update_problem(ev, base)
        if reason:
            return self._reject(ev, reason, detail, out)
        group = self.groups.get(version)
        if group is None:
            group = self.groups[version] = _Group(version, self.rule.begin(base, version))
        try:
            fold_update(group.accumulator, ev.update)
        except InvalidUpdate as exc:
            return self._reject(ev, "invalid_update", str(exc), out)
        group.reported[key] = (ev.digest, float(ev.update.num_samples), version, ev.proof)
        self._metrics.append((float(ev.update.num_samples), ev.train_metrics))
        self.buffered += 1
        if self._first_ms is None:
            self._first_ms = ev.now_ms
        return None

    def _flush_if_due(self, now: int, out: list) -> None:
        if not self.buffered:
            return
        if self.buffered < self.buffer_size and now - (self._first_ms or now) < self.flush_after_ms:
            return
        self._flush_seq += 1
        keys = []
        metrics, weight = weighted_means(self._metrics, "train_"), sum(w for w, _ in self._metrics)
        for version in sorted(self.groups):
            group = self.groups[version]
            partial = group.accumulator.partial()
            contributors = []
            # partial.contributors and reported are both in fold order
            for c, ((w, ticket), entry) in zip(partial.contributors, group.reported.items()):
                assert c.worker_id == w
                contributors.append((w, *entry))
                keys.append((ticket, w))
                self.recent[(w, ticket)] = entry[0]
            out.append(PublishPartial(self.run, self._flush_seq, partial, tuple(contributors), metrics, weight,
                                      self._trace))
        while len(self.recent) > RECENT:
            self.recent.popitem(last=False)
        self._flushing[self._flush_seq] = (len(self.groups), tuple(keys))
        self.groups.clear()
        self.buffered = 0
        self._first_ms = None
        self._metrics = []

    def _on_published(self, ev: PartialPublished, out: list) -> None:
        left, keys = self._flushing.get(ev.round, (0, ()))
        if left <= 1:
            self._flushing.pop(ev.round, None)
            self.partials_published += 1
            out.append(AckKeys(keys))
        else:
            self._flushing[ev.round] = (left - 1, keys)


__all__ = ["AckKeys", "AsyncAggregatorCore"]
