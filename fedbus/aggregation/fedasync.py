"""FedAsync: asynchronous federated optimization (Xie, Koyejo, Gupta 2019, Algorithm 1).

Each update is mixed into the model as soon as it arrives (a buffer of one): the server at
version t receives y, trained from version v (staleness τ = t − v), and sets

    x_{t+1} = (1 − α_t) · x_t + α_t · y,        α_t = α · s(τ)

with α in (0, 1] (``async.alpha``) and s a staleness function (``staleness.py``). Written
as a delta against the *current* model, x_{t+1} = x_t + α_t · (y − x_t): ``contribution``
builds α_t·(y − x_t), which the job's rule (FedAvg over one contribution) adds to x_t.
"""

from __future__ import annotations

from fedbus.aggregation.base import Contribution, State
from fedbus.aggregation.staleness import Staleness, discounted


def mixing_weight(alpha: float, staleness: Staleness, tau: int) -> float:
    """α_t = α · s(τ)."""
    return float(alpha) * staleness(int(tau))


def contribution(worker_id: str, weight: float, local_state: State, current_state: State, current_version: int,
                 base_version: int, alpha: float, staleness: Staleness, extras: dict | None = None, *,
                 num_steps: int = 0) -> Contribution:
    """α_t · (y − x_t), labelled with the current version (it is a delta against x_t)."""
    c = Contribution.from_local_state(worker_id, current_version, weight, local_state, current_state, extras,
                                      num_steps=num_steps)
    return discounted(c, mixing_weight(alpha, staleness, int(current_version) - int(base_version)))


def mix(current: State, local: State, alpha_t: float) -> State:
    """(1 − α_t)·x + α_t·y for every float tensor (the paper's update, for reference and tests)."""
    return {k: ((1 - alpha_t) * x.double() + alpha_t * local[k].double()).to(x.dtype) if x.is_floating_point()
            else x for k, x in current.items()}


__all__ = ["mixing_weight", "contribution", "mix"]
