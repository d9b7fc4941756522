"""FedAdagrad: server Adagrad on the pseudo-gradient.

Reddi et al. 2021, "Adaptive Federated Optimization" (ICLR 2021), Algorithm 2, FedAdagrad:

    m_t     = beta1 · m_{t−1} + (1 − beta1) · Δ_t
    v_t     = v_{t−1} + Δ_t²                                   v_{−1} = tau²
    x_{t+1} = x_t + eta · m_t / (sqrt(v_t) + tau)

No beta2: v accumulates. With ``bias_correction`` only m is corrected (see fedopt.py).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from fedbus.aggregation.fedopt import AdaptiveServerOptimizer


class FedAdagrad(AdaptiveServerOptimizer):
    name: ClassVar[str] = "adagrad"
    corrects_v: ClassVar[bool] = False

    def __init__(self, lr: float = 0.01, beta1: float = 0.9, tau: float = 1e-3, bias_correction: bool = False):
        super().__init__(lr=lr, beta1=beta1, beta2=0.0, tau=tau, bias_correction=bias_correction)

    def second_moment(self, v_prev: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        return v_prev + delta_sq
