"""The job spec: one YAML file drives coordinator, aggregators and workers alike.

Every number is finite (YAML's ``.inf`` and ``.nan`` are refused at load, not discovered
mid-run as a crash) and bounded where a huge value would hurt: timers the event loop
cannot schedule, replay windows that keep nonces forever, buffers of any size.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fedbus.aggregation.base import StrategyConfigError
from fedbus.atomicfile import atomic_write_text
from fedbus.aggregation.specs import FedAvgSpec, ServerOptimizerSpec, SgdSpec, StrategySpec, validate_strategy
from fedbus.compression.spec import CompressionSpec, NoCompression
from fedbus.privacy.spec import PrivacySpec
from fedbus.tasks.base import TrainSettings

JOB_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
DAY_S = 86_400.0
GIB = 1024**3
MAX_WORKERS = 1_000_000
# Rules whose server state (SCAFFOLD's c, FedNova's normalisation) presumes one base per aggregate.
ASYNC_UNSUPPORTED = frozenset({"scaffold", "fednova"})
MAX_SAMPLES_LIMIT = 2**53  # sample counts become float weights; above this they are no longer exact

# Shared by every spec model: unknown keys are errors, and so are inf and nan in any float.
SPEC_CONFIG = ConfigDict(extra="forbid", allow_inf_nan=False)


class CohortSpec(BaseModel):
    model_config = SPEC_CONFIG
    min_workers: int = Field(1, ge=1, le=MAX_WORKERS, description="workers seen on heartbeats before round 1 opens")
    size: int | None = Field(None, ge=1, le=MAX_WORKERS,
                             description="workers sampled per round; all live workers when unset")
    min_updates: int | float = Field(
        1, description="quorum: updates needed to aggregate at the deadline. An integer >= 1 is a count; a number "
                       "in (0, 1) is a fraction of the round's cohort, rounded up (0.7 of 10 workers: 7)")
    close_at_quorum: bool = Field(False, description="close a round as soon as min_updates updates arrived instead "
                                                     "of waiting for the whole cohort (over-selection: sample more "
                                                     "workers than needed); later ones are late_updates")
    wait_for_workers_s: float = Field(120.0, gt=0, le=DAY_S,
                                      description="how long to wait for min_workers before giving up (at most a day)")

    @field_validator("min_updates")
    @classmethod
    def _count_or_fraction(cls, value: int | float) -> int | float:
        if isinstance(value, bool):
            raise ValueError("min_updates must be a number")
        if isinstance(value, float):
            if 0 < value < 1:
                return value
            if not value.is_integer():
                raise ValueError(f"min_updates {value}: a fraction must lie in (0, 1), a count must be an integer")
            value = int(value)
        if not 1 <= value <= MAX_WORKERS:
            raise ValueError(f"min_updates {value}: a count must lie in [1, {MAX_WORKERS}]")
        return value

    def quorum(self, cohort_size: int) -> int:
        """Updates needed to aggregate a round whose cohort has ``cohort_size`` workers."""
        return quorum_of(self.min_updates, cohort_size)

    @property
    def least_quorum(self) -> int:
        """The smallest quorum any round can have: what rule preconditions are checked against."""
        return self.quorum(self.size if self.size is not None else self.min_workers)

    @model_validator(mode="after")
    def _quorum_fits(self) -> CohortSpec:
        if self.size is not None and isinstance(self.min_updates, int) and self.min_updates > self.size:
            raise ValueError(f"min_updates ({self.min_updates}) exceeds the cohort size ({self.size})")
        return self


def quorum_of(min_updates: int | float, cohort_size: int) -> int:
    """A count as it is; a fraction f of a cohort of n: ceil(f * n), at least 1."""
    if isinstance(min_updates, float):
        return max(1, math.ceil(min_updates * cohort_size - 1e-9))
    return int(min_updates)


class ConstantStaleness(BaseModel):
    """s(τ) = 1: every update counts fully, however stale."""
    model_config = SPEC_CONFIG
    name: Literal["constant"]


class PolynomialStaleness(BaseModel):
    """s(τ) = (1 + τ)^(−a) (Xie et al. 2019; FedBuff uses a = 0.5)."""
    model_config = SPEC_CONFIG
    name: Literal["polynomial"]
    a: float = Field(0.5, ge=0, le=100, description="exponent a of (1 + τ)^(−a)")


class HingeStaleness(BaseModel):
    """s(τ) = 1 for τ <= b, 1 / (a(τ − b) + 1) beyond (Xie et al. 2019)."""
    model_config = SPEC_CONFIG
    name: Literal["hinge"]
    a: float = Field(10.0, ge=0, le=1e6, description="slope a beyond the hinge")
    b: int = Field(4, ge=0, le=1_000_000, description="staleness b up to which updates count fully")


StalenessSpec = Annotated[ConstantStaleness | PolynomialStaleness | HingeStaleness, Field(discriminator="name")]


class AsyncSpec(BaseModel):
    """Asynchronous federation (``mode: async``): no rounds, a buffer of updates per model version."""
    model_config = SPEC_CONFIG
    algorithm: Literal["fedbuff", "fedasync"] = Field(
        "fedbuff", description="fedbuff: x <- x + server_lr * mean of staleness-weighted deltas of buffer_size "
                               "updates (Nguyen et al. 2022); fedasync: buffer_size 1, x <- (1 - a_t) x + a_t y with "
                               "a_t = alpha * s(staleness) (Xie et al. 2019)")
    buffer_size: int = Field(3, ge=1, le=100_000, description="verified updates folded into each new model version")
    concurrency: int | None = Field(None, ge=1, le=MAX_WORKERS,
                                    description="workers training at once; all live workers when unset")
    staleness: StalenessSpec = Field(default_factory=lambda: PolynomialStaleness(name="polynomial"),
                                     description="s(τ), τ = current version - the version an update was trained "
                                                 "from; also weighs late updates of sync rounds (late_updates: "
                                                 "next_round)")
    max_staleness: int = Field(10, ge=0, le=1_000,
                               description="updates staler than this are rejected as too_stale; the coordinator "
                                           "keeps this many past models to compute their deltas")
    server_lr: float = Field(1.0, gt=0, le=100.0, description="FedBuff's server learning rate η_g")
    region_buffer_size: int = Field(1, ge=1, le=100_000,
                                    description="topology: regional: a region's aggregator forwards its updates every "
                                                "this many (one partial per base version, so the coordinator weighs "
                                                "each by its staleness)")
    alpha: float = Field(0.6, gt=0, le=1.0, description="FedAsync's mixing weight α")

    @model_validator(mode="after")
    def _algorithm_fits(self) -> AsyncSpec:
        if self.algorithm == "fedasync":
            if self.buffer_size != 1:
                raise ValueError(f"fedasync mixes every update into the model at once: buffer_size must be 1, "
                                 f"not {self.buffer_size}")
            if self.server_lr != 1.0:
                raise ValueError("fedasync has no server learning rate: its step is alpha * s(staleness)")
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
    seal_updates: bool | Literal["auto"] = Field(
        "auto", description="encrypt each worker's update body to its recipient's X25519 encryption_key (the "
                            "coordinator, or the region's aggregator with topology: regional), so the broker and "
                            "other members cannot read it. auto (default): seal when the federation file lists the "
                            "recipient's encryption_key (every federation written by `fedbus keys federation` "
                            "does), otherwise send in the clear and log sealing.unavailable once; recipients accept "
                            "both. true: always, and recipients refuse plain updates (unsealed_body); every process "
                            "refuses to start when a recipient has no key. false: never seal")


class TransportSpec(BaseModel):
    model_config = SPEC_CONFIG
    prefix: str = Field("fedbus", pattern=r"^[A-Za-z0-9_-]{1,32}$")
    replicas: int = Field(1, ge=1, le=5)
    inline_max_bytes: int = Field(512 * 1024, gt=0, le=64 * 1024 * 1024,
                                  description="bodies larger than this go to the Object Store "
                                              "(at most 64 MiB, the largest NATS max_payload)")
    heartbeat_s: float = Field(1.0, gt=0, le=60.0, description="seconds between a worker's heartbeats (at most 60)")
    hub_domain: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,32}$",
                                   description="the hub's JetStream domain, when regions run their own leaf nodes "
                                               "(each region's domain is its name): participants on a leaf reach the "
                                               "job's hub streams through it, and each region's updates stay in a "
                                               "stream of its own domain")


class RetentionSpec(BaseModel):
    """What a long job keeps on the bus (fedbus.registry.retention): the newest model
    versions, every tagged one, and stream messages for at most a day by default."""

    model_config = SPEC_CONFIG
    keep_versions: int = Field(10, ge=1, le=100_000,
                               description="newest model versions kept in the registry (tagged ones are kept too); "
                                           "older model objects, their manifests and every claim-check blob of a "
                                           "committed round are deleted")
    stream_max_age_s: float = Field(DAY_S, ge=60.0, le=30 * DAY_S,
                                    description="max_age of the update, partial and metrics streams: how long a "
                                                "stopped coordinator can still find the updates it held")
    keep_updates: bool = Field(False, description="keep acknowledged updates in the update stream until "
                                                "stream_max_age_s (for audits that recompute a model from the "
                                                "updates); by default they are purged once their round commits")
    stream_max_bytes: int | None = Field(None, ge=1024 * 1024, le=64 * GIB,
                                         description="max_bytes of each of those streams (default: "
                                                     "fedbus/bus/layout.py's table)")


class JobSpec(BaseModel):
    """Everything a federation needs to agree on to run one job."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)
    job: str = Field(pattern=JOB_ID_PATTERN)
    task: str = Field(description="'package.module:attr' naming the task object")
    task_params: dict[str, Any] = Field(default_factory=dict,
                                        description="passed to the task as is; numbers in it must be finite")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="root of every seed the job derives")
    mode: Literal["sync", "async"] = Field("sync", description="sync: lock-step rounds; async: workers train "
                                                               "continuously and every buffer_size updates "
                                                               "make a new model version (see async)")
    rounds: int = Field(ge=1, le=1_000_000, description="model versions to commit, in both modes: a sync round "
                                                        "commits one version, an async buffer commits one")
    round_deadline_s: float = Field(30.0, gt=0, le=DAY_S,
                                    description="seconds a round stays open (at most a day); in async mode, how "
                                                "long a worker's assignment holds its slot")
    topology: Literal["flat", "regional"] = Field(
        "flat", description="flat: the coordinator consumes every worker's update; regional: each region's "
                            "`fedbus aggregator` folds its workers' updates into a signed partial aggregate and the "
                            "coordinator merges partials (agg.<region>) and never sees a raw update")
    region_strategy: StrategySpec | None = Field(
        None, description="topology: regional: the rule each region's aggregator applies to its own updates (e.g. "
                          "{name: median, f: 1}); a robust one forwards the region's result as one contribution "
                          "weighted by the region's samples, which the job's strategy (fedavg or fedprox) averages "
                          "across regions. Unset: the job's strategy, merged exactly")
    late_updates: Literal["drop", "next_round"] = Field(
        "drop", description="a sync round's update that arrives after the round closed: drop it (rejected as "
                            "wrong_round) or fold it into the next round, weighted by async.staleness")
    async_: AsyncSpec = Field(default_factory=AsyncSpec, alias="async",
                              description="settings of mode: async (and the staleness weight of late updates)")
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
    privacy: PrivacySpec = Field(default_factory=PrivacySpec,
                                 description="differential privacy of the released models (see fedbus/privacy/)")
    compression: CompressionSpec = Field(
        default_factory=NoCompression,
        description="how workers send updates: none (weights), fp16 / bf16 / int8 / topk (a compressed delta the "
                    "receiver adds to the round's model before folding); see fedbus/compression/")
    retention: RetentionSpec = Field(default_factory=RetentionSpec,
                                     description="model versions and stream messages kept (fedbus models)")

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
        # In async mode a version aggregates buffer_size updates; in sync mode at least the quorum.
        least = self.async_.buffer_size if self.mode == "async" else self.cohort.least_quorum
        try:
            validate_strategy(self.strategy, least)
        except StrategyConfigError as exc:
            raise ValueError(f"strategy {self.strategy.name}: {exc}") from None
        if self.topology == "regional":
            self._check_regional()
        elif self.region_strategy is not None:
            raise ValueError("region_strategy needs topology: regional")
        if self.late_updates == "next_round" and self.strategy.name in ASYNC_UNSUPPORTED:
            raise ValueError(f"strategy {self.strategy.name} cannot fold a late update trained from an older model: "
                             f"use late_updates: drop")
        if self.mode == "async" and self.strategy.name in ASYNC_UNSUPPORTED:
            raise ValueError(f"strategy {self.strategy.name} keeps per-round server state that assumes every update "
                             f"was trained from the current model; use it with mode: sync")
        if (self.cohort.size is None and isinstance(self.cohort.min_updates, int)
                and self.cohort.min_updates > self.cohort.min_workers):
            raise ValueError(f"cohort.min_updates ({self.cohort.min_updates}) exceeds cohort.min_workers "
                             f"({self.cohort.min_workers}): round 1 could open with too few workers to ever close")
        if self.privacy.dp is not None:
            self._check_dp()
        if self.privacy.secure_aggregation is not None:
            self._check_secure_aggregation()
        if not isinstance(self.compression, NoCompression):
            self._check_compression()
        if self.train.dp_sgd_noise_multiplier > 0 and (self.strategy.name in ("scaffold", "fedprox")
                                                       or self.train.proximal_mu > 0):
            raise ValueError("train.dp_sgd_noise_multiplier: DP-SGD clips per-example gradients of the task's loss "
                             "alone; FedProx's proximal term and SCAFFOLD's gradient correction are not privatised: "
                             "use fedavg or fednova")
        return self

    @property
    def dp_expected_cohort(self) -> int:
        """m of the paper's defaults (σ_b = m/20): the cohort size, or min_workers without sampling."""
        return self.cohort.size or self.cohort.min_workers

    def dp_count_noise(self) -> float | None:
        """σ_b of adaptive clipping (None with a fixed clip)."""
        dp = self.privacy.dp
        if dp is None or dp.clip.adaptive is None:
            return None
        return dp.clip.adaptive.count_noise or self.dp_expected_cohort / 20.0

    def _check_dp(self) -> None:
        """Combinations the accountant does not describe are refused here, with the reason."""
        dp = self.privacy.dp
        if self.mode != "sync":
            raise ValueError("privacy.dp needs mode: sync: the accountant models rounds whose cohort is sampled "
                             "uniformly; async versions are made of whichever workers train fastest")
        if self.strategy.name not in ("fedavg", "fedprox"):
            raise ValueError(f"privacy.dp aggregates by DP-FedAvg (clipped deltas, weight 1, noised sum); strategy "
                             f"{self.strategy.name} needs its own server math or every update in plaintext, and the "
                             f"guarantee is for a noised sum only: use fedavg or fedprox")
        if self.strategy.norm_bound is not None:
            raise ValueError("privacy.dp clips every update to its own C: drop strategy.norm_bound")
        if self.region_strategy is not None:
            raise ValueError("privacy.dp with a region_strategy: the guarantee is for a noised sum of every update")
        if self.late_updates != "drop":
            raise ValueError("privacy.dp needs late_updates: drop: a late update would be summed outside the "
                             "round's sampled cohort, which the accountant does not model")
        if self.deterministic:
            raise ValueError("privacy.dp cannot be deterministic: its noise comes from the OS CSPRNG, so no rerun "
                             "repeats it (and none should)")
        if dp.mode == "distributed" and isinstance(self.cohort.min_updates, float):
            raise ValueError("privacy.dp in distributed mode needs cohort.min_updates as a count: each worker's noise "
                             "share assumes at least that many updates in every round, and a fraction of a smaller "
                             "cohort would sum too few shares")
        if dp.accountant == "pld" and self.cohort.size is not None:
            raise ValueError("accountant: pld has no sampling without replacement in dp-accounting; with "
                             "cohort.size set use accountant: rdp")
        if dp.clip.adaptive is not None:
            if dp.mode != "central":
                raise ValueError("adaptive clipping needs mode: central: in distributed mode each worker would send "
                                 "its clipped bit and receive the moving clip, which is not built")
            if self.topology == "regional":
                raise ValueError("adaptive clipping needs topology: flat: regional aggregators clip with the job "
                                 "spec's C and do not follow the coordinator's committed clip")
            sigma_b = self.dp_count_noise()
            if not 2 * sigma_b > dp.noise_multiplier:
                raise ValueError(f"adaptive clipping: 2 * count_noise ({2 * sigma_b:g}) must exceed noise_multiplier "
                                 f"({dp.noise_multiplier:g}), or nothing is left for the sum's noise")

    @property
    def secagg_clip(self) -> float | None:
        """The L2 norm a secure-aggregation worker clips its delta to (None: no secure aggregation)."""
        sa, dp = self.privacy.secure_aggregation, self.privacy.dp
        if sa is None:
            return None
        return dp.clip.fixed if dp is not None and dp.mode == "distributed" else sa.clip

    def _check_secure_aggregation(self) -> None:
        """What secure aggregation in training rounds supports, with the reason for each refusal."""
        from fedbus.aggregation.secure import secure_aggregation_refusal
        from fedbus.aggregation.specs import build_rule
        from fedbus.protocol.secagg import MIN_ROSTER

        sa, dp = self.privacy.secure_aggregation, self.privacy.dp
        if self.mode != "sync":
            raise ValueError("privacy.secure_aggregation needs mode: sync: masks cancel only in a sum over one fixed "
                             "roster, and an async buffer is filled by whichever single updates arrive first "
                             "(a buffer of one would be unmasked alone)")
        if self.topology != "flat":
            raise ValueError("privacy.secure_aggregation runs at the coordinator (topology: flat); per-region "
                             "secure aggregation at the aggregators is not built yet")
        refusal = secure_aggregation_refusal(build_rule(self.strategy))
        if refusal is not None:
            raise ValueError(f"privacy.secure_aggregation: {refusal}")
        if self.strategy.name not in ("fedavg", "fedprox"):
            raise ValueError(f"privacy.secure_aggregation folds the unmasked sum as FedAvg with weight 1 per worker; "
                             f"strategy {self.strategy.name} needs per-update weights, steps or extras: use fedavg "
                             f"or fedprox")
        if dp is not None and dp.mode == "central":
            raise ValueError("privacy.secure_aggregation with privacy.dp mode: central: the coordinator would have to "
                             "clip each update, which it never sees; use mode: distributed")
        if (dp is None or dp.mode != "distributed") and sa.clip is None:
            raise ValueError("privacy.secure_aggregation needs a clip (the quantizer's bound): set "
                             "secure_aggregation.clip, or privacy.dp with mode: distributed")
        if self.late_updates != "drop":
            raise ValueError("privacy.secure_aggregation needs late_updates: drop: a masked input is worth nothing "
                             "outside its own round")
        smallest = min(self.cohort.size or self.cohort.min_workers, self.cohort.min_workers)
        if smallest < MIN_ROSTER or self.cohort.least_quorum < MIN_ROSTER:
            raise ValueError(f"privacy.secure_aggregation needs cohorts and quorums of at least {MIN_ROSTER} workers "
                             f"(cohort.min_workers, cohort.size, cohort.min_updates): with fewer, the sum and one's "
                             f"own input reveal another's")

    def _check_compression(self) -> None:
        """A compressed update is a delta: the receiver must hold the model it was trained from
        (async receivers keep the last max_staleness models; a sync one keeps only the round's)."""
        from fedbus.aggregation.specs import build_rule

        method = self.compression.method
        if self.privacy.secure_aggregation is not None:
            raise ValueError(f"compression {method} with privacy.secure_aggregation: secure aggregation quantizes the "
                             f"clipped delta itself (fixed point modulo 2^k), and a masked input is uniform noise "
                             f"that no codec can shrink; drop one of them")
        if self.late_updates != "drop":
            raise ValueError(f"compression {method} with late_updates: next_round: a late delta was trained from the "
                             f"previous round's model, which the receiver no longer holds to decode it; use drop")
        dp = self.privacy.dp
        if method == "topk" and dp is not None and dp.mode == "distributed":
            raise ValueError("compression topk with privacy.dp in distributed mode: each worker's noise share is too "
                             "small on its own, and the guarantee needs the full sum of the shares in every "
                             "coordinate; top-k drops ~all of a worker's coordinates, noise included. Use a dense "
                             "compression (int8, fp16, bf16: one rounding step, far below the noise) or mode: central")
        if method == "topk":
            robust = [s.name for s in (self.strategy, self.region_strategy)
                      if s is not None and not getattr(build_rule(s), "mergeable", False)]
            if robust:
                raise ValueError(f"compression topk with the robust rule {robust[0]}: each sparse delta is 0 in all "
                                 f"but a fraction of its coordinates, so coordinate-wise medians and trimmed means "
                                 f"are ~0 and distances measure the sparsity pattern, not the update; use int8 or "
                                 f"fp16/bf16 (dense) with robust rules, or a mergeable rule (fedavg, fedprox, ...)")

    def _check_regional(self) -> None:
        """What regional aggregation supports today, said at job load rather than mid-run."""
        from fedbus.aggregation.specs import build_rule

        if self.mode == "async" and (self.async_.algorithm != "fedbuff" or self.region_strategy is not None):
            raise ValueError("topology: regional in async mode runs FedBuff with the job's strategy in every region "
                             "(FedAsync mixes single updates; a region rule would hide their staleness)")
        if not getattr(build_rule(self.strategy), "mergeable", False):
            raise ValueError(f"topology: regional merges partial sums, and strategy {self.strategy.name} needs every "
                             f"update in plaintext (a robust rule): use topology: flat")
        if self.late_updates != "drop":
            raise ValueError("topology: regional supports late_updates: drop only")
        if self.region_strategy is not None and self.strategy.name not in ("fedavg", "fedprox"):
            raise ValueError(f"region_strategy forwards each region's result as one weighted contribution: the job's "
                             f"strategy must average them (fedavg or fedprox), not {self.strategy.name}")

    @classmethod
    def load(cls, path: str | Path) -> JobSpec:
        with open(path, encoding="utf-8") as fh:
            return cls.model_validate(yaml.safe_load(fh))

    def dump(self, path: str | Path) -> None:
        atomic_write_text(path, yaml.safe_dump(self.model_dump(mode="json", by_alias=True), sort_keys=False))


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
