"""In-process simulation: the same coordinator machine and worker core, no bus.

Researchers run a job spec with many simulated clients on one machine; the coordinator
core and the workers' core, trainer and update pipeline are exactly those of a
deployment (``fedbus.worker.simulated``: each simulated worker has its own task object
and the training context a deployed worker would have), only the transport (and its
verification) is replaced by direct calls, and time is virtual, so a run is
deterministic for a seed.

**Virtual clock.** The simulator is a discrete-event loop over a heap of
``(virtual ms, sequence, event)``. A worker told to train (it is in an ``OpenRound``'s
cohort) trains at once, for real, but its update reaches the machine only at
``start + duration``: ``duration = base_train_ms x factor[w]`` (see ``Speeds``), never
measured wall time, so stragglers cost virtual seconds, not real ones, and a run is
reproducible. A worker trains one thing at a time: work handed to a worker that is
still busy (in virtual time) starts when it is free. Deadlines are fed as ``Tick`` at
the virtual times they fall due, and every live worker heartbeats (``WorkerSeen``)
every ``transport.heartbeat_s`` of virtual time while the job runs, followed by a
``Tick``. Several dispatches may be outstanding at once (async mode hands out a ticket
per idle worker), and each update's delivery is independent of every other's.

**Rows.** One per ``CloseRound`` (a committed version, or a failed sync round): the
coordinator's ``close_row`` plus ``elapsed_s`` (virtual seconds since the job started),
``staleness`` (one int per folded update) and the server test metrics.

**Many workers.** Simulated workers share one training module (each Train loads the
received model into it) and keep no sent updates, so 1,000 workers cost ~90 MB beyond
PyTorch itself (digits MLP; in-flight updates included). Partitions are the task's: the
digits pool has 1,437 samples, so 1,000 workers need ``task_params: {partition: iid}``
(1 or 2 training samples each, no validation split). A Dirichlet split cannot give every
one of 1,000 workers even one sample (any alpha, ``min_partition_size: 1``): the run is
refused with the task's message (``SimSetupError``). The simulator does not split data
itself, so a simulated worker holds exactly what a deployed one would.
"""

from __future__ import annotations

import heapq
import itertools
import math
import resource
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import numpy as np
import torch

from fedbus.coordinator.announcements import eval_open_message, round_open_message
from fedbus.coordinator.factory import machine_for
from fedbus.coordinator.inline import drive
from fedbus.coordinator.rounds import (
    CloseRound,
    FinishJob,
    InternalError,
    OpenEval,
    OpenRound,
    RoundStateMachine,
    Start,
    Tick,
    WorkerSeen,
    close_row,
)
from fedbus.crypto.envelopes import Rejection
from fedbus.jobspec import JobSpec
from fedbus.protocol.messages import encode_body
from fedbus.transforms.compress import Compress
from fedbus.tasks import load_task
from fedbus.worker.attacks import Attack
from fedbus.worker.simulated import (
    ControlChannel,
    SimulatedWorker,
    eval_received,
    receiver_pipeline,
    sim_run_id,
    update_received,
)

DEFAULT_TRAIN_MS = 1000
# Same bounds as a deployed worker's --simulate-slowdown (fedbus/worker/slowdown.py).
MAX_SLOWDOWN = 1000.0
# exp(N(0, 10)) already spans ~17 orders of magnitude between workers; more is no model of anything.
MAX_SIGMA = 10.0
# The speed draw's own stream of the job seed, so it is not correlated with partitions or training.
SPEED_STREAM = 0x5EED


class SimSetupError(ValueError):
    """The simulation cannot be set up as asked (speeds, partitioning, mode): a usage error."""


# ---- speeds ------------------------------------------------------------------------------

def parse_distribution(text: str) -> tuple[str, float]:
    """``uniform`` or ``lognormal:SIGMA`` -> (kind, sigma)."""
    kind, _, param = text.partition(":")
    if kind == "uniform" and not param:
        return "uniform", 0.0
    if kind == "lognormal":
        try:
            sigma = float(param)
        except ValueError:
            raise SimSetupError(f"speeds {text!r}: lognormal needs a number SIGMA (lognormal:0.5)") from None
        if not 0 <= sigma <= MAX_SIGMA:  # also refuses nan
            raise SimSetupError(f"speeds {text!r}: SIGMA must lie in [0, {MAX_SIGMA:g}]")
        return "lognormal", sigma
    raise SimSetupError(f"speeds {text!r}: expected uniform or lognormal:SIGMA")


