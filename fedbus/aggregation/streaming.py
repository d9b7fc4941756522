"""The shared half of every streaming (mergeable) rule: fold, partial, merge, finalize.

A streaming rule is defined by three small hooks on ``StreamingAccumulator``:

* ``coefficient(c, w)`` — how contribution c (weight w) enters the float64 sums:
  S[k] += coefficient · Δ_c[k]  (FedAvg: w; FedNova: w / a_c; SCAFFOLD: 1);
* ``scalars_of(c, w)`` — rule scalars added per contribution (FedNova: {"weighted_a": w · a_c});
* ``aggregate_delta(name, S[name])`` — the aggregated delta from the sums at finalize
  (FedAvg: S / sum w).

Tensor groups named in ``groups`` (SCAFFOLD's Δc) are summed uniformly. Everything the
accumulator keeps is a sum, so ``partial()`` exports it and ``merge()`` adds another
partial of the same rule and base: the result equals folding all contributions into one
accumulator. ``finalize()`` returns x_base + aggregated delta, cast to the base's dtypes,
in the base's key order; integer buffers go through ``IntegerBufferCarry``.

Memory: one float64 (complex128) sum per float tensor and group entry, whatever the cohort.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from fedbus.aggregation.base import (ClientUpdate, Contribution, IntegerBufferCarry, InvalidUpdate, State,
                                     all_finite, check_finite_result, float64_sums, float_keys, tensor_group,
                                     validate_contribution, widened)
from fedbus.aggregation.partial import Contributor, PartialAggregate, check_partial_tensors


# Models with at least this many float elements are accumulated lean: 32M float32 values
# (128 MB) would otherwise cost 256 MB of float64 base plus 256 MB of float64 sums and a
# float64 delta per update. Lean sums are float32 for float32 (and narrower) models and
# hold sum c*y (the base comes off once, at finalize): the result is within a few float32
# ulps of the model's own values (n * 2^-24 relative for n updates), far
# below what one training step changes, and it is what keeps the coordinator within 3x the
# model (docs/data-path.md). Smaller models keep the exact float64 path.
LEAN_MIN_ELEMENTS = 32 * 2**20


def lean_sum_dtype(t: torch.Tensor) -> torch.dtype:
    if t.is_complex():
        return torch.complex128 if t.dtype == torch.complex128 else torch.complex64
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class StreamingAccumulator:
    """Float64 sums of rule-weighted deltas, the integer-buffer carry, counts and contributors."""

    scalar_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, global_state: State, base_version: int = 0, *, rule: str = "",
                 groups: tuple[str, ...] = ()):
        self._dtypes = {k: v.dtype for k, v in global_state.items()}
        self.base_version = int(base_version)
        self.rule = rule
        self._keys = float_keys(global_state)
        # A large model is accumulated lean (see LEAN_MIN_ELEMENTS): no widened copy of
        # the base, sums in float32 (float64 stays float64), deltas slice by slice.
        # (only where fold is this class's own: a rule that changes how a contribution enters,
        # e.g. central DP clipping, sees every contribution whole)
        self.lean = (not groups and type(self).fold is StreamingAccumulator.fold
                     and sum(global_state[k].numel() for k in self._keys) >= LEAN_MIN_ELEMENTS)
        self._finalized = False
        self._lean_coeffs = 0.0  # sum of the coefficients folded lean (their sums are of y, not y - x)
        if self.lean:
            # The base as it is: the round's model, which nothing modifies in place. The same
            # tensor objects (not detached aliases), so a coordinator that pages the model out
            # to a file mapping between its uses (fedbus.spill.page_out_) rebinds these too.
            self._global = {k: v if not v.requires_grad else v.detach() for k, v in global_state.items()}
            self._sums = {k: torch.zeros(global_state[k].shape, dtype=lean_sum_dtype(global_state[k]))
                          for k in self._keys}
        else:
            # The base in float64 (complex128): deltas and the final x + Δ are computed there.
            self._global = widened(global_state)
            # float64 (complex128) sums: summing thousands of float16 updates in their own dtype
            # would stall; the division happens once, in finalize().
            self._sums = float64_sums(global_state)
        self._groups: dict[str, State] = {g: float64_sums(global_state) for g in groups}
        self._carry = IntegerBufferCarry(global_state)
        self._scalars: dict[str, float] = {k: 0.0 for k in self.scalar_names}
        self._total_weight = 0.0
        self._count = 0
        self._contributors: list[Contributor] = []

    # ---- rule hooks ------------------------------------------------------------------

    def coefficient(self, c: Contribution, weight: float) -> float:
        return weight

    def scalars_of(self, c: Contribution, weight: float) -> dict[str, float]:
        return {}

    def aggregate_delta(self, name: str, total: torch.Tensor) -> torch.Tensor:
        return total / self._total_weight

    # ---- the contract ----------------------------------------------------------------

    @property
    def count(self) -> int:
        return self._count

    @property
    def total_weight(self) -> float:
        return self._total_weight

    @property
    def contributors(self) -> list[Contributor]:
        return list(self._contributors)

    def fold(self, c: Contribution) -> None:
        """Add one contribution; InvalidUpdate (and no change) if the rule cannot use it."""
        self._check_open()
        w = validate_contribution(self._global, self.base_version, c)
        coeff = self.coefficient(c, w)
        if not (math.isfinite(coeff) and coeff >= 0):
            raise InvalidUpdate(f"contribution from {c.worker_id!r}: its coefficient {coeff!r} is not finite")
        like = {k: self._sums[k] for k in self._keys}
        group_tensors = {g: tensor_group(c, g, like) for g in self._groups}
        scalars = self.scalars_of(c, w)
        for name, acc in self._sums.items():
            acc.add_(c.delta[name].to(acc.dtype), alpha=coeff)
        for g, sums in self._groups.items():
            for name, acc in sums.items():
                acc.add_(group_tensors[g][name].to(acc.dtype))
        for k, v in scalars.items():
            self._scalars[k] += v
        self._carry.fold(c, w)
        self._total_weight += w
        self._count += 1
        self._contributors.append(Contributor(c.worker_id, w, int(c.base_version)))

    def fold_local_state(self, worker_id: str, weight: float, local_state: State, extras: dict | None = None, *,
                         num_steps: int = 0, base_version: int | None = None) -> None:
        """``fold(from_local_state(...))`` without building the contribution: a lean
        accumulator adds coefficient * y to its sums in place (one pass, no temporary) and
        subtracts the coefficients' total times the base once, at finalize, so folding
        costs no memory beyond the update itself. InvalidUpdate (and no change) if the rule
        cannot use it."""
        base_version = self.base_version if base_version is None else base_version
        if not self.lean or not all(isinstance(local_state.get(k), torch.Tensor) and all_finite(local_state[k])
                                    for k in self._keys):
            # (non-finite values may still give finite deltas where they equal the base's:
            # the exact path decides)
            self.fold(self.from_local_state(worker_id, weight, local_state, extras, num_steps=num_steps,
                                            base_version=base_version))
            return
        self._check_open()
        # Everything but the float deltas, built and validated as usual (integer buffers are small).
        rest = {k: v for k, v in self._global.items() if k not in self._keys}
        probe = Contribution.from_local_state(worker_id, base_version, weight, local_state, rest, extras,
                                              num_steps=num_steps)
        for k in self._keys:
            value = local_state[k]
            if value.shape != self._global[k].shape or value.is_complex() != self._global[k].is_complex():
                raise InvalidUpdate(f"update from {worker_id!r}: tensor {k!r} is {value.dtype} {tuple(value.shape)}, "
                                    f"the model has {self._global[k].dtype} {tuple(self._global[k].shape)}")
        if base_version > self.base_version:
            raise InvalidUpdate(f"contribution from {worker_id!r} was trained from version {base_version}, "
                                f"newer than this aggregate's base {self.base_version}")
        w = probe.weight
        coeff = self.coefficient(probe, w)
        if not (math.isfinite(coeff) and coeff >= 0):
            raise InvalidUpdate(f"contribution from {worker_id!r}: its coefficient {coeff!r} is not finite")
        scalars = self.scalars_of(probe, w)
        for name, acc in self._sums.items():
            # Lean sums hold sum_c coeff_c * y_c; sum_c coeff_c * x comes off at finalize:
            # one pass per update, no temporary.
            acc.add_(local_state[name].detach(), alpha=coeff)
        self._lean_coeffs += coeff
        for k, v in scalars.items():
            self._scalars[k] += v
        self._carry.fold(probe, w)
        self._total_weight += w
        self._count += 1
        self._contributors.append(Contributor(worker_id, w, int(base_version)))

    def _check_open(self) -> None:
        if self._finalized:
            raise RuntimeError("this accumulator was finalized in place (lean): it takes no more updates")

    def partial(self) -> PartialAggregate:
        """A copy of the mergeable statistics (later folds do not change it)."""
        self._check_open()
        return PartialAggregate(
            rule=self.rule, base_version=self.base_version,
            # (lean sums hold sum c*y: exported as sum c*(y - x), what every partial carries)
            sums={k: v.clone().sub_(self._global[k], alpha=self._lean_coeffs) if self._lean_coeffs else v.clone()
                  for k, v in self._sums.items()},
            carry={k: v.clone() for k, v in self._carry.sums.items()},
            total_weight=self._total_weight, count=self._count, contributors=list(self._contributors),
            scalars=dict(self._scalars),
            groups={g: {k: v.clone() for k, v in s.items()} for g, s in self._groups.items()})

    def merge(self, partial: PartialAggregate) -> None:
        """Add a partial of the same rule and base; InvalidUpdate (and no change) otherwise."""
        if not isinstance(partial, PartialAggregate):
            raise InvalidUpdate(f"expected a PartialAggregate, got {type(partial).__name__}")
        if partial.rule != self.rule:
            raise InvalidUpdate(f"partial aggregate of rule {partial.rule!r} cannot merge into {self.rule!r}")
        if partial.base_version != self.base_version:
            raise InvalidUpdate(f"partial aggregate of base version {partial.base_version} cannot merge into "
                                f"base version {self.base_version}")
        check_partial_tensors("sums", partial.sums, self._sums)
        check_partial_tensors("carry", partial.carry, self._carry.sums)
        if set(partial.groups) != set(self._groups):
            raise InvalidUpdate(f"partial aggregate: groups {sorted(partial.groups)}, expected {sorted(self._groups)}")
        for g, sums in self._groups.items():
            check_partial_tensors(f"groups[{g}]", partial.groups[g], sums)
        if set(partial.scalars) != set(self._scalars):
            raise InvalidUpdate(f"partial aggregate: scalars {sorted(partial.scalars)}, "
                                f"expected {sorted(self._scalars)}")
        if partial.count != len(partial.contributors) or partial.count < 0:
            raise InvalidUpdate("partial aggregate: count does not match its contributors")
        weight = sum(c.weight for c in partial.contributors)
        if partial.count and not (partial.total_weight > 0 and abs(weight - partial.total_weight)
                                  <= 1e-9 * max(weight, partial.total_weight)):
            raise InvalidUpdate("partial aggregate: total_weight does not match its contributors' weights")
        if any(c.base_version > self.base_version for c in partial.contributors):
            raise InvalidUpdate("partial aggregate: a contributor was trained from a newer version than its base")
        for name, acc in self._sums.items():
            acc.add_(partial.sums[name])
        for g, sums in self._groups.items():
            for name, acc in sums.items():
                acc.add_(partial.groups[g][name])
        for k, v in partial.scalars.items():
            self._scalars[k] += v
        self._carry.merge(partial.carry, partial.total_weight)
        self._total_weight += partial.total_weight
        self._count += partial.count
        self._contributors.extend(partial.contributors)

    def finalize(self) -> State:
        """x_base + aggregated delta: the same keys, dtypes and order as the base."""
        if self._count == 0:
            raise ValueError("no updates to aggregate")
        self._check_open()
        out = self._carry.result()
        for name in self._keys:
            if self.lean:
                # In place, into the sums: the new model costs no memory beyond them. The
                # accumulator is spent afterwards.
                total = self._sums[name].sub_(self._global[name], alpha=self._lean_coeffs)
                delta = self.aggregate_delta(name, total)
                if delta is not total:
                    total.copy_(delta)
                    del delta
                out[name] = total.add_(self._global[name]).to(self._dtypes[name])
            else:
                out[name] = (self._global[name] + self.aggregate_delta(name, self._sums[name])).to(self._dtypes[name])
        self._finalized = self.lean
        check_finite_result(out, self._global)
        return {k: out[k] for k in self._global}

    def from_local_state(self, worker_id: str, weight: float, local_state: State, extras: dict | None = None, *,
                         num_steps: int = 0, base_version: int | None = None,
                         delta_dtype: torch.dtype | None = None) -> Contribution:
        """``Contribution.from_local_state`` against this accumulator's base (and base version by
        default); faster than passing the model, whose float64 copy is already here."""
        return Contribution.from_local_state(worker_id, self.base_version if base_version is None else base_version,
                                             weight, local_state, self._global, extras, num_steps=num_steps,
                                             delta_dtype=delta_dtype)

    # ---- legacy entry points -----------------------------------------------------------

    def add(self, update: ClientUpdate) -> None:
        """Legacy: fold a full-weights ClientUpdate (converted against this accumulator's base)."""
        self.fold(Contribution.from_client_update(update, self._global, self.base_version))

    def result(self) -> State:
        """Legacy name of ``finalize``."""
        return self.finalize()


# Older name, kept for imports elsewhere.
StreamingAccumulatorBase = StreamingAccumulator

__all__ = ["StreamingAccumulator", "StreamingAccumulatorBase"]
