"""Staleness weighting for asynchronous aggregation (FedBuff).

Nguyen, Malik, Zhan, Yousefpour, Rabbat, Malek, Huba 2022, "Federated Learning with
Buffered Asynchronous Aggregation" (AISTATS 2022), Algorithm 1: the server folds each
client delta Δ_i, trained from version v_i while the server is at version t, with the
discount

    s(τ_i) = 1 / sqrt(1 + τ_i),      τ_i = t − v_i >= 0

(the polynomial staleness function of Xie, Koyejo, Gupta 2019, "Asynchronous Federated
Optimization", with exponent a = 1/2; ``exponent`` generalises it to (1 + τ)^(−a)).
A contribution's float weight is then  w_i = n_i · s(τ_i)  (or s(τ_i) alone for the paper's
unweighted buffer), and the accumulator's weighted mean does the rest:
``Contribution(..., base_version=v_i, weight=staleness_weight(n_i, t, v_i))`` folded into an
accumulator begun at version t.
"""

from __future__ import annotations

import math

from fedbus.aggregation.base import InvalidUpdate


def staleness_discount(current_version: int, base_version: int, exponent: float = 0.5) -> float:
    """(1 + τ)^(−exponent) with τ = current_version − base_version; InvalidUpdate if τ < 0."""
    tau = int(current_version) - int(base_version)
    if tau < 0:
        raise InvalidUpdate(f"base version {base_version} is newer than the server's {current_version}")
    if not (exponent >= 0 and math.isfinite(exponent)):
        raise ValueError(f"staleness exponent must be finite and >= 0, got {exponent}")
    return (1.0 + tau) ** (-exponent)


def staleness_weight(num_samples: float, current_version: int, base_version: int, exponent: float = 0.5) -> float:
    """n_i · s(τ_i): the float weight of a contribution trained from ``base_version``."""
    return float(num_samples) * staleness_discount(current_version, base_version, exponent)


__all__ = ["staleness_discount", "staleness_weight"]
