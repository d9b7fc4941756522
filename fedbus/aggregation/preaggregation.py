"""Pre-aggregation: rewrite a round's updates before a robust rule sees them.

Bucketing (``bucketing.py``) and nearest-neighbour mixing (``nnm.py``) both turn the n
buffered updates into k new inputs for a wrapped robust rule, each input a weighted mean
of some updates. Both are therefore a k × n mixing matrix W (rows sum to 1):

    input_r = x_t + sum_j W[r, j] · (y_j − x_t)

This module holds what they share: ``Mixing`` (W, plus who each input stands for),
``PreAggregator`` (buffers the round, applies W in one chunked pass over the cohort,
feeds the inner rule, and carries integer/bool buffers over the *original* updates as
FedAvg does: an average of counters is not a counter), and ``PreAggregation``, the
AggregationRule wrapper, which is whatever its rule is (name, buffered nature, extra
tensor groups, server state) and refuses streaming rules, for which a mean of means is
just the mean.

Memory: the k inputs, in the model's dtype, on top of the buffered cohort. When the
buffer spills (``fedbus/spill.py``), the inputs beyond the spill threshold are written to
one file as the one pass over the cohort computes them, so they never sit in memory.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import structlog
import torch

from fedbus.aggregation.base import (
    Accumulator,
    AggregationRule,
    Contribution,
    State,
    StateDict,
    StrategyConfigError,
    counter_keys,
    require,
    scalar_of,
)
from fedbus.aggregation.cohort import Cohort, UpdateBuffer
from fedbus.spill import SpillWriter, state_bytes

log = structlog.get_logger(__name__)

ROUNDS_BEGUN = "preaggregation.rounds_begun"
ROBUST_RULES = "median, trimmed_mean, geometric_median, krum, multi_krum or bulyan"


@dataclass
class Mixing:
    """k inputs for the inner rule: ``coeffs`` (k × n, rows summing to 1) over the cohort's
    contributions, and per input its worker id, weight, and the worker ids it was made from."""

    coeffs: torch.Tensor
    ids: list[str]
    num_samples: list[float]  # the inputs' weights
    sources: list[list[str]]


def normalised_row(n: int, members: list[int], weights: list[float]) -> torch.Tensor:
    """A length-n row with weights/sum(weights) at ``members`` and 0 elsewhere."""
    total = float(sum(weights))
    require(total > 0, "pre-aggregation: a group's weights must not sum to zero")
    row = torch.zeros(n, dtype=torch.float64)
    for j, w in zip(members, weights):
        row[j] += w / total
    return row


class PreAggregator(UpdateBuffer):
    """Buffers the round's contributions; ``finalize()`` feeds the rewritten inputs to the inner rule.
    ``sources`` then lists, per input, the worker ids it was made from (a bucket, a neighbourhood)."""

    def __init__(self, inner: Accumulator, global_state: State, rewrite: Callable[[Cohort], Mixing],
                 check: Callable[[int], None], base_version: int = 0, rule: str = ""):
        super().__init__(global_state, base_version, rule)
        self.inner = inner
        self._rewrite = rewrite
        self._check = check
        self.sources: list[list[str]] = []

    def result(self) -> State:
        require(self.count > 0, "no updates to aggregate")
        self._check(self.count)
        # Sorted by worker id so the result never depends on the order contributions arrived in.
        cohort = Cohort(self._global, sorted(self._updates, key=lambda u: u.worker_id), base_version=self.base_version)
        mixing = self._rewrite(cohort)
        self.sources = mixing.sources
        # The inner rule's inputs carry no counter increments: buffers are carried below over
        # the original contributions (an average of counters is not a counter).
        zero_counters = {k: torch.zeros(v.shape, dtype=torch.int64) for k in counter_keys(self._global)
                         for v in (self._global[k],)}
        # Mixed inputs in the model's dtypes, like the updates they came from (memory: k models,
        # or up to the spill threshold).
        mixed = self._mixed(cohort, mixing.coeffs, state_bytes(zero_counters))
        for wid, weight in zip(mixing.ids, mixing.num_samples):
            delta = mixed.pop(0)
            self.inner.fold(Contribution(wid, self.base_version, float(weight), {**delta, **zero_counters}))
        out = self.inner.finalize()
        out.update(cohort.carry())
        return {k: out[k] for k in self._global}

    def _mixed(self, cohort: Cohort, coeffs: torch.Tensor, extra_bytes: int) -> list[State]:
        """The inner rule's inputs. Spilling, the first ones are kept in memory as long as the
        inner buffer (the same threshold) would keep them, and the rest go to one spill file as
        they are computed; if it cannot be written, all of them are computed in memory."""
        dtypes = self.model_dtypes()
        if self._spill is None:
            return cohort.mix_deltas(coeffs, dtypes)
        layout = cohort.delta_layout(dtypes)
        size = sum(shape.numel() * dt.itemsize for shape, dt in layout.values()) \
            + extra_bytes
        in_memory = self._spill.threshold // size if size else coeffs.shape[0]
        rows = range(min(in_memory, coeffs.shape[0]), coeffs.shape[0])
        if not rows:
            return cohort.mix_deltas(coeffs, dtypes)
        writer = None
        try:
            writer = SpillWriter({(r, k): v for r in rows for k, v in layout.items()}, self._spill.directory)
            return cohort.mix_deltas(coeffs, dtypes, writer)
        except OSError as exc:  # a full or vanished disk: memory is still correct
            log.warning("spill.failed", rule=self.rule, directory=str(self._spill.directory),
                        error=f"{type(exc).__name__}: {exc}", detail="the mixed inputs stay in memory")
        finally:
            if writer is not None:
                writer.abort()  # nothing left of one that finished
        return cohort.mix_deltas(coeffs, dtypes)


class PreAggregation(AggregationRule):
    """Base for wrappers that rewrite the cohort before ``rule`` aggregates it."""

    label: str = "pre-aggregation"

    def __init__(self, rule: AggregationRule):
        if rule.streaming:
            raise StrategyConfigError(
                f"{self.label} needs the whole cohort before it can rewrite it, and {rule.name} is a streaming rule "
                f"(a mean of means is the plain mean anyway); use it with a robust rule such as {ROBUST_RULES}")
        self.rule = rule
        self.rounds_begun = 0
        # Instance attributes shadow the ClassVars: the wrapper is whatever its rule is.
        self.name = rule.name  # type: ignore[misc]
        self.streaming = rule.streaming  # type: ignore[misc]
        self.update_groups = rule.update_groups  # type: ignore[misc]

    @abstractmethod
    def rewrite(self, cohort: Cohort, round_index: int) -> Mixing:
        """The inner rule's inputs for one round (the cohort's updates are sorted by worker id)."""

    def inputs_for(self, n: int) -> int:
        """How many inputs the inner rule sees when the round has ``n`` updates."""
        return n

    def explain_inputs(self, n: int) -> str:
        """Why a round of n updates gives the rule fewer inputs (for precondition errors)."""
        return f"with {self.describe_filter()} a round of {n} updates leaves only {self.inputs_for(n)} inputs"

    def check_cohort(self, min_updates: int) -> None:
        require(min_updates >= 1, f"{self.name}: a round needs at least one update (min_updates={min_updates})")
        k = self.inputs_for(min_updates)
        try:
            self.rule.check_cohort(k)
        except StrategyConfigError as exc:
            if k == min_updates:
                raise
            raise StrategyConfigError(f"{exc}; {self.explain_inputs(min_updates)}") from None

    def describe_filter(self) -> str:
        return self.label

    def broadcast(self) -> State:
        return self.rule.broadcast()

    def configure(self, worker_id: str | None = None, version: int | None = None) -> dict:
        return self.rule.configure(worker_id, version)

    def begin(self, global_state: State, base_version: int = 0) -> PreAggregator:
        round_index = self.rounds_begun
        self.rounds_begun += 1
        return PreAggregator(self.rule.begin(global_state, base_version), global_state,
                             lambda cohort: self.rewrite(cohort, round_index), self.check_cohort,
                             base_version, self.describe())

    def commit(self, aggregator: Accumulator, num_workers_total: int) -> None:
        inner = aggregator.inner if isinstance(aggregator, PreAggregator) else aggregator
        self.rule.commit(inner, num_workers_total)

    def state_dict(self) -> StateDict:
        """``rounds_begun`` (it seeds each round's rewrite, e.g. bucketing's permutation) and the rule's state."""
        return {**self.rule.state_dict(), ROUNDS_BEGUN: self.rounds_begun}

    def load_state_dict(self, state: StateDict) -> None:
        require(ROUNDS_BEGUN in state, f"{self.describe()}: state lacks {ROUNDS_BEGUN!r}")
        n = scalar_of(state[ROUNDS_BEGUN], ROUNDS_BEGUN)
        require(float(n).is_integer() and n >= 0, f"{ROUNDS_BEGUN} must be an integer >= 0, got {n}")
        self.rule.load_state_dict({k: v for k, v in state.items() if k != ROUNDS_BEGUN})
        self.rounds_begun = int(n)

    def describe(self) -> str:
        return f"{self.rule.describe()}+{self.describe_filter()}"


__all__ = ["Mixing", "PreAggregation", "PreAggregator", "ROBUST_RULES", "normalised_row"]
