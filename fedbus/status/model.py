"""The status model of `fedbus status`: verified observations of a job in, a view out.

Pure and synchronous (no bus, no clock of its own): the reader feeds it what it verified
on the bus, the renderer draws ``view(now_ms)``, and the unit tests drive it directly.

Sources, all of them signed and verified before they get here:

- the coordinator's committed ``JobRecord`` (the ``fedbus-jobs`` KV entry of the job):
  round or model version, phase, cohort, async assignments, and the row of the round the
  commit closed (staleness, rejections, metrics such as test accuracy and ``dp_epsilon``);
- ``round.open`` headers (when a round opened) and ``round.close`` / ``job.done`` bodies;
- workers' heartbeats (alive, and whether they are training right now).

Everything kept is bounded: closes and cohorts by ``RECENT``, workers by the federation
(only verified senders reach the model).
"""

from __future__ import annotations

import math
import statistics
from collections import OrderedDict
from dataclasses import dataclass, field

RECENT = 32  # closed rounds (versions) kept: rejections and staleness are summed over these
ACCURACY_SHOWN = 8  # the most recent accuracies in the view
# A heartbeat older than this many heartbeat intervals: the worker is silent.
SILENT_AFTER_BEATS = 3.0
# Async: an assignment this many versions behind the current model (and twice the median
# lag of all outstanding ones) is a straggler's.
ASYNC_STRAGGLER_MIN_LAG = 3
# The keys of a summary row that are not metrics (fedbus.coordinator.rounds.close_row).
_ROW_FIELDS = frozenset({"round", "model_version", "status", "seconds", "accepted", "accepted_workers",
                         "late_workers", "folded", "staleness", "rejected", "elapsed_s", "tickets", "via_region"})
EPSILON_METRIC = "dp_epsilon"  # fedbus.coordinator.rounds.DP_EPSILON


@dataclass
class Close:
    """One closed round (sync) or committed version (async), merged from the KV record's
    ``last_close`` row and the ``round.close`` announcement."""

    round: int
    model_version: int
    status: str
    seconds: float = 0.0
    accepted: tuple[str, ...] = ()
    late: tuple[str, ...] = ()
    staleness: tuple[int, ...] = ()
    rejected: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    from_record: bool = False  # the KV row is the richer source: it wins over the announcement


@dataclass
class _Worker:
    status: str
    last_ms: int
    region: str


@dataclass(frozen=True)
class StatusView:
    """What one screen of `fedbus status` shows."""

    job: str
    run: str | None
    mode: str  # "sync" | "async" | "?" (nothing committed yet)
    phase: str | None
    round: int | None  # sync: the round; async: the last assignment ticket
    model_version: int | None
    completed: int | None  # rounds (sync) or versions (async) committed
    total: int | None  # from the job spec, when known
    done_reason: str | None
    cohort: tuple[str, ...]
    training: tuple[str, ...]
    stragglers: tuple[str, ...]  # the current round waits on them / async: far behind
    missed: tuple[str, ...]  # sync: the last closed round's cohort members not folded into its model
    missed_round: int | None
    round_age_s: float | None  # since the current round (sync) opened
    deadline_s: float | None  # the round's deadline from the job spec
    alive: int
    silent: tuple[str, ...]
    staleness_last: tuple[int, ...]
    staleness_max: int | None  # over the closes kept
    rejected: dict[str, int]  # by reason, summed over the closes kept
    closes_kept: int
    epsilon: float | None
    accuracy: tuple[tuple[int, float], ...]  # (model version, test accuracy), oldest first
    last_close: Close | None
    record_age_s: float | None  # since the coordinator's last commit
    problems: tuple[str, ...]  # what the reader could not verify (counted by reason)

    @property
    def unit(self) -> str:
        return "version" if self.mode == "async" else "round"


def _ints(values) -> tuple[int, ...]:
    out = []
    for v in values or ():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out.append(int(v))
    return tuple(out)


def _strs(values) -> tuple[str, ...]:
    return tuple(str(v) for v in values or () if isinstance(v, str))


