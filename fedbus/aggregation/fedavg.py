"""FedAvg: the sample-weighted mean of client models.

McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data", Algorithm 1:

    w_{t+1} = sum_k (n_k / n) * w_{t+1}^k,    n = sum_k n_k

Only floating-point tensors are averaged. Integer buffers (BatchNorm's
``num_batches_tracked``, step counters) are counters, not parameters: averaging them
in float and casting back yields garbage. They advance by the rounded sample-weighted
mean of the clients' increments over the global value, which for a step counter is the
typical number of steps a client took. Bool buffers keep the global value.
"""

from __future__ import annotations

import torch

from fedbus.aggregation.base import ClientUpdate, State, is_averageable


class WeightedMeanAccumulator:
    """Streaming FedAvg: memory is one float64 accumulator per tensor, whatever the cohort."""

    def __init__(self, global_state: State):
        self._global = {k: v.detach().clone() for k, v in global_state.items()}
        self._sums = {k: torch.zeros(v.shape, dtype=torch.complex128 if v.is_complex() else torch.float64)
                      for k, v in global_state.items() if v.dtype != torch.bool}
        self._total_weight = 0.0
        self._count = 0

    @property
    def count(self) -> int:
        return self._count

    @property
    def total_weight(self) -> float:
        return self._total_weight

    def add(self, update: ClientUpdate) -> None:
        if update.num_samples <= 0:
            raise ValueError("an update needs a positive sample count")
        w = float(update.num_samples)
        for name, acc in self._sums.items():
            value = update.state[name]
            if is_averageable(value):
                acc.add_(value.to(acc.dtype), alpha=w)
            else:
                acc.add_((value.to(torch.int64) - self._global[name].to(torch.int64)).to(acc.dtype), alpha=w)
        self._total_weight += w
        self._count += 1

    def result(self) -> State:
        if self._count == 0:
            raise ValueError("no updates to aggregate")
        out: State = {}
        for name, base in self._global.items():
            if base.dtype == torch.bool:
                out[name] = base.clone()
                continue
            mean = self._sums[name] / self._total_weight
            if is_averageable(base):
                out[name] = mean.to(base.dtype)
            else:
                out[name] = (base.to(torch.int64) + torch.round(mean).to(torch.int64)).to(base.dtype)
        return out
