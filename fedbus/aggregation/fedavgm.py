"""FedAvgM: server momentum on the pseudo-gradient.

Hsu, Qi, Brown 2019, "Measuring the Effects of Non-Identical Data Distribution for
Federated Visual Classification" (arXiv:1909.06335), Sec. 3:

    Δ_t     = proposal_t − x_t            (the averaged client progress)
    v_t     = beta · v_{t−1} + Δ_t,        v_{−1} = 0
    x_{t+1} = x_t + lr · v_t

(the paper writes it with Δw = x_t − proposal and x_{t+1} = x_t − v; the sign is folded
in here). beta = 0 and lr = 1 is FedAvg. The velocity is kept in float64 per float tensor
and persisted by ``state_dict`` (``velocity/<key>``).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from fedbus.aggregation.base import ServerOptimizer, State, StateDict
from fedbus.aggregation.server_sgd import assemble, load_float64_tensors, pseudo_gradients


class ServerMomentum(ServerOptimizer):
    name: ClassVar[str] = "momentum"

    def __init__(self, lr: float = 1.0, beta: float = 0.9):
        if not (lr > 0 and 0.0 <= beta < 1.0):
            raise ValueError(f"momentum: need lr > 0 and 0 <= beta < 1, got lr={lr}, beta={beta}")
        self.lr, self.beta = float(lr), float(beta)
        self.velocity: dict[str, torch.Tensor] = {}

    def step(self, global_state: State, proposal: State) -> State:
        new = {}
        for name, (x, d) in pseudo_gradients(global_state, proposal).items():
            v = self.velocity.get(name)
            v = d if v is None else self.beta * v + d
            self.velocity[name] = v
            new[name] = x + self.lr * v
        return assemble(global_state, proposal, new)

    def state_dict(self) -> StateDict:
        return {f"velocity/{k}": v.clone() for k, v in self.velocity.items()}

    def load_state_dict(self, state: StateDict) -> None:
        self.velocity = load_float64_tensors(self.name, state, ("velocity/",))["velocity/"]
