"""Job-level settings (``privacy.secure_aggregation``) and the per-round parameters.

``SecureAggregationSpec`` is what a job spec says; ``RoundParams`` is what the server
announces for one round, derived from the spec, the cohort and the clip bound, so that
every party computes the same graph, threshold and modulus.
"""

from __future__ import annotations

import math
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from fedbus.secagg.graph import default_degree
from fedbus.secagg.quantize import Quantizer

MAX_ROSTER = 10_000  # workers in one secure-aggregation group (a region or the cohort)
MAX_DEGREE = 256
MAX_LENGTH = 100_000_000  # coordinates in one masked vector (800 MB as uint64 at the server)
MIN_ROSTER = 3  # with fewer, the sum of the others reveals each input

WorkerId = Annotated[str, StringConstraints(min_length=1, max_length=128)]


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
                     bound: float) -> RoundParams:
        k = self.degree_for(len(roster))
        q = Quantizer(bound=bound, scale=self.scale, max_summands=len(roster))
        return RoundParams(job=job, round=round, roster=sorted(roster), seed=seed, degree=k,
                           threshold=self.threshold_for(k), length=length, bits=q.bits, bound=bound, scale=self.scale)


class RoundParams(BaseModel):
    """One round's secure-aggregation parameters, as the server announces them."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    job: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    round: int = Field(ge=0, le=2**53 - 1)
    roster: Annotated[list[WorkerId], Field(min_length=MIN_ROSTER, max_length=MAX_ROSTER)]
    seed: bytes = Field(min_length=32, max_length=32, description="public randomness for the graph")
    degree: int = Field(ge=2, le=MAX_DEGREE)
    threshold: int = Field(ge=2, le=MAX_DEGREE + 1)
    length: int = Field(ge=1, le=MAX_LENGTH)
    bits: int = Field(ge=8, le=62)
    bound: float = Field(gt=0, allow_inf_nan=False)
    scale: float = Field(gt=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _consistent(self):
        n = len(self.roster)
        if len(set(self.roster)) != n or self.roster != sorted(self.roster):
            raise ValueError("roster must be sorted and without duplicates")
        if self.degree > n - 1 or (self.degree < n - 1 and self.degree % 2):
            raise ValueError("degree must be even and at most n - 1 (or n - 1: complete graph)")
        if not (self.degree + 1) // 2 + 1 <= self.threshold <= self.degree + 1:
            raise ValueError("threshold must be a strict majority of the k + 1 holders")
        if self.quantizer.bits != self.bits:
            raise ValueError("bits do not match bound, scale and roster size")
        return self

    @property
    def quantizer(self) -> Quantizer:
        return Quantizer(bound=self.bound, scale=self.scale, max_summands=len(self.roster))

    def share_x(self, worker: str) -> int:
        """A holder's Shamir evaluation point: its 1-based position in the roster."""
        return self.roster.index(worker) + 1
