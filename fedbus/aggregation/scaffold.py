"""SCAFFOLD: stochastic controlled averaging, option II.

Karimireddy, Kale, Mohri, Reddi, Stich, Suresh 2020, "SCAFFOLD: Stochastic Controlled
Averaging for Federated Learning" (ICML 2020), Algorithm 1.

The server keeps a control variate c (zeros at the start, one entry per float tensor of
the model) and sends it with x. Client i, holding its own c_i across rounds, runs K local
steps  y <- y - eta_l (g_i(y) - c_i + c)  from y = x and then (option II)

    c_i+  = c_i - c + (x - y_i) / (K eta_l)
    Δy_i  = y_i - x,      Δc_i = c_i+ - c_i

The server averages uniformly over the sampled set S (not by sample count) and steps

    x <- x + eta_g * (1/|S|) sum_{i in S} Δy_i
    c <- c + (1/N) sum_{i in S} Δc_i  =  c + (|S|/N) * mean_{i in S} Δc_i

with N the total number of clients. ``result()`` is the proposed x; ``commit()`` applies the
c update after the round succeeded, so a failed round leaves c untouched.

Δc_i arrives in ``contribution.extras["scaffold_delta_c"]`` (a State with c's keys);
``scaffold_client_update`` is the worker-side formula. The correction c - c_i only makes
sense for tensors trained by gradient; c also has entries for float buffers (BatchNorm
running statistics) so that keys line up, and workers simply do not apply them there.

Streaming and mergeable: float64 sums of Δy and Δc plus the count (partials add up, see
``partial.py``); c is kept in float64, sent in the model's dtypes (``configure`` gives
``{"scaffold": c}``), and persisted by ``state_dict``.

Local momentum. Option II's (x − y_i)/(K eta_l) is the mean corrected gradient only for
plain SGD. With heavy-ball momentum rho (and/or a FedProx term) the corrected gradients
enter y_i with the FedNova weights a_j (see fednova.py), x − y_i = eta_l Σ_j a_j (g_j − c_i + c),
so the same estimate reads

    c_i+ = c_i − c + (x − y_i) / (eta_l · ||a||_1),      ||a||_1 = fednova_a(K, rho, mu, eta_l)

which is option II exactly when rho = mu = 0 (||a||_1 = K). Using K with rho = 0.9 would
overstate c_i about tenfold (||a||_1 ≈ K/(1 − rho)) and make the correction diverge —
measured on digits: accuracy fell from 0.67 to 0.47 over 5 rounds. Pass the worker's
``momentum`` (and ``proximal_mu``) to ``scaffold_client_update``. This assumes, as the
paper's update y <- y − eta_l (g − c_i + c) does, that the correction is added to the
gradient before the optimizer's momentum.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from fedbus.aggregation.base import (Accumulator, AggregationRule, Contribution, State, StateDict, float_keys,
                                     is_averageable, require, tensors_with_prefix, wide_dtype)
from fedbus.aggregation.streaming import StreamingAccumulator
from fedbus.aggregation.fednova import fednova_a

DELTA_C = "scaffold_delta_c"


def scaffold_client_update(c_global: State, c_local: State, x_global: State, y_local: State,
                           num_steps: int, lr: float, momentum: float = 0.0,
                           proximal_mu: float = 0.0) -> tuple[State, State]:
    """Option II control-variate update for one client: returns (c_i+, Δc_i = c_i+ - c_i).

    ``c_local`` may be empty on a client's first round (c_i = 0). Keys are those of
    ``c_global``; results have c_global's dtypes. ``momentum``/``proximal_mu`` describe the
    local optimizer (see the module docstring); with both 0 this is the paper's K·eta_l.
    """
    if num_steps < 1 or lr <= 0:
        raise ValueError(f"scaffold_client_update needs num_steps >= 1 and lr > 0, got {num_steps}, {lr}")
    steps = fednova_a(num_steps, momentum=momentum, proximal_mu=proximal_mu, lr=lr)
    scale = 1.0 / (steps * lr)
    c_new: State = {}
    delta: State = {}
    for name, c in c_global.items():
        dt = torch.complex128 if c.is_complex() else torch.float64
        ci = c_local[name].to(dt) if name in c_local else torch.zeros(c.shape, dtype=dt)
        drift = (x_global[name].to(dt) - y_local[name].to(dt)) * scale
        new = ci - c.to(dt) + drift
        c_new[name] = new.to(c.dtype)
        delta[name] = (new - ci).to(c.dtype)
    return c_new, delta


class ScaffoldAccumulator(StreamingAccumulator):
    """Uniform float64 sums of Δy_i and Δc_i over the round's contributions (weights are not used)."""

    def __init__(self, global_state: State, eta_g: float, base_version: int = 0, *, rule: str = "scaffold"):
        super().__init__(global_state, base_version, rule=rule, groups=(DELTA_C,))
        self._eta_g = eta_g

    def coefficient(self, c: Contribution, weight: float) -> float:
        return 1.0

    def aggregate_delta(self, name: str, total: torch.Tensor) -> torch.Tensor:
        return total * (self._eta_g / self._count)

    def mean_delta_c(self) -> State:
        return {k: v / self._count for k, v in self._groups[DELTA_C].items()}


