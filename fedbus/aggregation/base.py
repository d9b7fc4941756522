"""What every aggregation rule sees: plain tensors, no network.

A strategy has two halves (as in Flower's configure/aggregate):

* ``rule.configure(worker_id, version)`` — what each worker is told with the model: tensor
  groups under a name (SCAFFOLD's server control variate c under ``"scaffold"``) and
  scalar settings (FedProx's ``proximal_mu``);
* the accumulator half — how contributions combine into the next model.

A synchronous round, as the coordinator drives it::

    rule.check_cohort(min_updates)                  # once, at job load: raises StrategyConfigError
    acc = rule.begin(x_t, version_t)                # one Accumulator per round (call before configure)
    told = rule.configure(worker_id, version_t)     # per worker: groups (dict values) + scalars
    acc.fold(Contribution(...)) ...                 # each verified contribution, in arrival order
    proposal = acc.finalize()                       # x_t + aggregated delta, same keys/dtypes/order as x_t
    x_next = server_opt.step(x_t, proposal)         # pseudo-gradient proposal - x_t
    rule.commit(acc, num_workers_total)             # server-side state (SCAFFOLD's c) after success
    rule.state_dict(), server_opt.state_dict()      # persisted with the model

Regional aggregation and secure aggregation reuse the same path: a regional accumulator
exports ``acc.partial()`` (a ``PartialAggregate`` of mergeable sums, see ``partial.py``),
ships it (``PartialAggregate.to_message``), and the central accumulator of the same base
``merge``s it; merging equals folding every contribution into one accumulator. Rules say
whether they can do this (``mergeable``) and whether they must see each update in the
clear (``needs_plaintext``: robust rules compare updates with each other).

The older entry points — ``ClientUpdate`` (full local weights, integer sample count),
``acc.add(update)``, ``acc.result()``, ``rule.broadcast()`` — still work: ``add`` converts the
update into a Contribution against the accumulator's base (``Contribution.from_client_update``).

Rules never mutate ``x_t`` or the contributions' tensors.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from fedbus.aggregation.partial import PartialAggregate

State = dict[str, torch.Tensor]
# A rule's or optimizer's persisted state: tensors and plain numbers (see state_to_tensors).
StateDict = dict[str, "torch.Tensor | float | int"]


class StrategyConfigError(ValueError):
    """A strategy's parameters violate its precondition; the message says which rule and numbers."""


class InvalidUpdate(ValueError):
    """A contribution (or partial aggregate) a rule cannot use; reject it.

    Raised by ``fold``/``merge``/``add`` before the accumulator changes, so the round can go
    on without it.
    """


def is_averageable(t: torch.Tensor) -> bool:
    """Float tensors are averaged; integer and bool buffers are not (see IntegerBufferCarry)."""
    return t.is_floating_point() or t.is_complex()


def float_keys(state: State) -> list[str]:
    """The tensors a rule aggregates, in the state's own order."""
    return [k for k, v in state.items() if is_averageable(v)]


def counter_keys(state: State) -> list[str]:
    """Integer buffers (step counters): carried as weighted-mean increments. Bool buffers are neither."""
    return [k for k, v in state.items() if not is_averageable(v) and v.dtype != torch.bool]


def wide_dtype(t: torch.Tensor) -> torch.dtype:
    """float64, or complex128 for complex tensors: the dtype sums and exact deltas live in."""
    return torch.complex128 if t.is_complex() else torch.float64


# Weights above this are refused outright. With float32-sized deltas (|Δ| < 3.4e38) a sum of
# w · Δ stays far inside float64 (< 1e58 per term), so no claim can overflow the aggregate.
# Sample counts are capped much lower by the coordinator; this only keeps the rules finite.
MAX_WEIGHT = 2.0 ** 64


def check_weight(worker_id: str, weight: Any) -> float:
    """A contribution's weight as a float: finite, > 0 and <= MAX_WEIGHT (InvalidUpdate otherwise).

    Bools are refused (True would silently count as weight 1).
    """
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
        raise InvalidUpdate(f"contribution from {worker_id!r}: weight must be a real number, got {weight!r}")
    try:
        w = float(weight)
    except OverflowError:  # an int beyond float range
        w = math.inf
    if not (math.isfinite(w) and 0 < w <= MAX_WEIGHT):
        raise InvalidUpdate(f"contribution from {worker_id!r}: weight must be finite, > 0 and <= 2**64, "
                            f"got {weight!r}")
    return w


