"""Job-level settings (``privacy.secure_aggregation``) and the per-round parameters.

``SecureAggregationSpec`` is what a job spec says; ``RoundParams`` (the ``secagg.setup``
body) is what the server announces for one round, derived from the spec, the group's
roster and the clip bound, so that every party computes the same graph, threshold and
modulus.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedbus.protocol.secagg import MAX_DEGREE, SecAggSetup
from fedbus.secagg.graph import default_degree
from fedbus.secagg.quantize import Quantizer

RoundParams = SecAggSetup


def quantizer_of(params: RoundParams) -> Quantizer:
    """The round's quantizer; raises ValueError when the announced bits could let the sum wrap."""
    q = Quantizer(bound=params.bound, scale=params.scale, max_summands=len(params.roster))
    if q.bits != params.bits:
        raise ValueError(f"{params.bits} bits announced, bound·scale·n needs {q.bits}")
    return q


class SecureAggregationSpec(BaseModel):
    """``privacy.secure_aggregation`` in the job spec."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    threshold: float = Field(0.5, ge=0.5, le=1.0, description=(
        "fraction of a worker's k + 1 share holders (its neighbours and itself) needed to rebuild its "
        "secrets; t = max(floor((k+1)/2) + 1, ceil(threshold·(k+1))): always a strict majority, so the "
        "server can never collect both kinds of share for one worker from disjoint honest sets"))
    degree: int | None = Field(None, ge=2, le=MAX_DEGREE, description=(
        "neighbours per worker in the random k-regular graph (even); default min(n-1, 2·ceil(1.5·log2 n))"))
    scale: float = Field(65536.0, gt=0, le=2.0**40, allow_inf_nan=False,
                         description="fixed-point steps per unit; the dequantized sum is within n/(2·scale)")
    clip: float | None = Field(None, gt=0, le=1e6, allow_inf_nan=False, description=(
        "training rounds: the L2 norm each worker clips its update's delta to before quantization (the "
        "per-coordinate bound); required unless privacy.dp (mode: distributed) clips to its own C"))
    phase_timeout_s: float = Field(10.0, gt=0, le=3600, allow_inf_nan=False, description=(
        "training rounds: how long the key phases and the unmasking wait for stragglers; the masked inputs "
        "are awaited until the round's deadline"))

    @model_validator(mode="after")
    def _even_degree(self):
        if self.degree is not None and self.degree % 2:
            raise ValueError("degree must be even (the graph is a Harary ring on a random order)")
        return self

    def degree_for(self, n: int) -> int:
        k = default_degree(n) if self.degree is None else self.degree
        return min(k, n - 1)

    def threshold_for(self, degree: int) -> int:
        holders = degree + 1
        return min(holders, max(holders // 2 + 1, math.ceil(self.threshold * holders)))

    def round_params(self, *, job: str, round: int, roster: list[str], seed: bytes, length: int,
                     bound: float, group: str = "") -> RoundParams:
        k = self.degree_for(len(roster))
        q = Quantizer(bound=bound, scale=self.scale, max_summands=len(roster))
        return RoundParams(job=job, round=round, group=group, roster=sorted(roster), seed=seed, degree=k,
                           threshold=self.threshold_for(k), length=length, bits=q.bits, bound=bound, scale=self.scale)
