"""The job spec's ``privacy`` section (pydantic; ``schemas/job-spec.schema.json`` is generated from it).

    privacy:
      dp:
        mode: central              # or distributed
        noise_multiplier: 1.1      # z: the sum of clipped deltas carries N(0, z² C²)
        clip: {fixed: 1.0}         # or {adaptive: {initial: 0.1, target_quantile: 0.5, learning_rate: 0.2}}
        target_delta: 1.0e-5
        max_epsilon: 8.0
        accountant: rdp            # or pld (only without cohort sampling)
      secure_aggregation:          # fedbus.secagg.spec.SecureAggregationSpec
        threshold: 0.5
        clip: 1.0                  # unless dp (distributed) clips

What combinations mean is checked with the rest of the job (``JobSpec``); this module only
bounds each value.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedbus.secagg.spec import SecureAggregationSpec

_CONFIG = ConfigDict(extra="forbid", allow_inf_nan=False)


class AdaptiveClipSpec(BaseModel):
    """Andrew et al. 2021: C <- C · exp(−η (b~ − γ)), b~ the noised fraction of unclipped updates."""
    model_config = _CONFIG
    initial: float = Field(0.1, gt=0, le=1e6, description="C at round 1")
    target_quantile: float = Field(0.5, gt=0, lt=1, description="γ: the quantile of update norms C tracks")
    learning_rate: float = Field(0.2, gt=0, le=10, description="η_C of the geometric update")
    count_noise: float | None = Field(
        None, gt=0, le=1e6, description="σ_b: noise on the count of unclipped updates; unset: the paper's m/20 with "
                                        "m the cohort size (or min_workers). Must exceed noise_multiplier / 2")


class ClipSpec(BaseModel):
    """Exactly one of ``fixed`` and ``adaptive``."""
    model_config = _CONFIG
    fixed: float | None = Field(None, gt=0, le=1e6, description="C: every update's delta is clipped to this L2 norm")
    adaptive: AdaptiveClipSpec | None = Field(None, description="C follows a quantile of the update norms")

    @model_validator(mode="after")
    def _one(self) -> ClipSpec:
        if (self.fixed is None) == (self.adaptive is None):
            raise ValueError("clip needs exactly one of {fixed: C} and {adaptive: {...}}")
        return self


class DpSpec(BaseModel):
    """Client-level DP-FedAvg (McMahan et al. 2018) with a dp-accounting accountant."""
    model_config = _CONFIG
    mode: Literal["central", "distributed"] = Field(
        description="central: the coordinator (or a region's aggregator) clips and the coordinator adds N(0, z²C²) "
                    "to the sum; distributed: each worker clips and adds N(0, z²C²/q), q the job's least quorum, "
                    "so any quorum of shares sums to at least z·C (composes with secure aggregation)")
    noise_multiplier: float = Field(gt=0, le=1e4, description="z: noise standard deviation over the clip C")
    clip: ClipSpec
    target_delta: float = Field(gt=0, lt=1, description="δ at which ε is reported and bounded")
    max_epsilon: float = Field(gt=0, le=1e6, description="the job stops before a round that would take ε past this")
    accountant: Literal["rdp", "pld"] = Field(
        "rdp", description="dp-accounting's RDP (any cohort) or PLD (tighter; only when cohort.size is unset, "
                           "because dp-accounting's PLD has no sampling without replacement)")


class PrivacySpec(BaseModel):
    model_config = _CONFIG
    dp: DpSpec | None = Field(None, description="client-level differential privacy of the released models")
    secure_aggregation: SecureAggregationSpec | None = Field(
        None, description="SecAgg+ in every training round: the coordinator sees only the sum of the cohort's "
                          "clipped, quantized deltas (see fedbus/secagg/rounds.py)")