class Scaffold(AggregationRule):
    """SCAFFOLD option II; streaming, mergeable; precondition n >= 1, eta_g > 0, N >= |S| at commit."""

    name: ClassVar[str] = "scaffold"
    streaming: ClassVar[bool] = True
    mergeable: ClassVar[bool] = True
    needs_plaintext: ClassVar[bool] = False
    update_groups: ClassVar[tuple[str, ...]] = (DELTA_C,)

    def __init__(self, eta_g: float = 1.0):
        if not (eta_g > 0 and math.isfinite(eta_g)):
            raise ValueError(f"scaffold: eta_g must be finite and > 0, got {eta_g}")
        self.eta_g = float(eta_g)
        self._c: State | None = None   # float64 / complex128 per float tensor
        self._dtypes: dict[str, torch.dtype] = {}

    @property
    def control(self) -> State | None:
        """The server control variate c in float64 (None before the first begin())."""
        return self._c

    def begin(self, global_state: State, base_version: int = 0) -> ScaffoldAccumulator:
        keys = float_keys(global_state)
        if self._c is None:
            self._c = {k: torch.zeros(global_state[k].shape, dtype=wide_dtype(global_state[k])) for k in keys}
            self._dtypes = {k: global_state[k].dtype for k in keys}
        elif set(self._c) != set(keys) or any(self._c[k].shape != global_state[k].shape for k in keys):
            raise ValueError("scaffold: the model's float tensors changed between rounds")
        return ScaffoldAccumulator(global_state, self.eta_g, base_version, rule=self.describe())

    def broadcast(self) -> State:
        """c in the model's dtypes. Call begin() (or load_state_dict) first: c takes its shapes from the model."""
        if self._c is None:
            raise RuntimeError("scaffold: broadcast() before the first begin(); c needs the model's shapes")
        return {k: v.to(self._dtypes[k]) for k, v in self._c.items()}

    def commit(self, aggregator: Accumulator, num_workers_total: int) -> None:
        if not isinstance(aggregator, ScaffoldAccumulator):
            raise TypeError("scaffold.commit needs the aggregator its begin() returned")
        assert self._c is not None
        s = aggregator.count
        if s == 0:
            return
        if num_workers_total < s:
            raise ValueError(f"scaffold: N = {num_workers_total} workers in total but {s} updates aggregated")
        for name, mean in aggregator.mean_delta_c().items():
            self._c[name].add_(mean, alpha=s / num_workers_total)

    def state_dict(self) -> StateDict:
        """``c/<key>``: c in float64/complex128; ``dtype/<key>``: a 0-d tensor of the model's dtype
        (so the broadcast casts identically after a restore). Empty before the first begin()."""
        if self._c is None:
            return {}
        out: StateDict = {f"c/{k}": v.clone() for k, v in self._c.items()}
        out.update({f"dtype/{k}": torch.zeros((), dtype=self._dtypes[k]) for k in self._c})
        return out

    def load_state_dict(self, state: StateDict) -> None:
        if not state:
            self._c, self._dtypes = None, {}
            return
        c = tensors_with_prefix(state, "c/")
        dtypes = tensors_with_prefix(state, "dtype/")
        require(set(state) == {f"c/{k}" for k in c} | {f"dtype/{k}" for k in c} and set(dtypes) == set(c),
                "scaffold: state must hold c/<key> and dtype/<key> for the same keys")
        for k, v in c.items():
            require(isinstance(v, torch.Tensor) and v.dtype in (torch.float64, torch.complex128)
                    and bool(torch.isfinite(v).all()), f"scaffold: c/{k} must be a finite float64/complex128 tensor")
            require(isinstance(dtypes[k], torch.Tensor) and is_averageable(dtypes[k])
                    and dtypes[k].is_complex() == v.is_complex(), f"scaffold: dtype/{k} must match c/{k}'s kind")
        self._c = {k: v.detach().clone() for k, v in c.items()}
        self._dtypes = {k: dtypes[k].dtype for k in c}
