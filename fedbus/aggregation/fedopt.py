"""The shared skeleton of FedAdagrad, FedAdam and FedYogi.

Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan 2021, "Adaptive Federated
Optimization" (ICLR 2021), Algorithm 2. With Δ_t = proposal_t − x_t (element-wise ops):

    m_t     = beta1 · m_{t−1} + (1 − beta1) · Δ_t              m_{−1} = 0
    v_t     = (per optimizer: fedadagrad.py, fedadam.py, fedyogi.py)   v_{−1} = tau²
    x_{t+1} = x_t + eta · m_t / (sqrt(v_t) + tau)

The paper requires v_{−1} >= tau² and uses no bias correction; we start at v_{−1} = tau².

Bias correction (off by default, not in the paper) follows Kingma & Ba 2015, Algorithm 1,
which assumes zero-initialised moments — so with it both m and v start at 0 — and at the
t-th server step (t = 1 for the first) divides

    m̂_t = m_t / (1 − beta1^t),    v̂_t = v_t / (1 − beta2^t),    x_{t+1} = x_t + eta · m̂_t / (sqrt(v̂_t) + tau)

After the first step m̂_1 = Δ_1 and v̂_1 = Δ_1² exactly, which is the check that t is
counted from 1: implementations that pass the 1-based round number to a formula written
for 0-based t (1 − beta^(round + 1)) under-correct every round, most visibly the first.
FedAdagrad's v is a sum, not an average, so only m is corrected there; FedYogi's v is
corrected like Adam's (its additive step has the same (1 − beta2) scale).

Moments are kept in float64, one pair per float tensor; integer/bool buffers come from
the proposal unchanged. ``state_dict`` holds ``m/<key>``, ``v/<key>`` and the step count ``t``.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

import torch

from fedbus.aggregation.base import ServerOptimizer, State, StateDict, require, scalar_of
from fedbus.aggregation.server_sgd import assemble, load_float64_tensors, pseudo_gradients


class AdaptiveServerOptimizer(ServerOptimizer):
    corrects_v: ClassVar[bool] = True

    def __init__(self, lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3,
                 bias_correction: bool = False):
        if not (lr > 0 and 0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0 and tau > 0):
            raise ValueError(f"{self.name}: need lr > 0, 0 <= beta1 < 1, 0 <= beta2 < 1, tau > 0; "
                             f"got lr={lr}, beta1={beta1}, beta2={beta2}, tau={tau}")
        self.lr, self.beta1, self.beta2, self.tau = float(lr), float(beta1), float(beta2), float(tau)
        self.bias_correction = bool(bias_correction)
        self.t = 0  # server steps taken
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}

    @abstractmethod
    def second_moment(self, v_prev: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        """v_t from v_{t−1} and Δ_t²."""

    def step(self, global_state: State, proposal: State) -> State:
        self.t += 1
        v_init = 0.0 if self.bias_correction else self.tau ** 2
        new = {}
        for name, (x, d) in pseudo_gradients(global_state, proposal).items():
            m = self.m.get(name)
            m = (1.0 - self.beta1) * d if m is None else self.beta1 * m + (1.0 - self.beta1) * d
            v = self.v.get(name)
            v = self.second_moment(torch.full_like(d, v_init) if v is None else v, d * d)
            self.m[name], self.v[name] = m, v
            if self.bias_correction:
                m = m / (1.0 - self.beta1 ** self.t)
                if self.corrects_v:
                    v = v / (1.0 - self.beta2 ** self.t)
            new[name] = x + self.lr * m / (v.sqrt() + self.tau)
        return assemble(global_state, proposal, new)

    def state_dict(self) -> StateDict:
        out: StateDict = {"t": self.t}
        out.update({f"m/{k}": v.clone() for k, v in self.m.items()})
        out.update({f"v/{k}": v.clone() for k, v in self.v.items()})
        return out

    def load_state_dict(self, state: StateDict) -> None:
        require("t" in state, f"{self.name}: state lacks the step count 't'")
        t = scalar_of(state["t"], "t")
        require(float(t).is_integer() and t >= 0, f"{self.name}: t must be an integer >= 0, got {t}")
        parts = load_float64_tensors(self.name, state, ("m/", "v/"), scalars=("t",))
        require(set(parts["m/"]) == set(parts["v/"]), f"{self.name}: m and v must cover the same tensors")
        self.t, self.m, self.v = int(t), parts["m/"], parts["v/"]
