"""FedAvg: the sample-weighted mean of client models.

McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data", Algorithm 1:

    w_{t+1} = sum_k (n_k / n) * w_{t+1}^k,    n = sum_k n_k

Only floating-point tensors are averaged. Integer buffers (BatchNorm's
``num_batches_tracked``, step counters) are counters, not parameters: averaging them
in float and casting back yields garbage. They advance by the rounded sample-weighted
mean of the clients' increments over the global value, which for a step counter is the
typical number of steps a client took. Bool buffers keep the global value.
(``base.IntegerBufferCarry`` does this for every rule.)

Streaming: one float64 accumulator per float tensor, whatever the cohort size.
"""

from __future__ import annotations

from typing import ClassVar

from fedbus.aggregation.base import (
    AggregationRule,
    ClientUpdate,
    InvalidUpdate,
    State,
    StreamingAccumulatorBase,
    validate_update,
)


class WeightedMeanAccumulator(StreamingAccumulatorBase):
    """Streaming FedAvg: memory is one float64 accumulator per tensor, whatever the cohort."""

    def add(self, update: ClientUpdate) -> None:
        validate_update(self._global, update)
        w = float(update.num_samples)
        for name, acc in self._sums.items():
            acc.add_(update.state[name].to(acc.dtype), alpha=w)
        self._carry.add(update)
        self._total_weight += w
        self._count += 1

    def result(self) -> State:
        if self._count == 0:
            raise ValueError("no updates to aggregate")
        out = self._carry.result()
        for name, acc in self._sums.items():
            out[name] = (acc / self._total_weight).to(self._global[name].dtype)
        return {k: out[k] for k in self._global}  # the global state's key order


class FedAvg(AggregationRule):
    """FedAvg as a rule: streaming, weighted by num_samples; precondition n >= 1."""

    name: ClassVar[str] = "fedavg"
    streaming: ClassVar[bool] = True

    def begin(self, global_state: State) -> WeightedMeanAccumulator:
        return WeightedMeanAccumulator(global_state)


__all__ = ["FedAvg", "InvalidUpdate", "WeightedMeanAccumulator"]