def close_from_row(row: dict) -> Close | None:
    """A ``last_close`` row of a committed record (summary.json's row format)."""
    try:
        round_, version = int(row["round"]), int(row["model_version"])
    except (KeyError, TypeError, ValueError):
        return None
    rejected = row.get("rejected") if isinstance(row.get("rejected"), dict) else {}
    metrics = {str(k): float(v) for k, v in row.items()
               if k not in _ROW_FIELDS and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    return Close(round=round_, model_version=version, status=str(row.get("status", "")),
                 seconds=float(row.get("seconds") or 0.0), accepted=_strs(row.get("accepted_workers")),
                 late=_strs(row.get("late_workers")), staleness=_ints(row.get("staleness")),
                 rejected={str(k): int(v) for k, v in rejected.items() if isinstance(v, int) and not isinstance(v, bool)},
                 metrics=metrics, from_record=True)


class StatusModel:
    """Observations in, ``StatusView`` out. ``mode``/``total``/``heartbeat_s``/``deadline_s``
    come from the job spec when the user gave one (``None``: inferred or not shown)."""

    def __init__(self, job: str, *, mode: str | None = None, total: int | None = None, heartbeat_s: float = 1.0,
                 deadline_s: float | None = None):
        self.job = job
        self.mode = mode
        self.total = total
        self.heartbeat_s = heartbeat_s
        self.deadline_s = deadline_s
        self.run: str | None = None
        self.record: dict | None = None
        self.updated_ms: int | None = None
        self.done_reason: str | None = None
        self.closes: OrderedDict[int, Close] = OrderedDict()  # by round (ticket), oldest first
        self.cohorts: OrderedDict[int, tuple[str, ...]] = OrderedDict()  # sync: each round's cohort
        self.opened_ms: dict[int, int] = {}  # round -> when round.open was signed
        self.workers: dict[str, _Worker] = {}
        self.problems: dict[str, int] = {}

    # ---- inputs -------------------------------------------------------------------------

    def record_committed(self, doc: dict) -> None:
        """A verified KV document (``{"run", "record", "updated_ms", ...}``) of this job."""
        rec = doc.get("record")
        if not isinstance(rec, dict):
            self.problem("malformed_record")
            return
        run = doc.get("run") if isinstance(doc.get("run"), str) else None
        if run != self.run:
            self._new_run(run)
        self.record = rec
        self.updated_ms = int(doc["updated_ms"]) if isinstance(doc.get("updated_ms"), int) else None
        phase = rec.get("phase")
        if self.mode is None and (phase == "async" or isinstance(rec.get("async_state"), dict)):
            self.mode = "async"
        try:
            round_ = int(rec.get("round", 0))
        except (TypeError, ValueError):
            round_ = 0
        cohort = _strs(rec.get("cohort"))
        if phase == "round_open" and cohort:
            self._remember(self.cohorts, round_, cohort)
        if phase == "done":
            self.done_reason = str(rec.get("reason") or "done")
        row = rec.get("last_close")
        if isinstance(row, dict):
            close = close_from_row(row)
            if close is not None:
                self._add_close(close)

    def record_purged(self) -> None:
        """The KV entry was purged: a fresh run of the job is starting."""
        self._new_run(None)

    def round_opened(self, round_: int, signed_ms: int, run: str | None) -> None:
        if run is not None and self.run is not None and run != self.run:
            return
        if len(self.opened_ms) >= RECENT:
            self.opened_ms.pop(min(self.opened_ms))
        self.opened_ms[round_] = signed_ms

    def round_closed(self, close: Close, run: str | None) -> None:
        """A verified ``round.close`` announcement."""
        if run is not None and self.run is not None and run != self.run:
            return
        self._add_close(close)

    def job_done(self, reason: str, run: str | None) -> None:
        if run is not None and self.run is not None and run != self.run:
            return
        self.done_reason = reason or "done"

    def heartbeat(self, worker: str, status: str, region: str, now_ms: int) -> None:
        self.workers[worker] = _Worker(status, now_ms, region)

    def problem(self, reason: str) -> None:
        """Something the reader refused (a bad signature, a malformed record): counted, shown."""
        self.problems[reason] = self.problems.get(reason, 0) + 1

    # ---- bookkeeping --------------------------------------------------------------------

    def _new_run(self, run: str | None) -> None:
        self.run = run
        self.record = None
        self.done_reason = None
        self.closes.clear()
        self.cohorts.clear()
        self.opened_ms.clear()

    @staticmethod
    def _remember(table: OrderedDict, key: int, value) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > RECENT:
            table.popitem(last=False)

    def _add_close(self, close: Close) -> None:
        known = self.closes.get(close.round)
        if known is not None and known.from_record and not close.from_record:
            return  # the committed row already says more than the announcement
        self._remember(self.closes, close.round, close)
        # Kept in round order whatever order the two sources delivered them in.
        if len(self.closes) > 1 and list(self.closes) != sorted(self.closes):
            ordered = sorted(self.closes.items())
            self.closes.clear()
            self.closes.update(ordered)

    def _still_training(self, cohort: tuple[str, ...], opened_ms: int, now_ms: int) -> tuple[str, ...]:
        """Sync: the cohort members the open round waits on. Workers start training as soon as
        round.open reaches them, so a heartbeat sent half an interval after the open that says
        anything but ``training`` means done (or not taking part). Once the round is two
        heartbeat intervals old and at least half of the cohort is done, those whose latest
        heartbeat still says ``training`` are the stragglers."""
        beat_ms = self.heartbeat_s * 1000
        if now_ms - opened_ms < 2 * beat_ms:
            return ()
        heard = [w for w in cohort if w in self.workers and self.workers[w].last_ms >= opened_ms + beat_ms / 2]
        busy = [w for w in heard if self.workers[w].status == "training"]
        if 2 * (len(heard) - len(busy)) < len(cohort):
            return ()
        return tuple(sorted(busy))

    # ---- output -------------------------------------------------------------------------

    def view(self, now_ms: int) -> StatusView:
        rec = self.record or {}
        mode = self.mode or ("sync" if rec else "?")
        phase = rec.get("phase") if rec else None
        round_ = _int_or_none(rec.get("round"))
        version = _int_or_none(rec.get("model_version"))
        cohort = _strs(rec.get("cohort"))
        silent_ms = SILENT_AFTER_BEATS * self.heartbeat_s * 1000
        alive = {w for w, s in self.workers.items() if now_ms - s.last_ms <= silent_ms}
        silent = tuple(sorted(set(self.workers) - alive))
        training = {w for w in alive if self.workers[w].status == "training"}
        stragglers: tuple[str, ...] = ()
        missed: tuple[str, ...] = ()
        missed_round = None
        round_age = None
        last = next(reversed(self.closes.values()), None) if self.closes else None
        if phase == "done" and last is not None:
            round_ = last.round  # (the finished record already counts one past the last round)
        if mode == "async":
            outstanding = _outstanding(rec.get("async_state"))
            training |= {w for w, _ in outstanding}
            if version is not None and outstanding:
                lags = [max(0, version - v) for _, v in outstanding]
                bar = max(ASYNC_STRAGGLER_MIN_LAG, 2 * statistics.median(lags))
                stragglers = tuple(sorted(w for (w, _), lag in zip(outstanding, lags) if lag >= bar))
            cohort = tuple(sorted({w for w, _ in outstanding}))
        else:
            opened = self.opened_ms.get(round_) if round_ is not None else None
            if phase == "round_open" and cohort and opened is not None:
                round_age = max(0.0, (now_ms - opened) / 1000)
                stragglers = self._still_training(cohort, opened, now_ms)
            if last is not None and last.round in self.cohorts:
                folded = set(last.accepted) | set(last.late)
                missed = tuple(sorted(set(self.cohorts[last.round]) - folded))
                missed_round = last.round
        rejected: dict[str, int] = {}
        for c in self.closes.values():
            for reason, n in c.rejected.items():
                rejected[reason] = rejected.get(reason, 0) + n
        staleness_all = [s for c in self.closes.values() for s in c.staleness]
        epsilon = None
        for c in reversed(self.closes.values()):
            if EPSILON_METRIC in c.metrics:
                epsilon = c.metrics[EPSILON_METRIC]
                break
        accuracy = tuple((c.model_version, c.metrics["test_accuracy"]) for c in self.closes.values()
                         if "test_accuracy" in c.metrics)[-ACCURACY_SHOWN:]
        return StatusView(
            job=self.job, run=self.run, mode=mode, phase=phase, round=round_, model_version=version,
            completed=_int_or_none(rec.get("rounds_completed")), total=self.total, done_reason=self.done_reason,
            cohort=cohort, training=tuple(sorted(training)), stragglers=stragglers, missed=missed,
            missed_round=missed_round, round_age_s=round_age, deadline_s=self.deadline_s, alive=len(alive),
            silent=silent, staleness_last=last.staleness if last else (),
            staleness_max=max(staleness_all) if staleness_all else None, rejected=dict(sorted(rejected.items())),
            closes_kept=len(self.closes), epsilon=epsilon, accuracy=accuracy, last_close=last,
            record_age_s=None if self.updated_ms is None else max(0.0, (now_ms - self.updated_ms) / 1000),
            problems=tuple(f"{k} x{v}" for k, v in sorted(self.problems.items())))


def _int_or_none(value) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _outstanding(async_state) -> list[tuple[str, int]]:
    """(worker, base version) of each outstanding async assignment in a committed record."""
    out = []
    if isinstance(async_state, dict):
        for item in async_state.get("outstanding") or ():
            try:
                worker, _ticket, version = item
                out.append((str(worker), int(version)))
            except (TypeError, ValueError):
                continue
    return out
