"""FedAdam: server Adam on the pseudo-gradient.

Reddi et al. 2021, "Adaptive Federated Optimization" (ICLR 2021), Algorithm 2, FedAdam:

    m_t     = beta1 · m_{t−1} + (1 − beta1) · Δ_t
    v_t     = beta2 · v_{t−1} + (1 − beta2) · Δ_t²             v_{−1} = tau²
    x_{t+1} = x_t + eta · m_t / (sqrt(v_t) + tau)

No bias correction in the paper; ``bias_correction=True`` divides by 1 − beta^t with t
the 1-based server step (see fedopt.py).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from fedbus.aggregation.fedopt import AdaptiveServerOptimizer


class FedAdam(AdaptiveServerOptimizer):
    name: ClassVar[str] = "adam"

    def second_moment(self, v_prev: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        return self.beta2 * v_prev + (1.0 - self.beta2) * delta_sq
