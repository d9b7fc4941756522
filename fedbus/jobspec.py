"""The job spec: one YAML file drives coordinator, aggregators and workers alike.

Every number is finite (YAML's ``.inf`` and ``.nan`` are refused at load, not discovered
mid-run as a crash) and bounded where a huge value would hurt: timers the event loop
cannot schedule, replay windows that keep nonces forever, buffers of any size.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fedbus.aggregation.base import StrategyConfigError
from fedbus.atomicfile import atomic_write_text
from fedbus.aggregation.specs import FedAvgSpec, ServerOptimizerSpec, SgdSpec, StrategySpec, validate_strategy
from fedbus.tasks.base import TrainSettings

JOB_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
DAY_S = 86_400.0
GIB = 1024**3
MAX_WORKERS = 1_000_000
MAX_SAMPLES_LIMIT = 2**53  # sample counts become float weights; above this they are no longer exact

# Shared by every spec model: unknown keys are errors, and so are inf and nan in any float.
SPEC_CONFIG = ConfigDict(extra="forbid", allow_inf_nan=False)


class CohortSpec(BaseModel):
    model_config = SPEC_CONFIG
    min_workers: int = Field(1, ge=1, le=MAX_WORKERS, description="workers seen on heartbeats before round 1 opens")
    size: int | None = Field(None, ge=1, le=MAX_WORKERS,
                             description="workers sampled per round; all live workers when unset")
    min_updates: int = Field(1, ge=1, le=MAX_WORKERS, description="quorum: updates needed to aggregate at the deadline")
    wait_for_workers_s: float = Field(120.0, gt=0, le=DAY_S,
                                      description="how long to wait for min_workers before giving up (at most a day)")

    @model_validator(mode="after")
    def _quorum_fits(self) -> CohortSpec:
        if self.size is not None and self.min_updates > self.size:
            raise ValueError(f"min_updates ({self.min_updates}) exceeds the cohort size ({self.size})")
        return self


class EvaluationSpec(BaseModel):
    model_config = SPEC_CONFIG
    server_test: bool = Field(True, description="the coordinator evaluates each new model on the task's server test set")
    federated: bool = Field(True, description="workers evaluate the global model on their held-out split")
    final_round: bool = Field(True, description="after the last round, workers evaluate the final model")


class RateLimitSpec(BaseModel):
    """Per-sender token buckets, keyed by the sender the subject names and applied before the
    signature check, so a storm costs one bucket lookup per message, not an Ed25519
    verification. Subject permissions (deploy/nats/) keep others off a sender's subjects, so
    a sender can spend only its own budget."""
    model_config = SPEC_CONFIG
    heartbeats_per_s: float = Field(5.0, gt=0, le=10_000,
                                    description="heartbeats per second one sender may send, sustained; "
                                                "beyond it heartbeats are dropped as rate_limited")
    heartbeat_burst: int = Field(20, ge=1, le=100_000,
                                 description="heartbeats one sender may send at once before heartbeats_per_s applies")
    # An honest worker sends one update per round (plus a resend after a coordinator
    # resume); rounds of a small model close in well under 0.1 s, hence 20/s.
    updates_per_s: float = Field(20.0, gt=0, le=10_000,
                                 description="updates per second one sender may send, sustained; "
                                             "beyond it updates are rejected as rate_limited")
    update_burst: int = Field(40, ge=1, le=100_000,
                              description="updates one sender may send at once before updates_per_s applies")


class SecuritySpec(BaseModel):
    model_config = SPEC_CONFIG
    max_age_s: float = Field(120.0, gt=0, le=DAY_S,
                             description="messages older than this are rejected as stale (at most a day: the replay "
                                         "guard remembers nonces for this long)")
    max_future_s: float = Field(30.0, gt=0, le=3600.0, description="allowed clock skew into the future (at most an hour)")
    max_message_bytes: int = Field(64 * 1024 * 1024, gt=0, le=GIB,
                                   description="largest body accepted, inline or out-of-line (at most 1 GiB)")
    max_samples_per_update: int | None = Field(
        None, ge=1, le=MAX_SAMPLES_LIMIT,
        description="job-wide cap on the num_samples (aggregation weight) one update may claim; more is rejected "
                    "as excessive_samples. Claims are also capped by what the worker declared on its last heartbeat "
                    "and by its max_samples in the federation file. Unset: no job-wide cap")
    rate: RateLimitSpec = Field(default_factory=RateLimitSpec,
                                description="per-sender rate limits (token buckets) for heartbeats and updates")
    audit_interval_s: float = Field(5.0, gt=0, le=3600.0,
                                    description="rejections are audited in aggregate: at most one audit record per "
                                                "sender and reason per interval, carrying the count")


class TransportSpec(BaseModel):
    model_config = SPEC_CONFIG
    prefix: str = Field("fedbus", pattern=r"^[A-Za-z0-9_-]{1,32}$")
    replicas: int = Field(1, ge=1, le=5)
    inline_max_bytes: int = Field(512 * 1024, gt=0, le=64 * 1024 * 1024,
                                  description="bodies larger than this go to the Object Store "
                                              "(at most 64 MiB, the largest NATS max_payload)")
    heartbeat_s: float = Field(1.0, gt=0, le=60.0, description="seconds between a worker's heartbeats (at most 60)")


class JobSpec(BaseModel):
    """Everything a federation needs to agree on to run one job."""

    model_config = SPEC_CONFIG
    job: str = Field(pattern=JOB_ID_PATTERN)
    task: str = Field(description="'package.module:attr' naming the task object")
    task_params: dict[str, Any] = Field(default_factory=dict,
                                        description="passed to the task as is; numbers in it must be finite")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="root of every seed the job derives")
    rounds: int = Field(ge=1, le=1_000_000)
    round_deadline_s: float = Field(30.0, gt=0, le=DAY_S, description="seconds a round stays open (at most a day)")
    late_updates: Literal["drop"] = "drop"
    deterministic: bool = Field(False, description="fold each round's updates in worker-id order (not arrival order) "
                                                   "and derive worker seeds without the run id, so a rerun or a "
                                                   "resumed job ends bit-identical; costs O(cohort x model) memory")
    cohort: CohortSpec = Field(default_factory=CohortSpec)
    strategy: StrategySpec = Field(default_factory=lambda: FedAvgSpec(name="fedavg"),
                                   description="aggregation rule and its parameters, e.g. {name: trimmed_mean, beta: 0.1}")
    server_optimizer: ServerOptimizerSpec = Field(default_factory=lambda: SgdSpec(name="sgd"),
                                                  description="applied to the rule's aggregate, e.g. {name: adam, lr: 0.01}")
    train: TrainSettings = Field(default_factory=TrainSettings)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    security: SecuritySpec = Field(default_factory=SecuritySpec)
    transport: TransportSpec = Field(default_factory=TransportSpec)

    @field_validator("task_params")
    @classmethod
    def _task_params_finite(cls, value: dict[str, Any]) -> dict[str, Any]:
        # The job spec travels as JSON (summary, schemas, round configs): inf and nan have no JSON form.
        where = _non_finite(value, ())
        if where is not None:
            raise ValueError(f"task_params.{'.'.join(map(str, where))} must be a finite number")
        return value

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
        atomic_write_text(path, yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False))


def _non_finite(value: Any, path: tuple) -> tuple | None:
    """The path to the first inf/nan float inside nested dicts and lists, or None.

    Iterative, so a deeply nested task_params is a validation question, not a RecursionError.
    """
    stack: list[tuple[tuple, Any]] = [(path, value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, float):
            if not math.isfinite(item):
                return where
        elif isinstance(item, dict):
            stack.extend(((*where, k), v) for k, v in reversed(list(item.items())))
        elif isinstance(item, (list, tuple)):
            stack.extend(((*where, i), v) for i, v in reversed(list(enumerate(item))))
    return None