def all_finite(t: torch.Tensor) -> bool:
    """No inf or NaN in a float tensor.

    A sum propagates NaN and ±inf and reads the tensor once without allocating a mask;
    only when the sum is not finite — a non-finite entry, or finite ones overflowing it — is
    the exact check run. The sum is in the tensor's own float32/float64 (a float64 sum of
    float32 values converts every element: ~20x slower on 50M elements), float32 for
    narrower types.
    """
    if t.numel() == 0 or not is_averageable(t):
        return True
    if t.is_complex():
        t = torch.view_as_real(t)
    if math.isfinite(float(t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32))):
        return True
    return bool(torch.isfinite(t).all())


def check_finite_result(out: State, base: State) -> None:
    """Refuse an aggregate with inf/NaN where the base model was finite (ValueError: the round fails
    instead of committing a broken model). Non-finite base entries (a -inf mask buffer) may stay so."""
    for name, t in out.items():
        if is_averageable(t) and not all_finite(t):
            bad = ~torch.isfinite(t) & torch.isfinite(base[name])
            if bool(bad.any()):
                raise ValueError(f"the aggregate of {name!r} is not finite")


# ---- contributions ----------------------------------------------------------------------

@dataclass(frozen=True)
class ClientUpdate:
    """Deprecated: one verified update as a worker's full local weights y_i for the round's base model.

    Kept while the coordinator and ``fedbus sim`` move to ``Contribution``; accumulators'
    ``add`` converts it (``Contribution.from_client_update``). ``extra`` carries rule-specific
    data: scalars (``"fednova_a"``: float) and tensor dicts (``"scaffold_delta_c"``: State).
    """

    worker_id: str
    num_samples: int
    state: State
    num_steps: int = 0
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Contribution:
    """One worker's contribution to an aggregate: its delta against the model it trained from.

    * ``base_version``: the model version the worker started from. A synchronous round
      folds only contributions of its own base; an asynchronous one (FedBuff) folds older
      ones too, with a staleness-discounted ``weight`` (see ``staleness.py``).
    * ``weight``: a float, finite and > 0 (sample count, possibly discounted).
    * ``delta``: for every float tensor of the model, y_i − x_base (any float dtype of the
      same kind, real or complex; ``from_local_state`` makes it float64/complex128, which is
      exact); for every integer buffer, the int64 increment y_i − x_base. Bool buffers need
      no entry (they keep the base's value). A delta, not the weights, is what clipping,
      DP noise, masking and staleness weighting act on.
    * ``extras``: the strategy's per-update data: scalars (``"fednova_a"``) and tensor groups
      keyed like the model's float tensors (``"scaffold_delta_c"``).
    * ``num_steps``: local optimizer steps (FedNova's a_i when ``extras`` has no ``fednova_a``).
    """

    worker_id: str
    base_version: int
    weight: float
    delta: State
    extras: dict = field(default_factory=dict)
    num_steps: int = 0
    # Set by from_local_state, which already checked the float deltas are finite, so fold
    # does not read them a second time. Tensors must not be modified after construction.
    finite_checked: bool = field(default=False, repr=False, compare=False)

    @classmethod
    def from_local_state(cls, worker_id: str, base_version: int, weight: float, local_state: State,
                         base_state: State, extras: dict | None = None, *, num_steps: int = 0,
                         delta_dtype: torch.dtype | Mapping[str, torch.dtype] | None = None) -> Contribution:
        """The contribution of a worker holding full local weights ``local_state`` trained from ``base_state``.

        Float deltas are computed in float64 (complex128) and kept there by default: the
        difference of two float32 (or narrower) values is exact in float64, so x + Δ gives y
        back bit for bit. To save memory pass ``delta_dtype`` (one dtype, e.g. ``torch.float32``,
        or one per tensor name; complex tensors get the matching complex dtype): the deltas
        are rounded once, halving what buffered rules hold for a float32 model. (Rounding Δ
        to the model's dtype costs at most half an ulp of Δ, below the model's own resolution
        ulp(x) whenever |Δ| <= |x|.) Where base and local values are equal (including equal
        infinities, e.g. an attention mask buffer of -inf) the delta is 0. Raises
        InvalidUpdate for a missing tensor, a wrong shape or kind, a bad weight, or a
        non-finite delta.
        """
        w = check_weight(worker_id, weight)
        delta: State = {}
        for name, base in base_state.items():
            value = local_state.get(name)
            if not isinstance(value, torch.Tensor):
                raise InvalidUpdate(f"update from {worker_id!r} lacks tensor {name!r}")
            if value.shape != base.shape:
                raise InvalidUpdate(f"update from {worker_id!r}: tensor {name!r} has shape "
                                    f"{tuple(value.shape)}, the model has {tuple(base.shape)}")
            if base.dtype == torch.bool:
                continue
            # Dtypes are the coordinator's check (an integer tensor for a float one converts as
            # before); only a complex value for a real tensor would lose information here.
            if value.is_complex() and not base.is_complex():
                raise InvalidUpdate(f"update from {worker_id!r}: tensor {name!r} is {value.dtype}, "
                                    f"the model has {base.dtype}")
            if is_averageable(base):
                dt = wide_dtype(base)
                # One widened copy of y; the subtraction widens x element by element.
                d = value.detach().to(dt, copy=True).sub_(base.detach())
                if not all_finite(d):
                    equal = value.detach().to(dt) == base.detach().to(dt)
                    d = torch.where(equal, torch.zeros((), dtype=dt), d)
                    if not all_finite(d):
                        raise InvalidUpdate(f"update from {worker_id!r}: tensor {name!r} gives a non-finite delta")
                target = delta_dtype.get(name) if isinstance(delta_dtype, Mapping) else delta_dtype
                delta[name] = d if target is None else d.to(_kind_of(target, base))
            else:
                delta[name] = value.detach().to(torch.int64) - base.detach().to(torch.int64)
        return cls(worker_id, int(base_version), w, delta, dict(extras or {}), int(num_steps), finite_checked=True)

    @classmethod
    def from_client_update(cls, update: ClientUpdate, base_state: State, base_version: int = 0) -> Contribution:
        """The legacy ``ClientUpdate`` (full weights, integer num_samples) as a contribution."""
        n = update.num_samples
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n <= 0:
            raise InvalidUpdate(f"update from {update.worker_id!r}: num_samples must be a positive integer, "
                                f"got {n!r}")
        return cls.from_local_state(update.worker_id, base_version, float(n), update.state, base_state,
                                    update.extra, num_steps=update.num_steps)


