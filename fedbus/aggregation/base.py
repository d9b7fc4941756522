"""What every aggregation rule sees: plain tensors, no network.

A round goes through a rule and a server optimizer like this (the coordinator's view)::

    rule.check_cohort(min_updates)           # once, at job load: raises StrategyConfigError
    extra = rule.broadcast()                 # sent to workers with the model (SCAFFOLD's c)
    agg = rule.begin(x_t)                    # one RoundAggregator per round
    agg.add(update) ...                      # each verified update, in arrival order
    proposal = agg.result()                  # x_t + aggregated delta, same keys/dtypes as x_t
    x_next = server_opt.step(x_t, proposal)  # pseudo-gradient proposal - x_t
    rule.commit(agg, num_workers_total)      # server-side state (SCAFFOLD's c) after success

Rules never mutate ``x_t`` or the updates' tensors.
"""

from __future__ import annotations

import numbers
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, Protocol, runtime_checkable

import torch

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ClientUpdate:
    """One verified update: a worker's full local weights y_i for the round's base model.

    ``extra`` carries rule-specific data: scalars (``"fednova_a"``: float) and tensor dicts
    (``"scaffold_delta_c"``: State).
    """

    worker_id: str
    num_samples: int
    state: State
    num_steps: int = 0
    extra: dict = field(default_factory=dict)


class StrategyConfigError(ValueError):
    """A strategy's parameters violate its precondition; the message says which rule and numbers."""


class InvalidUpdate(ValueError):
    """An update a rule cannot use (non-positive weight, missing tensor or extra); reject it.

    Raised by ``RoundAggregator.add`` before the aggregator changes, so the round can go on
    without that update.
    """


@runtime_checkable
class RoundAggregator(Protocol):
    """Collects one round's updates and proposes the next model."""

    def add(self, update: ClientUpdate) -> None: ...

    def result(self) -> State: ...

    @property
    def count(self) -> int: ...



def is_averageable(t: torch.Tensor) -> bool:
    """Float tensors are averaged; integer and bool buffers are not (see fedavg)."""
    return t.is_floating_point() or t.is_complex()


def float_keys(state: State) -> list[str]:
    """The tensors a rule aggregates, in the state's own order."""
    return [k for k, v in state.items() if is_averageable(v)]


def validate_update(global_state: State, update: ClientUpdate) -> None:
    """Check what every rule needs before it touches its accumulators.

    Checking first keeps an aggregator consistent when an update is refused: a KeyError
    halfway through the tensors would leave half of them folded in.
    """
    if not isinstance(update.num_samples, numbers.Integral) or update.num_samples <= 0:
        raise InvalidUpdate(f"update from {update.worker_id!r}: num_samples must be a positive integer, "
                            f"got {update.num_samples!r}")
    for name, base in global_state.items():
        value = update.state.get(name)
        if value is None:
            raise InvalidUpdate(f"update from {update.worker_id!r} lacks tensor {name!r}")
        if value.shape != base.shape:
            raise InvalidUpdate(f"update from {update.worker_id!r}: tensor {name!r} has shape "
                                f"{tuple(value.shape)}, the model has {tuple(base.shape)}")


class IntegerBufferCarry:
    """Carries the non-float tensors of a model through any rule.

    Integer buffers (BatchNorm's ``num_batches_tracked``, step counters) are counters, not
    parameters: averaging them in float and casting back yields garbage. They advance by
    the rounded sample-weighted mean of the clients' increments over the global value, which
    for a step counter is the typical number of steps a client took. Bool buffers keep the
    global value. Memory: one float64 sum per integer buffer (integer increments add up
    exactly in float64 up to 2**53), so every rule, streaming or not, shares this path.
    """

    def __init__(self, global_state: State):
        self._base = {k: v.detach().clone() for k, v in global_state.items() if not is_averageable(v)}
        self._sums = {k: torch.zeros(v.shape, dtype=torch.float64)
                      for k, v in self._base.items() if v.dtype != torch.bool}
        self._weight = 0.0

    def add(self, update: ClientUpdate) -> None:
        w = float(update.num_samples)
        for name, acc in self._sums.items():
            inc = update.state[name].to(torch.int64) - self._base[name].to(torch.int64)
            acc.add_(inc.to(torch.float64), alpha=w)
        self._weight += w

    def result(self) -> State:
        out: State = {}
        for name, base in self._base.items():
            if base.dtype == torch.bool or self._weight == 0:
                out[name] = base.clone()
            else:
                step = torch.round(self._sums[name] / self._weight).to(torch.int64)
                out[name] = (base.to(torch.int64) + step).to(base.dtype)
        return out


