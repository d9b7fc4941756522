"""The job spec: one YAML file drives coordinator, aggregators and workers alike."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedbus.aggregation.base import StrategyConfigError
from fedbus.aggregation.specs import FedAvgSpec, ServerOptimizerSpec, SgdSpec, StrategySpec, validate_strategy
from fedbus.tasks.base import TrainSettings

JOB_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


class CohortSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_workers: int = Field(1, ge=1, description="workers seen on heartbeats before round 1 opens")
    size: int | None = Field(None, ge=1, description="workers sampled per round; all live workers when unset")
    min_updates: int = Field(1, ge=1, description="quorum: updates needed to aggregate at the deadline")
    wait_for_workers_s: float = Field(120.0, gt=0, description="how long to wait for min_workers before giving up")

    @model_validator(mode="after")
    def _quorum_fits(self) -> CohortSpec:
        if self.size is not None and self.min_updates > self.size:
            raise ValueError(f"min_updates ({self.min_updates}) exceeds the cohort size ({self.size})")
        return self


class EvaluationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    server_test: bool = Field(True, description="the coordinator evaluates each new model on the task's server test set")
    federated: bool = Field(True, description="workers evaluate the global model on their held-out split")
    final_round: bool = Field(True, description="after the last round, workers evaluate the final model")


class SecuritySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_age_s: float = Field(120.0, gt=0, description="messages older than this are rejected as stale")
    max_future_s: float = Field(30.0, gt=0, description="allowed clock skew into the future")
    max_message_bytes: int = Field(64 * 1024 * 1024, gt=0, description="largest body accepted, inline or out-of-line")


class TransportSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prefix: str = Field("fedbus", pattern=r"^[A-Za-z0-9_-]{1,32}$")
    replicas: int = Field(1, ge=1, le=5)
    inline_max_bytes: int = Field(512 * 1024, gt=0, description="bodies larger than this go to the Object Store")
    heartbeat_s: float = Field(1.0, gt=0)


class JobSpec(BaseModel):
    """Everything a federation needs to agree on to run one job."""

    model_config = ConfigDict(extra="forbid")
    job: str = Field(pattern=JOB_ID_PATTERN)
    task: str = Field(description="'package.module:attr' naming the task object")
    task_params: dict[str, Any] = Field(default_factory=dict)
    seed: int = 0
    rounds: int = Field(ge=1)
    round_deadline_s: float = Field(30.0, gt=0)
    late_updates: Literal["drop"] = "drop"
    cohort: CohortSpec = Field(default_factory=CohortSpec)
    strategy: StrategySpec = Field(default_factory=lambda: FedAvgSpec(name="fedavg"),
                                   description="aggregation rule and its parameters, e.g. {name: trimmed_mean, beta: 0.1}")
    server_optimizer: ServerOptimizerSpec = Field(default_factory=lambda: SgdSpec(name="sgd"),
                                                  description="applied to the rule's aggregate, e.g. {name: adam, lr: 0.01}")
    train: TrainSettings = Field(default_factory=TrainSettings)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    security: SecuritySpec = Field(default_factory=SecuritySpec)
    transport: TransportSpec = Field(default_factory=TransportSpec)

    @model_validator(mode="after")
    def _strategy_fits_quorum(self) -> JobSpec:
        # Checked at job load, not mid-run: e.g. Krum with f=2 needs every aggregated round to have n > 2f+2.
        try:
            validate_strategy(self.strategy, self.cohort.min_updates)
        except StrategyConfigError as exc:
            raise ValueError(f"strategy {self.strategy.name}: {exc}") from None
        if self.cohort.size is None and self.cohort.min_updates > self.cohort.min_workers:
            raise ValueError(f"cohort.min_updates ({self.cohort.min_updates}) exceeds cohort.min_workers "
                             f"({self.cohort.min_workers}): round 1 could open with too few workers to ever close")
        return self

    @classmethod
    def load(cls, path: str | Path) -> JobSpec:
        with open(path, encoding="utf-8") as fh:
            return cls.model_validate(yaml.safe_load(fh))

    def dump(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