def _kind_of(dtype: torch.dtype, base: torch.Tensor) -> torch.dtype:
    if not base.is_complex():
        return torch.float32 if dtype == torch.complex64 else torch.float64 if dtype == torch.complex128 else dtype
    return torch.complex128 if dtype in (torch.float64, torch.complex128) else torch.complex64


def validate_contribution(base_state: State, base_version: int, c: Contribution) -> float:
    """Check what every rule needs before it touches its accumulators; returns the weight.

    Checking first keeps an accumulator consistent when a contribution is refused: a
    KeyError halfway through the tensors would leave half of them folded in.
    """
    if not isinstance(c, Contribution):
        raise InvalidUpdate(f"expected a Contribution, got {type(c).__name__}")
    w = check_weight(c.worker_id, c.weight)
    if isinstance(c.base_version, bool) or not isinstance(c.base_version, numbers.Integral):
        raise InvalidUpdate(f"contribution from {c.worker_id!r}: base_version must be an integer")
    if c.base_version > base_version:
        raise InvalidUpdate(f"contribution from {c.worker_id!r} was trained from version {c.base_version}, "
                            f"newer than this aggregate's base {base_version}")
    for name, base in base_state.items():
        if base.dtype == torch.bool:
            continue
        d = c.delta.get(name)
        if not isinstance(d, torch.Tensor):
            raise InvalidUpdate(f"contribution from {c.worker_id!r} lacks delta {name!r}")
        if d.shape != base.shape:
            raise InvalidUpdate(f"contribution from {c.worker_id!r}: delta {name!r} has shape "
                                f"{tuple(d.shape)}, the model has {tuple(base.shape)}")
        if is_averageable(base):
            if not is_averageable(d) or d.is_complex() != base.is_complex():
                raise InvalidUpdate(f"contribution from {c.worker_id!r}: delta {name!r} is {d.dtype}, "
                                    f"the model has {base.dtype}")
            if not c.finite_checked and not all_finite(d):
                raise InvalidUpdate(f"contribution from {c.worker_id!r}: delta {name!r} has non-finite values")
        elif is_averageable(d) or d.dtype == torch.bool:
            raise InvalidUpdate(f"contribution from {c.worker_id!r}: integer buffer {name!r} needs an integer "
                                f"increment, got {d.dtype}")
    return w


def validate_update(global_state: State, update: ClientUpdate) -> None:
    """Legacy check of a ClientUpdate (positive integer num_samples, every tensor with the model's shape)."""
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


def as_contribution(item: Contribution | ClientUpdate, base_state: State, base_version: int) -> Contribution:
    """A Contribution as is; a legacy ClientUpdate converted against ``base_state``."""
    if isinstance(item, ClientUpdate):
        return Contribution.from_client_update(item, base_state, base_version)
    return item


