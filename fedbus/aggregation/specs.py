"""Job-spec models for strategies and server optimizers, and the factories behind them.

``StrategySpec`` and ``ServerOptimizerSpec`` are discriminated unions on ``name``; each
member validates its own parameters (extra keys are errors). What needs the cohort size
— Krum's n > 2f + 2 and friends — cannot be checked by the model alone: call
``validate_strategy(spec, min_updates)`` at job load.

    strategy: {name: trimmed_mean, beta: 0.1, norm_bound: {max_norm: 5.0}}
    strategy: {name: median, bucketing: {s: 2, seed: 0}}
    strategy: {name: krum, f: 2, nnm: {f: 2}}
    server_optimizer: {name: adam, lr: 0.01, beta1: 0.9, beta2: 0.99, tau: 0.001}
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from fedbus.aggregation.base import AggregationRule, ServerOptimizer, StrategyConfigError
from fedbus.aggregation.bucketing import wrap_bucketing
from fedbus.aggregation.bulyan import Bulyan
from fedbus.aggregation.fedadagrad import FedAdagrad
from fedbus.aggregation.fedadam import FedAdam
from fedbus.aggregation.fedavg import FedAvg
from fedbus.aggregation.fedavgm import ServerMomentum
from fedbus.aggregation.fedprox import FedProx
from fedbus.aggregation.fednova import FedNova
from fedbus.aggregation.fedyogi import FedYogi
from fedbus.aggregation.geometric_median import GeometricMedian
from fedbus.aggregation.krum import Krum, MultiKrum
from fedbus.aggregation.median import CoordinateMedian
from fedbus.aggregation.nnm import wrap_nnm
from fedbus.aggregation.norm_bound import wrap_norm_bound
from fedbus.aggregation.scaffold import Scaffold
from fedbus.aggregation.server_sgd import ServerSGD
from fedbus.aggregation.trimmed_mean import TrimmedMean


# Unknown keys are errors, and so are inf and nan in any float parameter (they would pass
# the bounds below and crash, or silently poison, the rule at the first aggregation).
_SPEC_CONFIG = ConfigDict(extra="forbid", allow_inf_nan=False)


# ---- strategies ------------------------------------------------------------------------

class NormBoundSpec(BaseModel):
    model_config = _SPEC_CONFIG
    max_norm: float = Field(gt=0, allow_inf_nan=False,
                            description="each update's delta (all float tensors, one L2 norm) is clipped to this")


class BucketingSpec(BaseModel):
    """Bucketing (Karimireddy, He, Jaggi 2022): the rule aggregates the sample-weighted means of
    ceil(n/s) random buckets of s updates. Only for robust (buffered) rules; the rule's f or beta
    then counts contaminated buckets, and its precondition must hold for ceil(min_updates/s) inputs."""
    model_config = _SPEC_CONFIG
    s: int = Field(ge=2, description="updates per bucket (the last bucket may be smaller)")
    seed: int = Field(0, ge=0, description="with a per-round counter, fixes each round's permutation")


class NnmSpec(BaseModel):
    """Nearest-neighbour mixing (Allouah et al. 2023): each update is replaced by the plain mean of
    its n - f nearest updates (itself included) before a robust rule sees them; needs n > 2f. Only
    for robust (buffered) rules; the rule keeps its own f and precondition over the same n inputs."""
    model_config = _SPEC_CONFIG
    f: int = Field(ge=0, description="Byzantine updates expected: each neighbourhood holds n - f updates")


class _Strategy(BaseModel):
    model_config = _SPEC_CONFIG
    norm_bound: NormBoundSpec | None = Field(None, description="clip every update before the rule sees it")
    bucketing: BucketingSpec | None = Field(
        None, description="average random buckets of s updates before a robust rule sees them (after norm_bound); "
                          "rejected for the streaming rules fedavg, fedprox, fednova and scaffold")
    nnm: NnmSpec | None = Field(
        None, description="replace each update by the mean of its n - f nearest before a robust rule sees them "
                          "(after norm_bound); rejected for streaming rules and together with bucketing")


class FedAvgSpec(_Strategy):
    """FedAvg (McMahan et al. 2017): sample-weighted mean; streaming."""
    name: Literal["fedavg"] = "fedavg"


class FedProxSpec(_Strategy):
    """FedProx (Li et al. 2020): workers add (mu/2)·||w − w_t||² to their loss; the server
    aggregates as FedAvg; streaming."""
    name: Literal["fedprox"]
    mu: float = Field(0.01, ge=0, allow_inf_nan=False, description="proximal coefficient sent to workers")


class FedNovaSpec(_Strategy):
    """FedNova (Wang et al. 2020): normalised averaging by each client's ||a_i||_1; streaming."""
    name: Literal["fednova"]