@dataclass(frozen=True)
class Speeds:
    """How long each simulated worker trains, in virtual ms: ``base_train_ms x factor[w]``.

    ``factor[w]`` is 1.0 (``uniform``) or exp(N(0, SIGMA)) drawn from the job seed
    (``lognormal:SIGMA``), times ``slowdown`` for the ``stragglers`` workers, which are
    the last ones (``w08``-``w10`` of 10): easy to read off in results and the same
    workers whatever the distribution.
    """

    distribution: str = "uniform"
    stragglers: int = 0
    slowdown: float = 1.0
    base_train_ms: int = DEFAULT_TRAIN_MS

    def __post_init__(self) -> None:
        parse_distribution(self.distribution)
        if not 1.0 <= self.slowdown <= MAX_SLOWDOWN:
            raise SimSetupError(f"slowdown {self.slowdown!r} must lie in [1, {MAX_SLOWDOWN:g}]")
        if self.stragglers < 0:
            raise SimSetupError(f"stragglers {self.stragglers} must be >= 0")
        if not 1 <= self.base_train_ms <= 86_400_000:
            raise SimSetupError(f"base_train_ms {self.base_train_ms} must lie in [1, 86400000] (a day)")

    def straggler_indices(self, num_workers: int) -> range:
        if self.stragglers > num_workers:
            raise SimSetupError(f"{self.stragglers} stragglers among {num_workers} workers")
        return range(num_workers - self.stragglers, num_workers)

    def factors(self, num_workers: int, seed: int) -> list[float]:
        kind, sigma = parse_distribution(self.distribution)
        if kind == "uniform":
            factors = [1.0] * num_workers
        else:
            rng = np.random.default_rng(np.random.SeedSequence([seed % 2**32, SPEED_STREAM]))
            factors = [float(f) for f in np.exp(rng.normal(0.0, sigma, num_workers))]
        for i in self.straggler_indices(num_workers):
            factors[i] *= self.slowdown
        return factors

    def durations_ms(self, num_workers: int, seed: int) -> list[int]:
        # Whole ms like every time the machine sees; at least 1 so an update never lands
        # in the same instant its round opened (it would beat the round's own bookkeeping).
        return [max(1, round(self.base_train_ms * f)) for f in self.factors(num_workers, seed)]


# ---- results -----------------------------------------------------------------------------

@dataclass
class SimResult:
    rounds: list[dict] = field(default_factory=list)
    final: dict[str, float] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    reason: str = ""
    wall_seconds: float = 0.0
    virtual_seconds: float = 0.0
    updates_trained: int = 0  # updates workers produced
    updates_used: int = 0  # folded into a committed version
    updates_wasted: int = 0  # trained but never folded: rejected, dropped, in a failed round or still in flight
    in_flight: int = 0  # of the wasted: still travelling (in virtual time) when the job ended
    peak_rss_mb: float = 0.0  # the process's peak resident set (ru_maxrss), at the end
    # Encoded Update bodies (fields + tensor section, as a worker signs them) delivered to the
    # coordinator: what would cross the bus, envelope header and signature excluded.
    update_bytes: int = 0

    def rounds_to(self, accuracy: float) -> int | None:
        """The first model version whose server test accuracy reached ``accuracy``."""
        for r in self.rounds:
            if r.get("test_accuracy", 0.0) >= accuracy:
                return r["model_version"]
        return None

    def seconds_to(self, accuracy: float) -> float | None:
        """Virtual seconds from the job's start until a version reached ``accuracy``."""
        for r in self.rounds:
            if r.get("test_accuracy", 0.0) >= accuracy:
                return r["elapsed_s"]
        return None

    def summary(self) -> dict:
        """The run in a few numbers (what ``fedbus sim`` prints)."""
        return {"reason": self.reason, "final": self.final, "rejected": self.rejected,
                "wall_seconds": round(self.wall_seconds, 3), "virtual_seconds": round(self.virtual_seconds, 3),
                "versions": sum(1 for r in self.rounds if r["status"] == "aggregated"),
                "updates_trained": self.updates_trained, "updates_used": self.updates_used,
                "updates_wasted": self.updates_wasted, "in_flight": self.in_flight,
                "update_bytes": self.update_bytes, "peak_rss_mb": round(self.peak_rss_mb, 1)}


