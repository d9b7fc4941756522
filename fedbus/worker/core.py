"""The worker's sans-I/O core: verified control messages and finished work in, actions out.

No awaits, no clocks, no bus: time comes in the events (``now_ms``). ``WorkerService``
translates NATS messages into events and runs the actions (heavy work in threads);
``fedbus sim`` feeds the same events to one core per simulated worker and runs the same
actions with the same ``LocalTrainer``, so a simulated worker is a deployed one minus
the transport.

Events
    ``ControlVerified``   a control message that passed envelope verification
                          (round.open, eval.open, round.close, job.done), with its
                          header's run, round, nonce and the receiver's clock
    ``TrainingFinished``  the pipeline's encoded update for a ``Train`` action
    ``EvaluationFinished`` the report for an ``Evaluate`` action
    ``WorkFailed``        training or evaluation raised (the round is not marked answered)

Actions
    ``Train``         train the round (evaluate the received model first if asked)
    ``Evaluate``      evaluate a model on the held-out split
    ``PublishUpdate`` send (or resend, ``resend=True``) an update under ``run``/``round``
    ``PublishEvalReport``
    ``Exit``          the job is over for the run this worker follows
    ``Ignore``        nothing to do, with a reason (not in the cohort, deadline passed, ...)
    ``Reject``        a verified message this worker refuses, with a named reason
                      (``wrong_run``, ``tensor_mismatch``, ``non_finite``)

Run binding: the core follows the newest run seen in a verified round.open, eval.open or
round.close (ordered by ``run_started_ms``, then by id), refuses control messages of
older runs (``wrong_run``), and accepts ``job.done`` only for the run it follows; a core
following no run yet ignores ``job.done`` (a fresh worker is replayed the previous
run's last ``job.done`` by the control stream). Control messages without a run are
ignored (``no_run``): every coordinator names its run, so an unbound one can only be a
replay from before run binding.

Rejoin: a round.open for a (run, round) this worker already answered, in a control
message it has not handled before (another nonce: a resumed coordinator reopened the
round), makes the core resend the stored update (``PublishUpdate(resend=True)``); the
service re-seals it with a fresh nonce and timestamp. Without a stored update (a
restart without state) the round is trained again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

from fedbus.crypto.envelopes import Rejection, check_tensors
from fedbus.protocol.codec import Tensor, TensorSpec
from fedbus.protocol.messages import Body, EvalOpen, EvalReport, JobDone, RoundClose, RoundOpen, Update
from fedbus.protocol.runs import run_order
from fedbus.protocol.tensor_groups import split_groups
from fedbus.tasks import TrainingContext, training_context

# Nonces of handled control messages remembered for de-duplication (bounded).
SEEN_NONCES = 4096
# Stored updates kept per core (the latest rounds answered; a reopened round is the last one).
KEEP_SENT = 4
# Updates of at least this many bytes are the trainer's model tensors themselves, not
# copies (trainer.py): they are kept for a resend only until the model is loaded again,
# i.e. until the next round.open or eval.open is acted on (_release_large_sent).
UPDATE_ALIAS_MIN_BYTES = 16 * 1024 * 1024

RunKey = tuple[str | None, int]  # (run, round)


# ---- events -------------------------------------------------------------------------------

@dataclass(frozen=True)
class ControlVerified:
    fields: Body
    tensors: Mapping[str, Tensor] | None
    run: str | None
    round: int
    nonce: bytes
    ts_ms: int
    now_ms: int
    trace: str | None = None


@dataclass(frozen=True)
class TrainingFinished:
    run: str | None
    round: int
    fields: Update
    tensors: dict[str, Tensor]
    trace: str | None = None


@dataclass(frozen=True)
class WorkFailed:
    """Training or evaluation raised; the round may be tried again on its next round.open."""

    kind: str  # "train" | "evaluate"
    run: str | None
    round: int


@dataclass(frozen=True)
class EvaluationFinished:
    run: str | None
    round: int
    fields: EvalReport
    trace: str | None = None


# ---- actions ------------------------------------------------------------------------------

class _InContext:
    """Actions that carry a TrainingContext name their run and round through it."""

    context: TrainingContext

    @property
    def run(self) -> str | None:
        return self.context.run

    @property
    def round(self) -> int:
        return self.context.round


@dataclass(frozen=True)
class Train(_InContext):
    context: TrainingContext
    model: dict[str, Tensor]
    broadcast: dict[str, dict[str, Tensor]]  # strategy extras, by group
    settings: dict  # the round's training settings, as sent
    evaluate: bool  # evaluate the received model on the held-out split first
    base_version: int
    deadline_ms: int
    trace: str | None = None


@dataclass(frozen=True)
class Evaluate(_InContext):
    context: TrainingContext
    model: dict[str, Tensor]
    model_version: int
    trace: str | None = None


@dataclass(frozen=True)
class PublishUpdate:
    run: str | None
    round: int
    fields: Update
    tensors: dict[str, Tensor]
    resend: bool = False
    trace: str | None = None


@dataclass(frozen=True)
class PublishEvalReport:
    run: str | None
    round: int
    fields: EvalReport
    trace: str | None = None


@dataclass(frozen=True)
class Exit:
    reason: str
    rounds_completed: int


@dataclass(frozen=True)
class Ignore:
    reason: str
    type: str
    round: int
    run: str | None = None


@dataclass(frozen=True)
class Reject:
    reason: str
    type: str
    round: int
    run: str | None = None
    detail: str = ""


Action = Train | Evaluate | PublishUpdate | PublishEvalReport | Exit | Ignore | Reject


@dataclass
class SentUpdate:
    fields: Update
    tensors: dict[str, Tensor]


@dataclass
class WorkerCore:
    worker_id: str
    partition: int
    num_partitions: int
    job_seed: int
    model_spec: Mapping[str, TensorSpec]
    # Updates already sent, by (run, round): loaded from the state directory on start.
    sent: dict[RunKey, SentUpdate] = field(default_factory=dict)
    # The job's deterministic mode: training seeds leave the run out (reruns train identically).
    deterministic: bool = False
    # Sync rounds: a round.open for a round already seen closed is not trained (a slow worker
    # catching up on queued control messages trains the newest open round instead). In async
    # mode round.close numbers versions, not the tickets round.open carries: off.
    skip_closed_rounds: bool = False
    # Updates kept in ``sent`` (a worker pool keeps 1: a reopened round is the last one, and
    # 1,000 hosted workers x KEEP_SENT models is memory for nothing).
    keep_sent: int = KEEP_SENT
    run: str | None = None  # the run this worker follows
    status: str = "idle"  # "idle" | "training" | "done" (heartbeats report it)
    rounds_trained: int = 0
    _in_progress: set[RunKey] = field(default_factory=set)
    _evaluated: dict[RunKey, EvalReport | None] = field(default_factory=dict)
    _seen: OrderedDict = field(default_factory=OrderedDict)
    _closed: OrderedDict = field(default_factory=OrderedDict)  # (run, round) seen closed (bounded)

    # -- the one entry point --------------------------------------------------------------

    def handle(self, event: ControlVerified | TrainingFinished | EvaluationFinished | WorkFailed) -> list[Action]:
        if isinstance(event, WorkFailed):
            key = (event.run, event.round)
            if event.kind == "train":
                self._in_progress.discard(key)
                self.status = "idle" if self.status == "training" else self.status
            else:
                self._evaluated.pop(key, None)
            return []
        if isinstance(event, ControlVerified):
            return self._on_control(event)
        if isinstance(event, TrainingFinished):
            return self._on_trained(event)
        if isinstance(event, EvaluationFinished):
            return self._on_evaluated(event)
        raise TypeError(f"not a worker event: {type(event).__name__}")

    def context(self, run: str | None, round_: int) -> TrainingContext:
        return training_context(job_seed=self.job_seed, run=run, worker_id=self.worker_id, partition=self.partition,
                                num_partitions=self.num_partitions, round_=round_, seed_with_run=not self.deterministic)

    # -- control ----------------------------------------------------------------------------

    def _on_control(self, ev: ControlVerified) -> list[Action]:
        kind = ev.fields.TYPE
        if ev.nonce in self._seen:
            return [Ignore("duplicate_message", kind, ev.round, ev.run)]
        self._seen[ev.nonce] = None
        while len(self._seen) > SEEN_NONCES:
            self._seen.popitem(last=False)
        if ev.run is None:
            return [Ignore("no_run", kind, ev.round)]
        body_round = getattr(ev.fields, "round", None)
        if body_round is not None and body_round != ev.round:
            # The verifier should have refused it; the core trusts only what both agree on.
            return [Reject("header_mismatch", kind, ev.round, ev.run, f"body round {body_round}")]
        if self.run is not None and run_order(ev.run) < run_order(self.run):
            return [Reject("wrong_run", kind, ev.round, ev.run, f"following {self.run}")]
        elif not isinstance(ev.fields, JobDone) and ev.run != self.run:
            self._follow(ev.run)
        fields = ev.fields
        if isinstance(fields, JobDone):
            return self._on_job_done(ev, fields)
        if isinstance(fields, RoundOpen):
            return self._on_round_open(ev, fields)
        if isinstance(fields, EvalOpen):
            return self._on_eval_open(ev, fields)
        if isinstance(fields, RoundClose):
            self.note_closed(ev.run, ev.round)
            return [Ignore("round_closed", kind, ev.round, ev.run)]
        return [Reject("unknown_type", kind, ev.round, ev.run)]

    def note_closed(self, run: str | None, round_: int) -> None:
        """A verified round.close: that round needs no more work (see skip_closed_rounds)."""
        self._closed[(run, round_)] = None
        while len(self._closed) > SEEN_NONCES:
            self._closed.popitem(last=False)

    def _follow(self, run: str) -> None:
        self.run = run
        # Work of older runs can never be resent to the new one.
        self.sent = {k: v for k, v in self.sent.items() if k[0] == run or k[0] is None}

    def _on_job_done(self, ev: ControlVerified, fields: JobDone) -> list[Action]:
        if ev.run is not None and ev.run != self.run:
            reason = "no_run_followed" if self.run is None else "wrong_run"
            return [Ignore(reason, fields.TYPE, ev.round, ev.run)]
        self.status = "done"
        return [Exit(fields.reason, fields.rounds_completed)]

    def _model_of(self, ev: ControlVerified) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
        model, groups = split_groups(ev.tensors or {})
        check_tensors(model, self.model_spec)  # raises Rejection (tensor_mismatch, non_finite)
        return model, groups

    def _on_round_open(self, ev: ControlVerified, ro: RoundOpen) -> list[Action]:
        if self.worker_id not in ro.cohort:
            return [Ignore("not_in_cohort", ro.TYPE, ro.round, ev.run)]
        key = (ev.run, ro.round)
        if key in self._in_progress:
            return [Ignore("in_progress", ro.TYPE, ro.round, ev.run)]
        if ev.now_ms > ro.deadline_ms:
            return [Ignore("deadline_passed", ro.TYPE, ro.round, ev.run)]
        if self.skip_closed_rounds and key in self._closed:
            return [Ignore("round_closed", ro.TYPE, ro.round, ev.run)]
        stored = self.sent.get(key)
        if stored is not None:
            # A reopened round (resumed coordinator): the same body, re-sealed by the service.
            return [PublishUpdate(ev.run, ro.round, stored.fields, stored.tensors, resend=True, trace=ev.trace)]
        try:
            model, groups = self._model_of(ev)
        except Rejection as rej:
            return [Reject(rej.reason, ro.TYPE, ro.round, ev.run, rej.detail)]
        self._release_large_sent()
        self._in_progress.add(key)
        self.status = "training"
        return [Train(self.context(ev.run, ro.round), model, groups, dict(ro.train), ro.evaluate, ro.model_version,
                      ro.deadline_ms, ev.trace)]

    def _release_large_sent(self) -> None:
        """The model is about to be loaded again: large sent updates (its own tensors) go.
        A resend of one after this retrains instead (the state directory keeps it on disk
        for a restarted worker)."""
        for key in [k for k, sent in self.sent.items()
                    if sum(t.nbytes for t in sent.tensors.values()) >= UPDATE_ALIAS_MIN_BYTES]:
            del self.sent[key]

    def _on_eval_open(self, ev: ControlVerified, eo: EvalOpen) -> list[Action]:
        if self.worker_id not in eo.cohort:
            return [Ignore("not_in_cohort", eo.TYPE, eo.round, ev.run)]
        key = (ev.run, eo.round)
        if key in self._evaluated:
            report = self._evaluated[key]
            if report is None:
                return [Ignore("in_progress", eo.TYPE, eo.round, ev.run)]
            return [PublishEvalReport(ev.run, eo.round, report, ev.trace)]
        try:
            model, _ = self._model_of(ev)
        except Rejection as rej:
            return [Reject(rej.reason, eo.TYPE, eo.round, ev.run, rej.detail)]
        self._evaluated[key] = None
        self._release_large_sent()
        return [Evaluate(self.context(ev.run, eo.round), model, eo.model_version, ev.trace)]

    # -- finished work ------------------------------------------------------------------------

    def _on_trained(self, ev: TrainingFinished) -> list[Action]:
        key = (ev.run, ev.round)
        self._in_progress.discard(key)
        self.status = "idle" if self.status != "done" else "done"
        if ev.run is not None and self.run is not None and ev.run != self.run:
            return [Ignore("run_superseded", ev.fields.TYPE, ev.round, ev.run)]
        self.sent[key] = SentUpdate(ev.fields, ev.tensors)
        for old in sorted(self.sent, key=lambda k: k[1])[:-max(1, self.keep_sent)]:
            del self.sent[old]
        self.rounds_trained += 1
        return [PublishUpdate(ev.run, ev.round, ev.fields, ev.tensors, resend=False, trace=ev.trace)]

    def _on_evaluated(self, ev: EvaluationFinished) -> list[Action]:
        key = (ev.run, ev.round)
        if ev.run is not None and self.run is not None and ev.run != self.run:
            self._evaluated.pop(key, None)
            return [Ignore("run_superseded", ev.fields.TYPE, ev.round, ev.run)]
        self._evaluated[key] = ev.fields
        return [PublishEvalReport(ev.run, ev.round, ev.fields, ev.trace)]