class ScaffoldSpec(_Strategy):
    """SCAFFOLD option II (Karimireddy et al. 2020); streaming."""
    name: Literal["scaffold"]
    eta_g: float = Field(1.0, gt=0, allow_inf_nan=False, description="server step size")


class KrumSpec(_Strategy):
    """Krum (Blanchard et al. 2017); buffered; needs n > 2f + 2."""
    name: Literal["krum"]
    f: int = Field(ge=0, description="Byzantine updates tolerated")


class MultiKrumSpec(_Strategy):
    """Multi-Krum (Blanchard et al. 2017); buffered; needs n > 2f + 2 and m <= n - f."""
    name: Literal["multi_krum"]
    f: int = Field(ge=0, description="Byzantine updates tolerated")
    m: int = Field(ge=1, description="lowest-scoring updates averaged")


class MedianSpec(_Strategy):
    """Coordinate-wise median (Yin et al. 2018); buffered."""
    name: Literal["median"]
    f: int = Field(0, ge=0, description="Byzantine updates the job expects; checked as n >= 2f + 1")


class TrimmedMeanSpec(_Strategy):
    """Coordinate-wise trimmed mean (Yin et al. 2018); buffered; needs 2·floor(beta·n) < n."""
    name: Literal["trimmed_mean"]
    beta: float = Field(ge=0, lt=0.5, description="fraction removed from each end of every coordinate")


class GeometricMedianSpec(_Strategy):
    """Geometric median by smoothed Weiszfeld (RFA, Pillutla et al. 2022); buffered."""
    name: Literal["geometric_median"]
    eps: float = Field(1e-6, gt=0, allow_inf_nan=False, description="smoothing nu")
    max_iter: int = Field(100, ge=1)
    tol: float = Field(1e-5, ge=0, allow_inf_nan=False, description="stop at relative objective change <= tol")
    weighted: bool = Field(True, description="alpha_i = n_i / n (paper); false: every update counts once")
    f: int = Field(0, ge=0, description="Byzantine updates the job expects; checked as n >= 2f + 1")


class BulyanSpec(_Strategy):
    """Bulyan over Krum (El Mhamdi et al. 2018); buffered; needs n >= 4f + 3."""
    name: Literal["bulyan"]
    f: int = Field(ge=0, description="Byzantine updates tolerated")


StrategySpec = Annotated[
    Union[FedAvgSpec, FedProxSpec, FedNovaSpec, ScaffoldSpec, KrumSpec, MultiKrumSpec, MedianSpec, TrimmedMeanSpec,
          GeometricMedianSpec, BulyanSpec],
    Field(discriminator="name"),
]

STRATEGY_NAMES = ("fedavg", "fedprox", "fednova", "scaffold", "krum", "multi_krum", "median", "trimmed_mean",
                  "geometric_median", "bulyan")


# ---- server optimizers -------------------------------------------------------------------

class _Optimizer(BaseModel):
    model_config = _SPEC_CONFIG


class SgdSpec(_Optimizer):
    """x <- x + lr · Δ; lr = 1 is the rule's proposal as is."""
    name: Literal["sgd"] = "sgd"
    lr: float = Field(1.0, gt=0, allow_inf_nan=False)


class MomentumSpec(_Optimizer):
    """FedAvgM (Hsu et al. 2019): v <- beta·v + Δ, x <- x + lr·v."""
    name: Literal["momentum"]
    lr: float = Field(1.0, gt=0, allow_inf_nan=False)
    beta: float = Field(0.9, ge=0, lt=1)


class _Adaptive(_Optimizer):
    lr: float = Field(0.01, gt=0, allow_inf_nan=False, description="server step size eta")
    beta1: float = Field(0.9, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0, allow_inf_nan=False, description="adaptivity; v starts at tau^2")
    bias_correction: bool = Field(False, description="not in Reddi et al.; divides m, v by 1 - beta^t, t from 1")


class AdagradSpec(_Adaptive):
    """FedAdagrad (Reddi et al. 2021, Algorithm 2). v accumulates: no beta2."""
    name: Literal["adagrad"]


class AdamSpec(_Adaptive):
    """FedAdam (Reddi et al. 2021, Algorithm 2)."""
    name: Literal["adam"]
    beta2: float = Field(0.99, ge=0, lt=1)


class YogiSpec(_Adaptive):
    """FedYogi (Reddi et al. 2021, Algorithm 2)."""
    name: Literal["yogi"]
    beta2: float = Field(0.99, ge=0, lt=1)


