"""FedProx: the worker's proximal term (server side is FedAvg).

Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith 2020, "Federated Optimization in
Heterogeneous Networks" (MLSys 2020), eq. (2): each client approximately minimises

    h_k(w; w_t) = F_k(w) + (mu / 2) · ||w − w_t||²

— the squared L2 norm over all trained parameters, not the norm itself. The server
aggregates with FedAvg; with FedNova, pass the same mu and the local lr to
``fednova.fednova_a``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, ClassVar

import torch

from fedbus.aggregation.base import StrategyConfigError
from fedbus.aggregation.fedavg import FedAvg


def proximal_term(params: Iterable[tuple[str, torch.Tensor]], global_params: dict[str, torch.Tensor],
                  mu: float) -> torch.Tensor:
    """(mu / 2) · sum over parameters of ||w − w_t||², differentiable in w.

    ``params`` is ``model.named_parameters()``; parameters absent from ``global_params`` or
    not requiring grad are skipped (frozen layers are not pulled anywhere).
    """
    total: torch.Tensor | None = None
    for name, w in params:
        if not w.requires_grad or name not in global_params:
            continue
        diff = w - global_params[name].detach().to(w.dtype)
        sq = (diff * diff).sum()
        total = sq if total is None else total + sq
    if total is None:
        return torch.zeros(())
    return 0.5 * mu * total


class FedProx(FedAvg):
    """FedProx as a rule: the server side is FedAvg (streaming, mergeable); workers are told ``proximal_mu``."""

    name: ClassVar[str] = "fedprox"

    def __init__(self, mu: float = 0.01):
        if not (mu >= 0 and math.isfinite(mu)):
            raise StrategyConfigError(f"fedprox: mu must be finite and >= 0, got {mu}")
        self.mu = mu

    def configure(self, worker_id: str | None = None, version: int | None = None) -> dict[str, Any]:
        """``{"proximal_mu": mu}``: the coefficient of the worker's proximal term."""
        return {"proximal_mu": float(self.mu)}