def require(ok: bool, message: str) -> None:
    """Raise StrategyConfigError(message) unless ok: preconditions read as one line each."""
    if not ok:
        raise StrategyConfigError(message)


class AggregationRule(ABC):
    """A strategy: how one round's updates become the proposed next model.

    ``streaming`` rules fold each update into O(model) memory as it arrives; buffered rules
    keep every update of the round until ``result()``: O(cohort x model) memory.
    """

    name: ClassVar[str]
    streaming: ClassVar[bool]
    # Tensor dicts every update must carry in ``extra`` (SCAFFOLD: ("scaffold_delta_c",)), each
    # keyed like the model's float tensors; the coordinator checks them before ``add``.
    update_groups: ClassVar[tuple[str, ...]] = ()

    def check_cohort(self, min_updates: int) -> None:
        """Raise StrategyConfigError if a round of ``min_updates`` updates breaks the precondition.

        Every precondition here is monotone in the cohort size, so passing for the smallest
        cohort the job may aggregate (its quorum) means every larger round is fine too.
        """
        require(min_updates >= 1, f"{self.name}: a round needs at least one update (min_updates={min_updates})")

    def broadcast(self) -> State:
        """Extra server tensors sent to the workers with the model; none by default."""
        return {}

    @abstractmethod
    def begin(self, global_state: State) -> RoundAggregator:
        """A fresh aggregator for a round whose base model is ``global_state``."""

    def commit(self, aggregator: RoundAggregator, num_workers_total: int) -> None:
        """Update server-side state after a successful round (no-op for stateless rules)."""

    def describe(self) -> str:
        return self.name


class ServerOptimizer(ABC):
    """Applies the pseudo-gradient Δ = proposal − x_t to the global model.

    Only float tensors are optimised; integer and bool buffers are taken from the proposal
    unchanged (the rule already carried them).
    """

    name: ClassVar[str]

    @abstractmethod
    def step(self, global_state: State, proposal: State) -> State:
        """The new global model."""


def to_real64(t: torch.Tensor) -> torch.Tensor:
    """A float64 copy of a float tensor; complex tensors as (..., 2) real pairs.

    Robust rules and server optimizers treat the real and imaginary parts of a complex
    parameter as two coordinates, which is what an optimizer over real parameters does.
    """
    if t.is_complex():
        return torch.view_as_real(t.detach()).to(torch.float64)
    return t.detach().to(torch.float64)


def from_real64(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of to_real64: cast back to ``like``'s dtype and shape."""
    if like.is_complex():
        return torch.view_as_complex(v.reshape(*like.shape, 2).contiguous()).to(like.dtype)
    return v.reshape(like.shape).to(like.dtype)


def float64_sums(global_state: State) -> State:
    """Zeroed float64 (complex128) accumulators for every float tensor of the model."""
    return {k: torch.zeros(v.shape, dtype=torch.complex128 if v.is_complex() else torch.float64)
            for k, v in global_state.items() if is_averageable(v)}


class StreamingAccumulatorBase:
    """What every streaming aggregator keeps: the round's base model, float64 sums,
    the integer-buffer carry, and how many updates (and how much weight) it has folded."""

    def __init__(self, global_state: State, *, with_sums: bool = True):
        self._global = {k: v.detach().clone() for k, v in global_state.items()}
        # float64 (complex128) sums: summing thousands of float16 updates in their own dtype
        # would stall; the division happens once, in result(). Rules that keep other sums
        # (SCAFFOLD's Δy and Δc) skip them.
        self._sums = float64_sums(global_state) if with_sums else {}
        self._carry = IntegerBufferCarry(global_state)
        self._total_weight = 0.0
        self._count = 0

    @property
    def count(self) -> int:
        return self._count

    @property
    def total_weight(self) -> float:
        return self._total_weight