def worker_ids(n: int) -> list[str]:
    width = max(2, len(str(n)))
    return [f"w{i + 1:0{width}d}" for i in range(n)]


def peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


# ---- the event loop ----------------------------------------------------------------------

def simulate(job: JobSpec, num_workers: int, *, attacks: dict[int, Attack] | None = None,
             silent: Collection[int] = frozenset(), stragglers: int | Collection[int] = 0,
             slowdown: float = 1.0, speeds: str = "uniform", base_train_ms: int = DEFAULT_TRAIN_MS,
             on_round: Callable[[dict], None] | None = None) -> SimResult:
    """Run ``job`` with ``num_workers`` in-process workers on a virtual clock.

    ``attacks`` maps worker index to an attack. ``silent`` are worker indices that stay
    alive (they heartbeat and are selected) but never deliver an update: a sync round
    that selected one closes at its deadline, with the updates that arrived if they reach
    ``min_updates``. ``stragglers`` (a count: the last workers), ``slowdown``, ``speeds``
    (``uniform`` | ``lognormal:SIGMA``) and ``base_train_ms`` set each worker's virtual
    training time (``Speeds``).

    ``stragglers`` given as a set of indices is the old name of ``silent`` (callers from
    before stragglers were slow rather than mute), kept so they run unchanged.
    """
    if not isinstance(stragglers, int):
        warnings.warn("simulate(stragglers=<indices>) means silent workers: pass silent= instead",
                      DeprecationWarning, stacklevel=2)
        silent, stragglers = frozenset(silent) | frozenset(stragglers), 0
    if num_workers < 1:
        raise SimSetupError(f"num_workers {num_workers} must be >= 1")
    speed = Speeds(speeds, stragglers, slowdown, base_train_ms)
    durations = speed.durations_ms(num_workers, job.seed)
    started = time.perf_counter()
    task = load_task(job.task)
    ids = worker_ids(num_workers)
    if any(not 0 <= i < num_workers for i in silent):
        raise SimSetupError(f"silent workers {sorted(silent)} outside 0..{num_workers - 1}")
    mute = {ids[i] for i in silent}
    torch.manual_seed(job.seed)
    shared_model = task.build_model(job.task_params)  # the workers' one training module (SimulatedWorker)
    try:
        workers = {wid: SimulatedWorker(task, job, wid, partition=i, num_partitions=num_workers,
                                        attack=(attacks or {}).get(i), shared_model=shared_model,
                                        keep_sent=False)
                   for i, wid in enumerate(ids)}
    except ValueError as exc:  # e.g. a Dirichlet split that cannot give every worker a sample
        raise SimSetupError(f"{num_workers} workers on task {job.task}: {exc}") from None
    duration = dict(zip(ids, durations))
    samples = {wid: w.num_samples for wid, w in workers.items()}
    control = ControlChannel(sim_run_id(job))
    receiver = receiver_pipeline(job)
    decodes_deltas = Compress.name in receiver.names  # (the only stage whose decode needs the base model)
    torch.manual_seed(job.seed)
    model = task.build_model(job.task_params)
    test_data = task.server_test_data(job.task_params, job.seed) if job.evaluation.server_test else None
    machine = machine_for(job, {k: v.detach().clone() for k, v in model.state_dict().items()}, num_workers)
    if job.mode == "async" and type(machine) is RoundStateMachine:
        # Running the sync machine under mode: async would report sync results as async ones.
        raise SimSetupError("mode: async needs the async machine, which machine_for does not build yet")
    heartbeat_ms = max(1, int(job.transport.heartbeat_s * 1000))
    horizon_ms = _horizon_ms(job)
    result = SimResult()

    queue: list[tuple[int, int, str, object]] = []
    order = itertools.count()  # ties at one virtual ms resolve in scheduling order
    ticks_due: set[int] = set()
    busy_until = dict.fromkeys(ids, 0)  # a worker trains one thing at a time
    finished = False
    decode_rejections: Counter[str] = Counter()

    def at(when: int, kind: str, payload: object = None) -> None:
        heapq.heappush(queue, (when, next(order), kind, payload))

    def tick_at(when: int) -> None:
        if when not in ticks_due:
            ticks_due.add(when)
            at(when, "tick")

    def server_eval(state) -> dict[str, float]:
        if test_data is None:
            return {}
        model.load_state_dict(state)
        ev = task.evaluate(model, test_data)
        return {"test_loss": float(ev.loss), "test_accuracy": float(ev.accuracy)}

    def act(actions: list, now: int) -> None:
        nonlocal finished
        for action in actions:
            match action:
                case OpenRound():
                    message = control.message(*round_open_message(job, action), now)
                    for wid in action.cohort:
                        if wid in mute:
                            continue
                        for sent in workers[wid].receive(message):
                            begin = max(now, busy_until[wid])
                            busy_until[wid] = begin + duration[wid]
                            result.updates_trained += 1
                            at(busy_until[wid], "update", (wid, sent))
                    tick_at(action.deadline_ms)
                case CloseRound():
                    row = _row(action, now)
                    if action.status == "aggregated":
                        row.update(server_eval(action.state))
                        result.updates_used += row["folded"]
                    result.rounds.append(row)
                    if on_round:
                        on_round(row)
                case OpenEval():
                    message = control.message(*eval_open_message(action), now)
                    for wid in action.cohort:
                        for sent in workers[wid].receive(message):
                            # Evaluation is not timed; a worker still training finishes that first.
                            at(max(now, busy_until[wid]), "eval", (wid, sent))
                    tick_at(action.deadline_ms)
                case FinishJob():
                    finished = True
                    result.reason = action.reason
                    result.final = {**server_eval(machine.state), **action.metrics}
                case InternalError():
                    raise RuntimeError(f"the machine failed on {action.event}: {action.error}")
                case _:
                    pass  # RejectUpdate / DuplicateIgnored: counted by the machine

    # Every worker is up before the coordinator starts (a deployment's workers heartbeat
    # while they wait), so round 1's cohort is drawn from all of them.
    for wid in ids:
        act(drive(machine, WorkerSeen(wid, samples[wid], 0)), 0)
    act(drive(machine, Start(0)), 0)
    at(heartbeat_ms, "heartbeat")
    now = 0
    while queue and not finished:
        when, _, kind, payload = heapq.heappop(queue)
        if when > horizon_ms:  # a bounded loop: a machine that never finishes ends here
            result.reason = "virtual_time_limit"
            break
        now = when
        if kind == "update":
            wid, sent = payload
            result.update_bytes += len(encode_body(sent.fields, sent.tensors))
            try:
                base = machine.base_for(sent.fields.base_version) if decodes_deltas else None
                event = update_received(receiver, wid, sent, now, base)
            except Rejection as rej:  # the receiving decode refused it, as a deployed coordinator would
                decode_rejections[rej.reason] += 1
                continue
            act(drive(machine, event), now)
        elif kind == "eval":
            wid, sent = payload
            act(drive(machine, eval_received(wid, sent, now)), now)
        elif kind == "tick":
            ticks_due.discard(now)
            act(drive(machine, Tick(now)), now)
        elif kind == "heartbeat":
            for wid in ids:
                act(drive(machine, WorkerSeen(wid, samples[wid], now)), now)
            act(drive(machine, Tick(now)), now)
            at(now + heartbeat_ms, "heartbeat")
    result.in_flight = sum(1 for entry in queue if entry[2] == "update")
    result.updates_wasted = result.updates_trained - result.updates_used
    result.rejected = dict(Counter(machine.rejections) + decode_rejections)
    result.virtual_seconds = now / 1000.0
    result.wall_seconds = time.perf_counter() - started
    result.peak_rss_mb = peak_rss_mb()
    return result


def _row(close: CloseRound, now_ms: int) -> dict:
    row = close_row(close)
    row.setdefault("elapsed_s", now_ms / 1000.0)  # the machine's own count, where it keeps one, is the same
    # Updates folded into the version: accepted ones plus, where the machine folds them,
    # late ones of the round before (late_updates: next_round).
    folded = row.get("folded", row["accepted"]) if close.status == "aggregated" else 0
    row["folded"] = folded
    staleness = row.get("staleness")
    if not isinstance(staleness, list) or len(staleness) != folded:
        # A machine that reports no staleness folds only updates trained from its own base.
        staleness = [0] * folded
    row["staleness"] = [int(s) for s in staleness]
    return row


def _horizon_ms(job: JobSpec) -> int:
    """Virtual time after which the loop gives up: far beyond any job that progresses
    (every version after up to three failed rounds and a full wait for workers)."""
    per_version = 4 * job.round_deadline_s + job.cohort.wait_for_workers_s
    return int(math.ceil((job.rounds + 2) * per_version * 1000))
