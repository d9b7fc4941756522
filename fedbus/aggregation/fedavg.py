"""FedAvg: the weighted mean of client models.

McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data", Algorithm 1:

    w_{t+1} = sum_k (n_k / n) * w_{t+1}^k,    n = sum_k n_k

computed on deltas Δ_k = w_{t+1}^k − w_t, which is the same mean:

    w_{t+1} = w_t + sum_k w_k Δ_k / sum_k w_k

The weights w_k are floats (sample counts, or staleness-discounted sample counts in
asynchronous mode), finite and > 0. The sums are float64, so weights up to 2**53 (and
beyond: a float64 product w·Δ overflows only past ~1e308) keep the math finite; the
result is a convex combination of the deltas, so it never leaves their range.

Only floating-point tensors are averaged. Integer buffers (BatchNorm's
``num_batches_tracked``, step counters) advance by the rounded weighted mean of the
clients' increments; bool buffers keep the global value (``base.IntegerBufferCarry``).

Streaming and mergeable: one float64 sum per float tensor, whatever the cohort size;
partial sums from regional aggregators add up (see ``partial.py``).
"""

from __future__ import annotations

from typing import ClassVar

from fedbus.aggregation.base import AggregationRule, InvalidUpdate, State
from fedbus.aggregation.streaming import StreamingAccumulator


class WeightedMeanAccumulator(StreamingAccumulator):
    """Streaming FedAvg: S = sum_k w_k Δ_k in float64; finalize gives w_t + S / sum_k w_k."""

    def __init__(self, global_state: State, base_version: int = 0, *, rule: str = "fedavg"):
        super().__init__(global_state, base_version, rule=rule)


class FedAvg(AggregationRule):
    """FedAvg as a rule: streaming, mergeable, weighted by the contributions' weights; precondition n >= 1."""

    name: ClassVar[str] = "fedavg"
    streaming: ClassVar[bool] = True
    mergeable: ClassVar[bool] = True
    needs_plaintext: ClassVar[bool] = False

    def begin(self, global_state: State, base_version: int = 0) -> WeightedMeanAccumulator:
        return WeightedMeanAccumulator(global_state, base_version, rule=self.describe())


__all__ = ["FedAvg", "InvalidUpdate", "WeightedMeanAccumulator"]
