"""Plain server step: x_{t+1} = x_t + eta · Δ_t,  Δ_t = proposal − x_t.

Reddi et al. 2021, "Adaptive Federated Optimization" (ICLR 2021), Algorithm 1
(FedOpt with ServerOpt = SGD). With eta = 1 the new model is the rule's proposal: FedAvg
of McMahan et al. 2017, and the paper-exact form of every rule in this package.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from fedbus.aggregation.base import ServerOptimizer, State, StateDict, float_keys, from_real64, require, to_real64


def pseudo_gradients(global_state: State, proposal: State) -> dict[str, tuple]:
    """name -> (x_t, Δ_t) in float64 for every float tensor (complex as real pairs)."""
    out = {}
    for name in float_keys(global_state):
        x = to_real64(global_state[name])
        out[name] = (x, to_real64(proposal[name]) - x)
    return out


def assemble(global_state: State, proposal: State, new_floats: dict) -> State:
    """Float tensors from the optimizer (cast to the model's dtypes), the rest from the proposal."""
    return {k: from_real64(new_floats[k], global_state[k]) if k in new_floats else proposal[k]
            for k in global_state}


def load_float64_tensors(name: str, state: StateDict, prefixes: tuple[str, ...],
                         scalars: tuple[str, ...] = ()) -> dict[str, State]:
    """Split a state dict into {prefix: {key: tensor}}, checking that every entry is one of
    ``prefixes`` + key (a finite float64 tensor) or one of ``scalars``; StrategyConfigError otherwise."""
    out: dict[str, State] = {p: {} for p in prefixes}
    for k, v in state.items():
        if k in scalars:
            continue
        prefix = next((p for p in prefixes if k.startswith(p)), None)
        require(prefix is not None, f"{name}: unexpected state entry {k!r}")
        require(isinstance(v, torch.Tensor) and v.dtype == torch.float64 and bool(torch.isfinite(v).all()),
                f"{name}: state {k!r} must be a finite float64 tensor")
        out[prefix][k[len(prefix):]] = v.detach().clone()
    return out


class ServerSGD(ServerOptimizer):
    name: ClassVar[str] = "sgd"

    def __init__(self, lr: float = 1.0):
        if not lr > 0:
            raise ValueError(f"sgd: lr must be > 0, got {lr}")
        self.lr = float(lr)

    def step(self, global_state: State, proposal: State) -> State:
        if self.lr == 1.0:
            # x + 1·(p − x) is p up to rounding; return p itself so lr = 1 is bit-exact FedAvg.
            return {k: proposal[k] for k in global_state}
        return assemble(global_state, proposal,
                        {k: x + self.lr * d for k, (x, d) in pseudo_gradients(global_state, proposal).items()})
