"""FedBuff: buffered asynchronous aggregation (Nguyen et al., AISTATS 2022, Algorithm 1).

The server at version t collects K client deltas in a buffer. Client i trained from
version v_i (staleness τ_i = t − v_i) and sends Δ_i = y_i − x_{v_i}; the server folds
s(τ_i)·Δ_i, and once K arrived steps

    x_{t+1} = x_t + η_g · Σ_i p_i · s(τ_i) · Δ_i / Σ_i p_i

with η_g the server learning rate (``async.server_lr``) and p_i the weight of update i:
its sample count n_i (the paper's unweighted buffer is p_i = 1, i.e. Σ/K). fedbus builds
this from its parts: ``contribution`` scales the delta (``staleness.discounted``), the
job's rule averages the buffer (FedAvg gives the weighted mean above; a robust rule such
as the median aggregates the discounted deltas instead), ``step`` applies η_g, and the
server optimizer (SGD with lr 1 by default) applies the result.
"""

from __future__ import annotations

import torch

from fedbus.aggregation.base import Contribution, State, is_averageable
from fedbus.aggregation.staleness import Staleness, discounted


def contribution(worker_id: str, weight: float, local_state: State, base_state: State, base_version: int,
                 current_version: int, staleness: Staleness, extras: dict | None = None, *,
                 num_steps: int = 0) -> Contribution:
    """s(τ)·Δ with Δ = y − x_base and τ = current_version − base_version."""
    c = Contribution.from_local_state(worker_id, base_version, weight, local_state, base_state, extras,
                                      num_steps=num_steps)
    return discounted(c, staleness(int(current_version) - int(base_version)))


def step(current: State, base: State, proposal: State, server_lr: float) -> State:
    """x_t + η_g · (proposal − x_base): the buffer's aggregate delta applied with the server
    learning rate (proposal = x_base + aggregated delta, what the rule's finalize returns).
    Integer buffers take the aggregate's increment unscaled."""
    if server_lr == 1.0 and all(current[k] is base[k] for k in current):
        return proposal
    out: State = {}
    for name, x in current.items():
        if is_averageable(x):
            dt = torch.complex128 if x.is_complex() else torch.float64
            delta = proposal[name].to(dt) - base[name].to(dt)
            out[name] = (x.to(dt) + server_lr * delta).to(x.dtype)
        elif x.dtype == torch.bool:
            out[name] = proposal[name].clone()
        else:
            out[name] = x + (proposal[name] - base[name])
    return out


__all__ = ["contribution", "step"]