ServerOptimizerSpec = Annotated[
    Union[SgdSpec, MomentumSpec, AdagradSpec, AdamSpec, YogiSpec],
    Field(discriminator="name"),
]

_STRATEGY = TypeAdapter(StrategySpec)
_OPTIMIZER = TypeAdapter(ServerOptimizerSpec)


def _parse(adapter: TypeAdapter, spec: Any, what: str) -> Any:
    if isinstance(spec, BaseModel):
        return spec
    if not isinstance(spec, dict):
        raise StrategyConfigError(f"{what} must be a mapping like {{name: ...}}, got {type(spec).__name__}")
    try:
        return adapter.validate_python(spec)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or what}: {e['msg']}" for e in exc.errors())
        raise StrategyConfigError(f"invalid {what} {spec!r}: {problems}") from None


def parse_strategy(spec: Any) -> Any:
    """A StrategySpec member from a dict (or the model itself); StrategyConfigError if invalid."""
    return _parse(_STRATEGY, spec, "strategy")


def parse_server_optimizer(spec: Any) -> Any:
    return _parse(_OPTIMIZER, {"name": "sgd"} if spec is None else spec, "server_optimizer")


def build_rule(spec: Any) -> AggregationRule:
    """The AggregationRule a strategy spec (model or dict) describes, bucketing and norm bound included.

    Order: updates are clipped first (norm bound, outermost), then mixed (nnm) or bucketed, then
    aggregated.
    """
    s = parse_strategy(spec)
    rule: AggregationRule
    match s:
        case FedAvgSpec():
            rule = FedAvg()
        case FedProxSpec():
            rule = FedProx(mu=s.mu)
        case FedNovaSpec():
            rule = FedNova()
        case ScaffoldSpec():
            rule = Scaffold(eta_g=s.eta_g)
        case KrumSpec():
            rule = Krum(f=s.f)
        case MultiKrumSpec():
            rule = MultiKrum(f=s.f, m=s.m)
        case MedianSpec():
            rule = CoordinateMedian(f=s.f)
        case TrimmedMeanSpec():
            rule = TrimmedMean(beta=s.beta)
        case GeometricMedianSpec():
            rule = GeometricMedian(eps=s.eps, max_iter=s.max_iter, tol=s.tol, weighted=s.weighted, f=s.f)
        case BulyanSpec():
            rule = Bulyan(f=s.f)
        case _:
            raise StrategyConfigError(f"unknown strategy {s!r}")
    if s.bucketing is not None and s.nnm is not None:
        raise StrategyConfigError(
            f"strategy {s.name}: choose one pre-aggregation, bucketing or nnm; both rewrite the cohort "
            f"before the rule and their guarantees do not compose")
    # Pre-aggregations refuse streaming rules themselves (PreAggregation), with the reason.
    if s.nnm is not None:
        rule = wrap_nnm(rule, s.nnm.f)
    if s.bucketing is not None:
        rule = wrap_bucketing(rule, s.bucketing.s, s.bucketing.seed)
    return wrap_norm_bound(rule, s.norm_bound.max_norm if s.norm_bound else None)


def build_server_optimizer(spec: Any = None) -> ServerOptimizer:
    """The ServerOptimizer a spec (model, dict or None = plain sgd with lr 1) describes."""
    s = parse_server_optimizer(spec)
    match s:
        case SgdSpec():
            return ServerSGD(lr=s.lr)
        case MomentumSpec():
            return ServerMomentum(lr=s.lr, beta=s.beta)
        case AdagradSpec():
            return FedAdagrad(lr=s.lr, beta1=s.beta1, tau=s.tau, bias_correction=s.bias_correction)
        case AdamSpec():
            return FedAdam(lr=s.lr, beta1=s.beta1, beta2=s.beta2, tau=s.tau, bias_correction=s.bias_correction)
        case YogiSpec():
            return FedYogi(lr=s.lr, beta1=s.beta1, beta2=s.beta2, tau=s.tau, bias_correction=s.bias_correction)
    raise StrategyConfigError(f"unknown server optimizer {s!r}")


def validate_strategy(strategy_spec: Any, min_updates: int) -> AggregationRule:
    """Build the rule and check its precondition for the smallest round the job may aggregate.

    Returns the rule so job load can keep it; raises StrategyConfigError with the rule, the
    condition and the numbers when, e.g., krum with f=1 meets min_updates=4.
    """
    rule = build_rule(strategy_spec)
    rule.check_cohort(min_updates)
    return rule