def tensor_group(c: Contribution, group: str, like: State) -> State:
    """``c.extras[group]``, checked to hold a tensor shaped like ``like[k]`` for every key (InvalidUpdate)."""
    g = c.extras.get(group)
    if not isinstance(g, dict):
        raise InvalidUpdate(f"contribution from {c.worker_id!r} lacks extras[{group!r}]")
    for name, ref in like.items():
        t = g.get(name)
        if not isinstance(t, torch.Tensor) or t.shape != ref.shape or not is_averageable(t):
            raise InvalidUpdate(f"contribution from {c.worker_id!r}: {group}[{name!r}] is missing or has the "
                                f"wrong shape or dtype (want {tuple(ref.shape)} floats)")
        if not all_finite(t):
            raise InvalidUpdate(f"contribution from {c.worker_id!r}: {group}[{name!r}] has non-finite values")
    return g


# ---- integer buffers ---------------------------------------------------------------------

class IntegerBufferCarry:
    """Carries the non-float tensors of a model through any rule.

    Integer buffers (BatchNorm's ``num_batches_tracked``, step counters) are counters, not
    parameters: averaging them in float and casting back yields garbage. They advance by
    the rounded weighted mean of the contributions' increments,

        b_next = b_base + round( sum_i w_i inc_i / sum_i w_i )     (round half to even)

    which for a step counter is the typical number of steps a client took; the result is
    clamped to the buffer dtype's range. Bool buffers keep the base value. Mergeable: the
    state is one float64 sum per integer buffer plus the total weight (integer increments
    add up exactly in float64 up to 2**53).
    """

    def __init__(self, global_state: State):
        self._base = {k: v.detach().clone() for k, v in global_state.items() if not is_averageable(v)}
        self.sums: State = {k: torch.zeros(v.shape, dtype=torch.float64)
                            for k, v in self._base.items() if v.dtype != torch.bool}
        self.weight = 0.0

    def fold(self, c: Contribution, weight: float) -> None:
        for name, acc in self.sums.items():
            acc.add_(c.delta[name].to(torch.float64), alpha=weight)
        self.weight += weight

    def add(self, update: ClientUpdate) -> None:
        """Legacy: fold a full-weights update (its increment over the base)."""
        w = float(update.num_samples)
        for name, acc in self.sums.items():
            inc = update.state[name].to(torch.int64) - self._base[name].to(torch.int64)
            acc.add_(inc.to(torch.float64), alpha=w)
        self.weight += w

    def merge(self, sums: State, weight: float) -> None:
        for name, acc in self.sums.items():
            acc.add_(sums[name])
        self.weight += weight

    def result(self) -> State:
        out: State = {}
        for name, base in self._base.items():
            if base.dtype == torch.bool or self.weight == 0:
                out[name] = base.clone()
                continue
            step = torch.round(self.sums[name] / self.weight)
            info = torch.iinfo(base.dtype)
            if base.dtype == torch.int64:
                # Bounded so the int64 conversion and the addition cannot wrap for any sane counter.
                step = step.clamp(-(2.0 ** 62), 2.0 ** 62).to(torch.int64)
                out[name] = base + step
            else:
                out[name] = (base.to(torch.int64) + step.clamp(-(2.0 ** 62), 2.0 ** 62).to(torch.int64)
                             ).clamp(info.min, info.max).to(base.dtype)
        return out


def require(ok: bool, message: str) -> None:
    """Raise StrategyConfigError(message) unless ok: preconditions read as one line each."""
    if not ok:
        raise StrategyConfigError(message)


# ---- the accumulator contract --------------------------------------------------------------

@runtime_checkable
class Accumulator(Protocol):
    """Collects contributions for one base model and proposes the next one.

    ``partial``/``merge`` are available when the rule is ``mergeable``; buffered (robust)
    rules raise StrategyConfigError there.
    """

    base_version: int

    def fold(self, contribution: Contribution) -> None: ...

    def partial(self) -> PartialAggregate: ...

    def merge(self, partial: PartialAggregate) -> None: ...

    def finalize(self) -> State: ...

    @property
    def count(self) -> int: ...

    @property
    def total_weight(self) -> float: ...


@runtime_checkable
class RoundAggregator(Protocol):
    """Legacy view of an accumulator: ``add(ClientUpdate)``, ``result()``, ``count``."""

    def add(self, update: ClientUpdate) -> None: ...

    def result(self) -> State: ...

    @property
    def count(self) -> int: ...


