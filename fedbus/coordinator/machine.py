"""What both coordinator machines share: the one entry point, the strategy's server state,
the bounds on an update's claims, and the final evaluation's reports.

``RoundStateMachine`` (sync rounds, ``rounds.py``) and ``VersionStateMachine`` (async
versions, ``versions.py``) differ in when they fold and commit; how an update is judged
before it is folded, and what a report may weigh, is the same and lives here.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from fedbus.aggregation.base import InvalidUpdate, State, is_averageable, validate_update
from fedbus.coordinator.registry import WorkerRegistry
from fedbus.crypto.envelopes import Rejection, check_tensors
from fedbus.protocol.codec import spec_of


@dataclass(frozen=True)
class WorkerRevoked:
    """A key event revoked this worker (or rotated it to a key it has yet to restart with):
    it is left out of every later cohort. (A cohort it is already in closes at the deadline
    with the quorum, as for a worker that died.)"""

    worker_id: str


class MachineBase:
    """Subclasses set ``limits`` (a RoundPolicy: caps and local-training settings), ``rule``,
    ``optimizer``, ``registry``, ``model_spec``, ``float_spec``, ``update_groups``,
    ``rejections``, ``cohort``, ``_eval_reported`` and ``_eval_metrics``, and implement
    ``_dispatch(event, out)``, ``_declared(worker)`` and ``_count_rejection(reason)``."""

    last_error: str | None = None
    rejections: Counter

    def _init_checks(self, limits, rule, initial_state: State) -> None:
        """What update_problem needs: the caps, the rule, the model's tensor specs, and the
        registry of heartbeats (a regional aggregator's, which has no optimizer)."""
        self.limits = limits
        self.rule = rule
        self.optimizer = None
        self.model_spec = spec_of(initial_state)
        self.float_spec = {k: v for k, v in self.model_spec.items() if is_averageable(initial_state[k])}
        self.update_groups = tuple(getattr(rule, "update_groups", ()))
        self.registry = WorkerRegistry(limits.liveness_ms)
        self.rejections = Counter()

    # ---- the single entry point --------------------------------------------------------

    def handle(self, event) -> list:
        """Actions for ``event``. If an exception escapes the transition, the actions it had
        already decided are still returned, followed by ``InternalError``."""
        from fedbus.coordinator.rounds import InternalError  # (rounds imports this module)

        out: list = []
        if isinstance(event, WorkerRevoked):  # the same for every machine: only the registry knows it
            self.registry.forget(event.worker_id)
            return out
        try:
            self._dispatch(event, out)
        except Exception as exc:  # a bug must not swallow decided actions (e.g. a commit)
            self.last_error = repr(exc)
            out.append(InternalError(type(event).__name__, repr(exc)))
        return out

    def _dispatch(self, event, out: list) -> None:
        raise NotImplementedError

    # ---- the strategy's server state, committed with every model ----------------------

    def strategy_state(self) -> dict:
        """The server-side state committed with every model (rule, optimizer, privacy budget)."""
        out = {}
        for name, part in self._stateful_parts():
            state_dict = getattr(part, "state_dict", None)
            if callable(state_dict):
                out[name] = state_dict()
        return out

    def _stateful_parts(self) -> tuple:
        # The privacy budget (sync rounds with privacy.dp) is committed with the rule's state.
        return (("rule", self.rule), ("optimizer", self.optimizer), ("privacy", getattr(self, "privacy", None)))

    def _load_strategy_state(self, strategy_state: dict) -> None:
        for name, part in self._stateful_parts():
            if name in strategy_state and callable(getattr(part, "load_state_dict", None)):
                part.load_state_dict(strategy_state[name])

    # ---- the model an update was trained from ------------------------------------------

    def base_for(self, version: int) -> State | None:
        """The model of ``version`` if this machine holds it, else None: what a compressed
        delta is added to (``fedbus.transforms.compress``). Async machines keep the last
        ``max_staleness`` models in ``history``; the sync machine its current one."""
        history = getattr(self, "history", None)
        if history is not None:
            return history.get(version)
        if version == getattr(self, "model_version", None):
            return getattr(self, "state", None)
        return None

    # ---- claims -----------------------------------------------------------------------

    def _declared(self, worker: str) -> int | None:
        raise NotImplementedError

    def sample_cap(self, worker: str) -> int | None:
        """The most samples ``worker`` may claim: its declared count and the caps."""
        caps = [c for c in (self._declared(worker), self.limits.max_samples,
                            self.limits.max_samples_by_worker.get(worker)) if c is not None]
        return min(caps) if caps else None

    def steps_cap(self, sample_cap: int) -> int | None:
        """The most local steps ``sample_cap`` samples allow: epochs x ceil(samples / batch)."""
        if self.limits.epochs is None or self.limits.batch_size is None:
            return None
        return self.limits.epochs * -(-sample_cap // self.limits.batch_size)

    def update_problem(self, ev, base: State) -> tuple[str, str, int | None]:
        """Why an update's claims or tensors are refused, as (reason, detail, cap), or
        ("", "", cap) when it may be folded: samples within the cap, steps within what
        they allow, tensors of the model's names, shapes and dtypes, the rule's groups."""
        cap = self.sample_cap(ev.worker_id)
        if cap is None or ev.update.num_samples > cap:
            return "excessive_samples", f"claims {ev.update.num_samples} samples, at most {cap} allowed", cap
        steps = self.steps_cap(cap)
        if steps is not None and ev.update.num_steps > steps:
            return "invalid_update", f"claims {ev.update.num_steps} local steps, at most {steps} for {cap} samples", cap
        try:
            check_tensors(ev.update.state, self.model_spec)
            groups = {k for k, v in ev.update.extra.items() if isinstance(v, dict)}
            if groups != set(self.update_groups):
                raise Rejection("tensor_mismatch",
                                f"tensor groups {sorted(groups)}, expected {list(self.update_groups)}")
            for group in self.update_groups:
                check_tensors(ev.update.extra[group], self.float_spec)
            validate_update(base, ev.update)
        except Rejection as rej:
            return rej.reason, rej.detail, cap
        except InvalidUpdate as exc:
            return "invalid_update", str(exc), cap
        return "", "", cap

    # ---- the final evaluation ---------------------------------------------------------

    def _take_eval_report(self, ev) -> tuple[str, str]:
        """Keep a verified report of the final evaluation: ("", "") if taken, else why not.
        Its weight is the samples it may claim, no more."""
        if ev.worker_id not in self.cohort:
            return "not_in_cohort", ""
        if ev.worker_id in self._eval_reported:
            return "duplicate_update", ""
        self._eval_reported.add(ev.worker_id)
        cap = self.sample_cap(ev.worker_id)
        weight = ev.num_samples if cap is None else min(ev.num_samples, cap)
        if weight > 0:
            self._eval_metrics.append((float(weight), ev.metrics))
        return "", ""

    @property
    def eval_complete(self) -> bool:
        return self._eval_reported >= set(self.cohort)
