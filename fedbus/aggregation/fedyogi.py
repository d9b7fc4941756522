"""FedYogi: server Yogi on the pseudo-gradient.

Reddi et al. 2021, "Adaptive Federated Optimization" (ICLR 2021), Algorithm 2, FedYogi
(Yogi: Zaheer et al. 2018, "Adaptive Methods for Nonconvex Optimization"):

    m_t     = beta1 · m_{t−1} + (1 − beta1) · Δ_t
    v_t     = v_{t−1} − (1 − beta2) · Δ_t² · sign(v_{t−1} − Δ_t²)      v_{−1} = tau²
    x_{t+1} = x_t + eta · m_t / (sqrt(v_t) + tau)

Unlike Adam, v moves by an additive (1 − beta2)·Δ² toward Δ², so a single large update
cannot shrink the effective step abruptly. sign(0) = 0: v stays put when v_{t−1} = Δ_t².
"""

from __future__ import annotations

from typing import ClassVar

import torch

from fedbus.aggregation.fedopt import AdaptiveServerOptimizer


class FedYogi(AdaptiveServerOptimizer):
    name: ClassVar[str] = "yogi"

    def second_moment(self, v_prev: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        return v_prev - (1.0 - self.beta2) * delta_sq * torch.sign(v_prev - delta_sq)
