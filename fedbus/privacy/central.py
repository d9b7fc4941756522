"""DP-FedAvg on the server: the rule that sums clipped deltas with weight 1 and adds the noise.

McMahan, Ramage, Talwar, Zhang 2018, "Learning Differentially Private Recurrent Language
Models", DP-FedAvg with uniform weights:

    x_{t+1} = x_t + ( sum_{i=1..m} clip(Δ_i, C) + N(0, z_Δ² C² I) ) / m

* ``mode: central``: each contribution is clipped here (``norm_bound.clip_contribution``; on a
  regional aggregator too, which forwards the clipped sums), and the coordinator adds the
  noise once, to the sum, in ``finalize``. z_Δ = z, or less with adaptive clipping, whose
  noised count takes its share (``adaptive.py``).
* ``mode: distributed``: workers clipped and noised their own deltas (``transforms/dp_noise.py``);
  the server only takes the uniform mean. It does not clip again: a noised delta's norm is
  no longer bounded by C, and cutting it would remove noise the guarantee counts on.

Weights are 1, not sample counts: a sample-weighted mean lets one large claim scale one
worker's delta and noise share, and the sensitivity of the sum would no longer be C. m is
the number of updates summed; under the replace-one relation it is the same for neighbouring
federations, so dividing by it is post-processing. Streaming and mergeable like FedAvg:
partials carry the clipped sums and the count of unclipped updates.
"""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar

import torch

from fedbus.aggregation.base import AggregationRule, Contribution, State, StateDict, validate_contribution
from fedbus.aggregation.norm_bound import clip_contribution
from fedbus.aggregation.streaming import StreamingAccumulator
from fedbus.privacy.adaptive import next_clip, noised_fraction, update_noise_multiplier
from fedbus.privacy.noise import central_std, gaussian_like, secure_generator

UNCLIPPED = "dp_unclipped"  # partial scalar: how many summed deltas were within the clip


class DpSumAccumulator(StreamingAccumulator):
    """S = sum_i clip(Δ_i, C) (weight 1 each); finalize gives x + (S + N(0, std²)) / m."""

    scalar_names: ClassVar[tuple[str, ...]] = (UNCLIPPED,)

    def __init__(self, global_state: State, base_version: int = 0, *, rule: str, clip: float | None,
                 noise_std: float, generator: torch.Generator | None = None):
        super().__init__(global_state, base_version, rule=rule)
        self.clip = clip
        self.noise_std = float(noise_std)
        self._generator = generator
        self._within = 0.0  # b_i of the contribution being folded
        self._noise: State = {}

    def fold(self, c: Contribution) -> None:
        if self.clip is not None:
            validate_contribution(self._global, self.base_version, c)  # malformed: InvalidUpdate before clipping
            c, norm = clip_contribution(c, self._keys, self.clip)
            self._within = 1.0 if norm <= self.clip else 0.0
        else:
            self._within = 0.0  # distributed: the server cannot tell (the deltas carry noise)
        super().fold(replace(c, weight=1.0))

    def scalars_of(self, c: Contribution, weight: float) -> dict[str, float]:
        return {UNCLIPPED: self._within}

    @property
    def unclipped(self) -> float:
        return self._scalars[UNCLIPPED]

    def aggregate_delta(self, name: str, total: torch.Tensor) -> torch.Tensor:
        noise = self._noise.get(name)
        return (total if noise is None else total + noise) / self._total_weight

    def finalize(self) -> State:
        if self.noise_std > 0 and self._count:
            g = self._generator if self._generator is not None else secure_generator()
            self._noise = gaussian_like({k: self._sums[k] for k in self._keys}, self.noise_std, g)
        try:
            return super().finalize()
        finally:
            self._noise = {}


class DpFedAvg(AggregationRule):
    """The job's rule when ``privacy.dp`` is set (see the module docstring)."""

    name: ClassVar[str] = "dp_fedavg"
    streaming: ClassVar[bool] = True
    mergeable: ClassVar[bool] = True
    needs_plaintext: ClassVar[bool] = False

    def __init__(self, mode: str, noise_multiplier: float, clip: float, *, adaptive=None,
                 count_noise: float | None = None, generator: torch.Generator | None = None):
        if mode not in ("central", "distributed"):
            raise ValueError(f"dp mode must be central or distributed, got {mode!r}")
        if adaptive is not None and (mode != "central" or count_noise is None):
            raise ValueError("adaptive clipping runs in central mode, with a count_noise")
        self.mode = mode
        self.noise_multiplier = float(noise_multiplier)
        self.clip = float(clip)
        self.adaptive = adaptive  # AdaptiveClipSpec or None
        self.count_noise = count_noise
        self.generator = generator
        # What the sum's noise uses: all of z, or what the count left of it.
        self.sum_multiplier = (update_noise_multiplier(noise_multiplier, count_noise) if adaptive is not None
                               else self.noise_multiplier)

    def begin(self, global_state: State, base_version: int = 0) -> DpSumAccumulator:
        central = self.mode == "central"
        return DpSumAccumulator(global_state, base_version, rule=self.describe(),
                                clip=self.clip if central else None,
                                noise_std=central_std(self.sum_multiplier, self.clip) if central else 0.0,
                                generator=self.generator)

    def commit(self, aggregator, num_workers_total: int) -> None:
        if self.adaptive is None or not isinstance(aggregator, DpSumAccumulator) or aggregator.count == 0:
            return
        g = self.generator if self.generator is not None else secure_generator()
        fraction = noised_fraction(aggregator.unclipped, aggregator.count, self.count_noise, g)
        self.clip = next_clip(self.clip, fraction, self.adaptive.target_quantile, self.adaptive.learning_rate)

    def state_dict(self) -> StateDict:
        return {"clip": self.clip} if self.adaptive is not None else {}

    def load_state_dict(self, state: StateDict) -> None:
        if self.adaptive is not None and "clip" in state:
            self.clip = float(state["clip"])
        else:
            super().load_state_dict({k: v for k, v in state.items() if self.adaptive is None or k != "clip"})

    def describe(self) -> str:
        # Stable across rounds (an adaptive clip moves): partials of one job must merge.
        clip = "adaptive" if self.adaptive is not None else f"{self.clip:g}"
        return f"dp_fedavg({self.mode},z={self.noise_multiplier:g},C={clip})"
