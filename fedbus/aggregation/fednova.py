"""FedNova: normalised averaging of heterogeneous local progress.

Wang, Liu, Liang, Joshi, Poor 2020, "Tackling the Objective Inconsistency Problem in
Heterogeneous Federated Optimization" (NeurIPS 2020), eqs. (6)-(7).

Client i runs tau_i local steps from x_t. For the local solvers the paper covers, its
progress is a linear combination of the stochastic gradients it computed,

    y_i - x_t = -eta * G_i a_i,      G_i = [g_i^(0), ..., g_i^(tau_i - 1)],

and FedNova averages the *normalised* gradients d_i = G_i a_i / ||a_i||_1 instead of the raw
progress, then takes tau_eff steps along their mean:

    d_i     = (x_t - y_i) / a_i                      (eta folded in: eta d_i of the paper)
    x_{t+1} = x_t - tau_eff * sum_i p_i d_i,   tau_eff = sum_i p_i a_i,   p_i = n_i / n

where a_i stands for ||a_i||_1 from here on. With a_i = tau_i for every client this is
FedAvg; when clients take different numbers of steps FedAvg silently optimises a
surrogate objective weighted by p_i tau_i, which FedNova removes.

a_i arrives in ``contribution.extras["fednova_a"]`` (the worker computes it with ``fednova_a``
below, because only it knows its optimizer); without it, a_i = ``contribution.num_steps``
(vanilla SGD). Weights p_i = w_i / sum w are the contributions' float weights. The
server step size of the paper is the server optimizer's business: with
``{name: sgd, lr: 1}`` the result is exactly x_{t+1} above.

Streaming and mergeable: float64 sums of w_i (y_i - x_t) / a_i per tensor, plus the
scalars sum w_i a_i and sum w_i; partial sums add up (see ``partial.py``).

Derivation of ||a_i||_1 (``fednova_a``)
---------------------------------------
Write z_k = y^(k) - x_t for the local iterate after k steps and g_k for the stochastic
gradient of the *local loss* at step k (excluding the proximal term), as PyTorch's SGD
sees it with ``momentum=rho``, ``dampening=0``, ``nesterov=False`` and the FedProx term
(mu/2)||y - x_t||^2 added to the loss:

    u_k     = rho u_{k-1} + g_k + mu z_k             (u_{-1} = 0: fresh optimizer each round)
    z_{k+1} = z_k - eta u_k                          (z_0 = 0)

This is a linear time-invariant system driven by g, so z_tau = -eta sum_j h_{tau-j} g_j with
h_s the response after s steps to a unit gradient at step 0: a = [h_tau, ..., h_1].

* Vanilla SGD (rho = 0, mu = 0): h_s = 1, ||a||_1 = tau.
* Momentum (mu = 0): u_k = sum_{j<=k} rho^{k-j} g_j, so g_j enters every later step with
  weight rho^{k-j} and h_s = sum_{k=0}^{s-1} rho^k = (1 - rho^s) / (1 - rho):

      ||a||_1 = sum_{s=1}^{tau} (1 - rho^s) / (1 - rho)
              = [tau - rho (1 - rho^tau) / (1 - rho)] / (1 - rho)          (paper, Sec. 4)

* Proximal (rho = 0, FedProx): z_{k+1} = (1 - eta mu) z_k - eta g_k, so with alpha = eta mu
  h_s = (1 - alpha)^{s-1} and ||a||_1 = [1 - (1 - alpha)^tau] / alpha      (paper, Sec. 4)
* Both: the paper gives no closed form; we run the recursion above on a unit impulse
  (O(tau) scalar steps) and sum |h_s|, which reduces to the two closed forms.

``num_steps`` counts optimizer steps over all local epochs. Weight decay is not covered (it
pulls toward 0, not toward x_t, so progress is no longer linear in the gradients alone).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from fedbus.aggregation.base import AggregationRule, Contribution, InvalidUpdate, State
from fedbus.aggregation.streaming import StreamingAccumulator


def fednova_a(num_steps: int, momentum: float = 0.0, proximal_mu: float = 0.0, lr: float | None = None) -> float:
    """||a_i||_1 for ``num_steps`` local SGD steps with heavy-ball ``momentum`` and FedProx ``proximal_mu``.

    ``lr`` (the local step size eta) is needed only when ``proximal_mu > 0``.
    """
    if num_steps < 1:
        raise ValueError(f"fednova_a needs at least one local step, got num_steps={num_steps}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if proximal_mu < 0:
        raise ValueError(f"proximal_mu must be >= 0, got {proximal_mu}")
    tau, rho = int(num_steps), float(momentum)
    if proximal_mu == 0.0:
        if rho == 0.0:
            return float(tau)
        return (tau - rho * (1.0 - rho ** tau) / (1.0 - rho)) / (1.0 - rho)
    if lr is None or lr <= 0:
        raise ValueError("fednova_a with proximal_mu > 0 needs the local learning rate lr > 0")
    alpha = lr * proximal_mu
    if rho == 0.0:
        if alpha >= 1.0:
            # (1 - alpha) <= 0: every proximal step overshoots x_t; still the same sum.
            return sum(abs(1.0 - alpha) ** s for s in range(tau))
        return (1.0 - (1.0 - alpha) ** tau) / alpha
    # Momentum and proximal term together: the impulse response of the recursion above,
    # with eta factored out (z/eta), so h_s = -z_s / eta.
    z, u, total = 0.0, 0.0, 0.0
    g = 1.0
    for _ in range(tau):
        u = rho * u + g + proximal_mu * lr * z  # mu * z_k, with z measured in units of eta
        z = z - u
        total += abs(z)
        g = 0.0
    if not math.isfinite(total):
        raise ValueError("fednova_a diverged: the local recursion is unstable for these lr, mu, momentum")
    return total


def _a_of(c: Contribution, max_a_per_step: float | None = None) -> float:
    raw = c.extras.get("fednova_a", c.num_steps)
    if isinstance(raw, bool):
        raw = repr(raw)  # True is not a step count
    try:
        a = float(raw)
    except (TypeError, ValueError):
        raise InvalidUpdate(f"update from {c.worker_id!r}: fednova_a must be a number, got {raw!r}") from None
    if not (a > 0 and math.isfinite(a)):
        raise InvalidUpdate(f"update from {c.worker_id!r}: FedNova needs a_i > 0 (extra['fednova_a'] or "
                            f"num_steps), got {raw!r}")
    # a_i is a claim: a huge one would scale tau_eff, and with it every honest update. For
    # heavy-ball momentum rho (FedProx's mu only shrinks it), ||a_i||_1 <= tau_i / (1 - rho).
    if max_a_per_step is not None and a > max(1, c.num_steps) * max_a_per_step * (1 + 1e-9):
        raise InvalidUpdate(f"update from {c.worker_id!r}: fednova_a {a:g} exceeds {max_a_per_step:g} per local "
                            f"step for {c.num_steps} steps")
    return a


class FedNovaAccumulator(StreamingAccumulator):
    """Streaming FedNova: S = sum_i w_i (y_i - x_t) / a_i in float64, and the scalar sum_i w_i a_i."""

    scalar_names: ClassVar[tuple[str, ...]] = ("weighted_a",)

    def __init__(self, global_state: State, base_version: int = 0, *, rule: str = "fednova",
                 max_a_per_step: float | None = None):
        super().__init__(global_state, base_version, rule=rule)
        self.max_a_per_step = max_a_per_step

    @property
    def tau_eff(self) -> float:
        """sum_i p_i a_i so far."""
        return self._scalars["weighted_a"] / self._total_weight if self._total_weight else 0.0

    def coefficient(self, c: Contribution, weight: float) -> float:
        return weight / _a_of(c, self.max_a_per_step)

    def scalars_of(self, c: Contribution, weight: float) -> dict[str, float]:
        return {"weighted_a": weight * _a_of(c, self.max_a_per_step)}

    def aggregate_delta(self, name: str, total: torch.Tensor) -> torch.Tensor:
        # x_t - tau_eff * sum p_i d_i  ==  x_t + tau_eff * sum p_i (y_i - x_t) / a_i
        tau_eff = self._scalars["weighted_a"] / self._total_weight
        return total * (tau_eff / self._total_weight)


class FedNova(AggregationRule):
    """FedNova (Wang et al. 2020); streaming, mergeable; precondition n >= 1 and a_i > 0 per update."""

    name: ClassVar[str] = "fednova"
    streaming: ClassVar[bool] = True
    mergeable: ClassVar[bool] = True
    needs_plaintext: ClassVar[bool] = False

    # Set from the job's local optimizer (1 / (1 - momentum)); None: a_i is only checked finite and positive.
    max_a_per_step: float | None = None

    def begin(self, global_state: State, base_version: int = 0) -> FedNovaAccumulator:
        return FedNovaAccumulator(global_state, base_version, rule=self.describe(),
                                  max_a_per_step=self.max_a_per_step)
