"""Staleness weighting for asynchronous aggregation and late updates.

An update trained from model version v_i, folded while the server is at version t, has
staleness τ_i = t − v_i >= 0. Xie, Koyejo, Gupta 2019 ("Asynchronous Federated
Optimization", section 5.2) weigh it by a function s(τ) with s(0) = 1, non-increasing:

    constant      s(τ) = 1
    polynomial    s(τ) = (1 + τ)^(−a),                       a >= 0
    hinge         s(τ) = 1                  if τ <= b
                  s(τ) = 1 / (a·(τ − b) + 1) otherwise,      a >= 0, b >= 0

FedBuff (Nguyen et al., AISTATS 2022, Algorithm 1) uses the polynomial one with a = 1/2:
s(τ) = 1/sqrt(1 + τ). A contribution enters an aggregate as s(τ_i)·Δ_i (``discounted``):
its delta is scaled, its weight (sample count) is not, so the discount is absolute — a
buffer of equally stale updates moves the model less than a fresh one — as in the papers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

from fedbus.aggregation.base import Contribution, InvalidUpdate, is_averageable

Staleness = Callable[[int], float]


def constant() -> Staleness:
    """s(τ) = 1."""
    def s(tau: int) -> float:
        _check(tau)
        return 1.0
    return s


def polynomial(a: float = 0.5) -> Staleness:
    """s(τ) = (1 + τ)^(−a); a = 0.5 is FedBuff's 1/sqrt(1 + τ)."""
    if not (math.isfinite(a) and a >= 0):
        raise ValueError(f"polynomial staleness needs a finite a >= 0, got {a}")

    def s(tau: int) -> float:
        _check(tau)
        return (1.0 + tau) ** (-a)
    return s


def hinge(a: float = 10.0, b: int = 4) -> Staleness:
    """s(τ) = 1 for τ <= b, else 1 / (a(τ − b) + 1)."""
    if not (math.isfinite(a) and a >= 0) or b < 0:
        raise ValueError(f"hinge staleness needs finite a >= 0 and b >= 0, got a={a}, b={b}")

    def s(tau: int) -> float:
        _check(tau)
        return 1.0 if tau <= b else 1.0 / (a * (tau - b) + 1.0)
    return s


def _check(tau: int) -> None:
    if tau < 0:
        raise InvalidUpdate(f"staleness {tau} < 0: the update names a version newer than the server's")


def from_spec(spec) -> Staleness:
    """The function a job spec's ``async.staleness`` names."""
    if spec.name == "constant":
        return constant()
    if spec.name == "polynomial":
        return polynomial(spec.a)
    if spec.name == "hinge":
        return hinge(spec.a, spec.b)
    raise ValueError(f"unknown staleness function {spec.name!r}")


def discounted(c: Contribution, factor: float) -> Contribution:
    """``c`` with every float delta scaled by ``factor`` (integer buffer increments, which
    cannot be scaled, and the weight stay as they are)."""
    if not (math.isfinite(factor) and factor >= 0):
        raise InvalidUpdate(f"contribution from {c.worker_id!r}: discount {factor!r} is not finite and >= 0")
    if factor == 1.0:
        return c
    delta = {k: (v * factor if is_averageable(v) else v) for k, v in c.delta.items()}
    return replace(c, delta=delta)


def staleness_discount(current_version: int, base_version: int, exponent: float = 0.5) -> float:
    """(1 + τ)^(−exponent) with τ = current_version − base_version; InvalidUpdate if τ < 0."""
    return polynomial(exponent)(int(current_version) - int(base_version))


def staleness_weight(num_samples: float, current_version: int, base_version: int, exponent: float = 0.5) -> float:
    """n_i · s(τ_i): a float weight discounted by staleness (for rules that weigh, not scale)."""
    return float(num_samples) * staleness_discount(current_version, base_version, exponent)


__all__ = ["Staleness", "constant", "polynomial", "hinge", "from_spec", "discounted", "staleness_discount",
           "staleness_weight"]
