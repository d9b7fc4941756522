"""Partial aggregates: the mergeable statistics of a streaming accumulator.

A mergeable rule's accumulator is a sum: folding contribution i adds c_i · Δ_i to a float64
sum per float tensor (c_i the rule's coefficient: w_i for FedAvg, w_i / a_i for FedNova, 1
for SCAFFOLD), adds w_i · inc_i to the integer-buffer carry, and adds rule scalars and
tensor groups (FedNova's sum w_i a_i, SCAFFOLD's sum Δc_i). Sums commute, so for partials
P_1, P_2 of the same base

    merge(P_1, P_2) = P_1 + P_2 (field by field)  =  the partial of folding every contribution once

(up to float64 rounding of the additions) — which is what lets regional aggregators ship
partials instead of updates, and secure aggregation add masked sums on the same path.

On the wire a partial is a tensor dict (``sums/<key>``, ``carry/<key>``,
``groups/<group>/<key>``, all float64/complex128) plus a small JSON-able dict of scalars
(``to_message`` / ``from_message``); ``fedbus.protocol.codec.encode_tensors`` carries the
first.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import torch

from fedbus.aggregation.base import InvalidUpdate, State, all_finite

WIRE_FORMAT = 1


@dataclass(frozen=True)
class Contributor:
    """Who went into a partial, with which weight, trained from which version."""

    worker_id: str
    weight: float
    base_version: int


@dataclass
class PartialAggregate:
    """Mergeable statistics of contributions to one base model.

    * ``rule``: the rule's ``describe()`` (e.g. ``fedavg+norm_bound(2.5)``); only equal rules merge.
    * ``base_version``: the model the aggregated delta applies to.
    * ``sums``: rule-weighted float64 (complex128) delta sums per float tensor.
    * ``carry``: float64 sums of w_i · increment per integer buffer.
    * ``total_weight``, ``count``: sum of w_i, number of contributions.
    * ``contributors``: one entry per contribution, in fold order.
    * ``scalars``: rule scalars (FedNova: ``weighted_a`` = sum w_i a_i; norm bound: ``clipped``).
    * ``groups``: rule tensor sums (SCAFFOLD: ``scaffold_delta_c`` = sum Δc_i), float64.
    """

    rule: str
    base_version: int
    sums: State
    carry: State
    total_weight: float
    count: int
    contributors: list[Contributor] = field(default_factory=list)
    scalars: dict[str, float] = field(default_factory=dict)
    groups: dict[str, State] = field(default_factory=dict)

    def to_message(self) -> tuple[State, dict[str, Any]]:
        """(tensors for the codec, JSON-able scalars)."""
        tensors: State = {}
        for k, v in self.sums.items():
            tensors[f"sums/{k}"] = v
        for k, v in self.carry.items():
            tensors[f"carry/{k}"] = v
        for g, group in self.groups.items():
            if "/" in g:
                raise ValueError(f"group name {g!r} must not contain '/'")
            for k, v in group.items():
                tensors[f"groups/{g}/{k}"] = v
        meta = {
            "format": WIRE_FORMAT,
            "rule": self.rule,
            "base_version": int(self.base_version),
            "total_weight": float(self.total_weight),
            "count": int(self.count),
            "contributors": [[c.worker_id, float(c.weight), int(c.base_version)] for c in self.contributors],
            "scalars": {k: float(v) for k, v in self.scalars.items()},
            "groups": sorted(self.groups),
        }
        return tensors, meta

    @classmethod
    def from_message(cls, tensors: State, meta: dict[str, Any]) -> PartialAggregate:
        """Inverse of ``to_message``; InvalidUpdate on anything malformed (it came off the network).

        Shapes and keys are checked against the model by ``merge``; here only the structure.
        """
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise InvalidUpdate(f"partial aggregate: {what}")

        need(isinstance(meta, dict) and meta.get("format") == WIRE_FORMAT, "unknown format")
        need(isinstance(meta.get("rule"), str), "rule must be a string")
        for key in ("base_version", "count"):
            v = meta.get(key)
            need(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0, f"{key} must be an int >= 0")
        tw = meta.get("total_weight")
        need(isinstance(tw, (int, float)) and not isinstance(tw, bool) and math.isfinite(tw) and tw >= 0,
             "total_weight must be finite and >= 0")
        contributors = []
        raw = meta.get("contributors")
        need(isinstance(raw, list), "contributors must be a list")
        for entry in raw:
            need(isinstance(entry, (list, tuple)) and len(entry) == 3 and isinstance(entry[0], str)
                 and isinstance(entry[1], (int, float)) and not isinstance(entry[1], bool)
                 and math.isfinite(entry[1]) and entry[1] > 0
                 and isinstance(entry[2], numbers.Integral) and not isinstance(entry[2], bool),
                 "contributors must be [worker_id, weight > 0, base_version] triples")
            contributors.append(Contributor(entry[0], float(entry[1]), int(entry[2])))
        need(len(contributors) == meta["count"], "count does not match the contributors")
        scalars = meta.get("scalars")
        need(isinstance(scalars, dict) and all(isinstance(k, str) and isinstance(v, (int, float))
                                                and not isinstance(v, bool) and math.isfinite(v)
                                                for k, v in scalars.items()), "scalars must be finite numbers")
        group_names = meta.get("groups")
        need(isinstance(group_names, list) and all(isinstance(g, str) and "/" not in g for g in group_names),
             "groups must be a list of names")
        sums: State = {}
        carry: State = {}
        groups: dict[str, State] = {g: {} for g in group_names}
        for name, t in tensors.items():
            need(isinstance(t, torch.Tensor), f"{name!r} is not a tensor")
            kind, _, rest = name.partition("/")
            if kind == "sums":
                sums[rest] = t
            elif kind == "carry":
                carry[rest] = t
            elif kind == "groups":
                g, _, key = rest.partition("/")
                need(g in groups, f"tensor {name!r} of an undeclared group")
                groups[g][key] = t
            else:
                raise InvalidUpdate(f"partial aggregate: unexpected tensor {name!r}")
        return cls(meta["rule"], int(meta["base_version"]), sums, carry, float(tw), int(meta["count"]),
                   contributors, {k: float(v) for k, v in scalars.items()}, groups)


def as_one_contribution(rule: str, base_version: int, base: State, result: State, contributors: list[Contributor]
                        ) -> PartialAggregate:
    """A region's result of any rule (e.g. a robust one) as the partial of one contribution:
    its delta ``result − base`` weighted by the region's total weight W = Σ w_i, so that
    averaging partials (FedAvg's merge) weighs regions by their samples. The contributor
    list still names every update inside (their weights sum to W)."""
    weight = float(sum(c.weight for c in contributors))
    if not contributors or not (weight > 0 and math.isfinite(weight)):
        raise InvalidUpdate("a region's result needs contributors with a positive total weight")
    sums: State = {}
    carry: State = {}
    for k, x in base.items():
        if x.dtype == torch.bool:
            continue
        if x.is_floating_point() or x.is_complex():
            dt = torch.complex128 if x.is_complex() else torch.float64
            sums[k] = (result[k].to(dt) - x.to(dt)) * weight
        else:
            carry[k] = (result[k].to(torch.int64) - x.to(torch.int64)).to(torch.float64) * weight
    return PartialAggregate(rule, int(base_version), sums, carry, weight, len(contributors), list(contributors))


def discounted_partial(partial: PartialAggregate, factor: float, base_version: int) -> PartialAggregate:
    """``partial`` with its delta sums (and tensor groups) scaled by a staleness discount
    s(τ), relabelled onto the accumulator's ``base_version``: each update inside enters as
    s(τ)·w_i·Δ_i, as FedBuff folds a single stale update; weights are not scaled."""
    if not (math.isfinite(factor) and factor >= 0):
        raise InvalidUpdate(f"partial aggregate: discount {factor!r} is not finite and >= 0")
    return PartialAggregate(partial.rule, int(base_version), {k: v * factor for k, v in partial.sums.items()},
                            dict(partial.carry), partial.total_weight, partial.count, list(partial.contributors),
                            dict(partial.scalars),
                            {g: {k: v * factor for k, v in s.items()} for g, s in partial.groups.items()})


def check_partial_tensors(what: str, got: State, like: State) -> None:
    """``got`` has exactly ``like``'s keys, shapes and dtypes, and only finite values (InvalidUpdate)."""
    if set(got) != set(like):
        missing, extra = sorted(set(like) - set(got)), sorted(set(got) - set(like))
        raise InvalidUpdate(f"partial aggregate: {what} keys differ (missing {missing[:5]}, unexpected {extra[:5]})")
    for k, ref in like.items():
        t = got[k]
        if not isinstance(t, torch.Tensor) or t.shape != ref.shape or t.dtype != ref.dtype:
            raise InvalidUpdate(f"partial aggregate: {what}[{k!r}] must be {ref.dtype} of shape {tuple(ref.shape)}")
        if not all_finite(t):
            raise InvalidUpdate(f"partial aggregate: {what}[{k!r}] has non-finite values")


__all__ = ["Contributor", "PartialAggregate", "as_one_contribution", "check_partial_tensors", "discounted_partial"]