class AggregationRule(ABC):
    """A strategy: what workers are told (``configure``) and how contributions combine (``begin``).

    ``streaming`` rules fold each contribution into O(model) memory as it arrives; buffered
    rules keep every contribution until ``finalize()``: O(cohort x model) memory.
    ``mergeable`` rules export and merge partial aggregates; ``needs_plaintext`` rules must
    see each contribution on its own (so they cannot run over masked sums).
    """

    name: ClassVar[str]
    streaming: ClassVar[bool]
    mergeable: ClassVar[bool] = False
    needs_plaintext: ClassVar[bool] = True
    # Tensor groups every contribution must carry in ``extras`` (SCAFFOLD: ("scaffold_delta_c",)), each
    # keyed like the model's float tensors; the coordinator checks them before ``fold``.
    update_groups: ClassVar[tuple[str, ...]] = ()

    def check_cohort(self, min_updates: int) -> None:
        """Raise StrategyConfigError if a round of ``min_updates`` updates breaks the precondition.

        Every precondition here is monotone in the cohort size, so passing for the smallest
        cohort the job may aggregate (its quorum) means every larger round is fine too.
        """
        require(min_updates >= 1, f"{self.name}: a round needs at least one update (min_updates={min_updates})")

    def configure(self, worker_id: str | None = None, version: int | None = None) -> dict[str, Any]:
        """What a worker is told with the model of ``version``.

        Tensor groups are dict values (State) under a group name — SCAFFOLD's c under
        ``"scaffold"``, exactly what round.open's ``broadcast`` carries today; scalar settings
        are plain values (FedProx: ``{"proximal_mu": mu}``). The same for every worker in the
        rules here; the worker id is there for rules that tell workers different things.
        """
        extra = self.broadcast()
        return {self.name: extra} if extra else {}

    def broadcast(self) -> State:
        """Legacy: the tensor group sent to the workers with the model (SCAFFOLD's c); none by default."""
        return {}

    @abstractmethod
    def begin(self, global_state: State, base_version: int = 0) -> Accumulator:
        """A fresh accumulator whose base model is ``global_state`` at ``base_version``."""

    def commit(self, aggregator: Accumulator, num_workers_total: int) -> None:
        """Update server-side state after a successful round (no-op for stateless rules)."""

    def state_dict(self) -> StateDict:
        """Server-side state to persist with the model (empty for stateless rules)."""
        return {}

    def load_state_dict(self, state: StateDict) -> None:
        """Restore what ``state_dict`` returned; a fresh rule then continues bit-identically."""
        require(not state, f"{self.name}: no server state expected, got keys {sorted(state)[:5]}")

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

    def state_dict(self) -> StateDict:
        """The optimizer's state (moments, velocity, step count); empty for plain SGD."""
        return {}

    def load_state_dict(self, state: StateDict) -> None:
        """Restore what ``state_dict`` returned; a fresh optimizer then continues bit-identically."""
        require(not state, f"{self.name}: no optimizer state expected, got keys {sorted(state)[:5]}")


def state_to_tensors(state: StateDict) -> State:
    """A state_dict as tensors only (numbers become 0-d float64/int64 tensors), for the tensor codec."""
    out: State = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            out[k] = v
        elif isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"state {k!r}: unsupported value {type(v).__name__}")
        else:
            out[k] = torch.tensor(v, dtype=torch.int64 if isinstance(v, int) else torch.float64)
    return out


def scalar_of(value: Any, what: str) -> float:
    """A number from a state_dict value (python number or 0-d tensor)."""
    if isinstance(value, torch.Tensor):
        require(value.numel() == 1, f"{what}: expected a scalar, got shape {tuple(value.shape)}")
        return value.item()
    require(isinstance(value, (int, float)) and not isinstance(value, bool), f"{what}: expected a number")
    return value


def tensors_with_prefix(state: StateDict, prefix: str) -> State:
    """{key: tensor} for every ``prefix + key`` entry of a state dict."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


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


def widened(state: State) -> State:
    """A copy with float tensors in float64 (complex128), other tensors as they are.

    Kept by accumulators as their base: subtracting a float64 base from a widened y is ~2x
    faster than a mixed-dtype subtraction, and exact all the same.
    """
    return {k: v.detach().to(wide_dtype(v), copy=True) if is_averageable(v) else v.detach().clone()
            for k, v in state.items()}


def float64_sums(global_state: State) -> State:
    """Zeroed float64 (complex128) accumulators for every float tensor of the model."""
    return {k: torch.zeros(v.shape, dtype=wide_dtype(v)) for k, v in global_state.items() if is_averageable(v)}
