"""Job-spec models for strategies and server optimizers, and the factories."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import BaseModel, TypeAdapter, ValidationError

from fedbus.aggregation.base import ClientUpdate, StrategyConfigError
from fedbus.aggregation.bulyan import Bulyan
from fedbus.aggregation.fedadagrad import FedAdagrad
from fedbus.aggregation.fedadam import FedAdam
from fedbus.aggregation.fedavg import FedAvg
from fedbus.aggregation.fedavgm import ServerMomentum
from fedbus.aggregation.fednova import FedNova
from fedbus.aggregation.fedyogi import FedYogi
from fedbus.aggregation.geometric_median import GeometricMedian
from fedbus.aggregation.krum import Krum, MultiKrum
from fedbus.aggregation.median import CoordinateMedian
from fedbus.aggregation.norm_bound import NormBound
from fedbus.aggregation.scaffold import Scaffold
from fedbus.aggregation.server_sgd import ServerSGD
from fedbus.aggregation.fedprox import FedProx
from fedbus.aggregation.specs import (STRATEGY_NAMES, FedAvgSpec, KrumSpec, ServerOptimizerSpec, StrategySpec,
                                      build_rule, build_server_optimizer, validate_strategy)
from fedbus.aggregation.trimmed_mean import TrimmedMean

STRATEGIES = [
    ({"name": "fedavg"}, FedAvg, {}),
    ({"name": "fedprox", "mu": 0.1}, FedProx, {"mu": 0.1}),  # server side is FedAvg; mu goes to the workers
    ({"name": "fednova"}, FedNova, {}),
    ({"name": "scaffold", "eta_g": 0.5}, Scaffold, {"eta_g": 0.5}),
    ({"name": "krum", "f": 1}, Krum, {"f": 1}),
    ({"name": "multi_krum", "f": 1, "m": 3}, MultiKrum, {"f": 1, "m": 3}),
    ({"name": "median"}, CoordinateMedian, {"f": 0}),
    ({"name": "trimmed_mean", "beta": 0.1}, TrimmedMean, {"beta": 0.1}),
    ({"name": "geometric_median", "eps": 1e-5, "max_iter": 50, "tol": 1e-4}, GeometricMedian,
     {"eps": 1e-5, "max_iter": 50, "tol": 1e-4, "weighted": True}),
    ({"name": "bulyan", "f": 1}, Bulyan, {"f": 1}),
]


@pytest.mark.parametrize("spec, cls, attrs", STRATEGIES)
def test_every_strategy_builds_from_a_dict_and_a_model(spec, cls, attrs):
    for source in (spec, TypeAdapter(StrategySpec).validate_python(spec)):
        rule = build_rule(source)
        assert type(rule) is cls and rule.name == spec["name"]
        assert all(getattr(rule, k) == v for k, v in attrs.items())
    assert {s["name"] for s, _, _ in STRATEGIES} == set(STRATEGY_NAMES)


def test_streaming_flags():
    streaming = {name: build_rule({"name": name, **p}).streaming for name, p in
                 [("fedavg", {}), ("fednova", {}), ("scaffold", {}), ("median", {}), ("krum", {"f": 1}),
                  ("trimmed_mean", {"beta": 0.1}), ("geometric_median", {}), ("bulyan", {"f": 1}),
                  ("multi_krum", {"f": 1, "m": 2})]}
    assert [k for k, v in streaming.items() if v] == ["fedavg", "fednova", "scaffold"]


def test_update_groups_name_the_tensor_extras():
    assert build_rule({"name": "scaffold"}).update_groups == ("scaffold_delta_c",)
    assert build_rule({"name": "scaffold", "norm_bound": {"max_norm": 1.0}}).update_groups == ("scaffold_delta_c",)
    assert build_rule({"name": "fednova"}).update_groups == ()
    assert build_rule({"name": "krum", "f": 1}).update_groups == ()


def test_norm_bound_on_any_strategy():
    rule = build_rule({"name": "trimmed_mean", "beta": 0.2, "norm_bound": {"max_norm": 5.0}})
    assert isinstance(rule, NormBound) and isinstance(rule.rule, TrimmedMean) and rule.max_norm == 5.0
    assert not rule.streaming and rule.name == "trimmed_mean"
    assert isinstance(build_rule({"name": "fedavg", "norm_bound": None}), FedAvg)


@pytest.mark.parametrize("spec, fragment", [
    ({"name": "fedsgd"}, "does not match any of the expected tags"),
    ({"f": 1}, "Unable to extract tag using discriminator 'name'"),
    ({"name": "krum"}, "krum.f: Field required"),
    ({"name": "krum", "f": -1}, "greater than or equal to 0"),
    ({"name": "trimmed_mean", "beta": 0.5}, "less than 0.5"),
    ({"name": "median", "beta": 0.1}, "median.beta: Extra inputs are not permitted"),
    ({"name": "multi_krum", "f": 1, "m": 0}, "greater than or equal to 1"),
    ({"name": "fedavg", "norm_bound": {"max_norm": 0}}, "greater than 0"),
    ({"name": "scaffold", "eta_g": float("nan")}, "finite number"),
])
def test_bad_strategy_params_are_clear_errors(spec, fragment):
    with pytest.raises(StrategyConfigError, match="invalid strategy") as exc:
        build_rule(spec)
    assert fragment in str(exc.value)
    assert isinstance(exc.value, ValueError)


def test_non_mapping_strategy():
    with pytest.raises(StrategyConfigError, match="mapping"):
        build_rule("krum")


@pytest.mark.parametrize("spec, min_updates, message", [
    ({"name": "krum", "f": 1}, 4, "n >= 5"),
    ({"name": "multi_krum", "f": 1, "m": 4}, 4, "n >= 5"),
    ({"name": "multi_krum", "f": 1, "m": 5}, 5, "m <= n - f"),
    ({"name": "bulyan", "f": 2}, 10, "n >= 11"),
    ({"name": "median", "f": 2}, 4, "n >= 5"),
    ({"name": "geometric_median", "f": 1}, 2, "n >= 3"),
    ({"name": "fedavg"}, 0, "at least one update"),
    ({"name": "krum", "f": 1, "norm_bound": {"max_norm": 1.0}}, 4, "n >= 5"),
])
def test_validate_strategy_checks_the_quorum(spec, min_updates, message):
    with pytest.raises(StrategyConfigError, match=message):
        validate_strategy(spec, min_updates)


def test_validate_strategy_returns_the_rule():
    assert isinstance(validate_strategy({"name": "bulyan", "f": 1}, 7), Bulyan)


OPTIMIZERS = [
    (None, ServerSGD, {"lr": 1.0}),
    ({"name": "sgd"}, ServerSGD, {"lr": 1.0}),
    ({"name": "sgd", "lr": 0.5}, ServerSGD, {"lr": 0.5}),
    ({"name": "momentum"}, ServerMomentum, {"lr": 1.0, "beta": 0.9}),
    ({"name": "adagrad", "lr": 0.1, "tau": 0.01}, FedAdagrad, {"lr": 0.1, "tau": 0.01, "bias_correction": False}),
    ({"name": "adam"}, FedAdam, {"lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3, "bias_correction": False}),
    ({"name": "yogi", "bias_correction": True}, FedYogi, {"bias_correction": True}),
]


@pytest.mark.parametrize("spec, cls, attrs", OPTIMIZERS)
def test_every_server_optimizer_builds(spec, cls, attrs):
    opt = build_server_optimizer(spec)
    assert type(opt) is cls and all(getattr(opt, k) == v for k, v in attrs.items())
    if spec is not None:
        assert type(build_server_optimizer(TypeAdapter(ServerOptimizerSpec).validate_python(spec))) is cls


@pytest.mark.parametrize("spec, fragment", [
    ({"name": "rmsprop"}, "does not match"),
    ({"name": "adagrad", "beta2": 0.9}, "Extra inputs are not permitted"),  # Adagrad has no beta2
    ({"name": "adam", "tau": 0}, "greater than 0"),
    ({"name": "momentum", "beta": 1.0}, "less than 1"),
])
def test_bad_optimizer_params(spec, fragment):
    with pytest.raises(StrategyConfigError, match=fragment):
        build_server_optimizer(spec)


def test_models_embed_in_a_job_spec_and_render_json_schema():
    class Job(BaseModel):
        strategy: StrategySpec = FedAvgSpec()
        server_optimizer: ServerOptimizerSpec | None = None

    job = Job.model_validate({"strategy": {"name": "krum", "f": 2, "norm_bound": {"max_norm": 3.0}},
                              "server_optimizer": {"name": "adam", "lr": 0.1}})
    assert isinstance(job.strategy, KrumSpec) and job.strategy.norm_bound.max_norm == 3.0
    assert Job.model_validate(job.model_dump(mode="json")) == job  # round-trips through YAML/JSON
    assert Job().strategy.name == "fedavg"
    schema = json.dumps(Job.model_json_schema())
    for name in STRATEGY_NAMES + ("sgd", "momentum", "adagrad", "adam", "yogi"):
        assert f'"{name}"' in schema
    with pytest.raises(ValidationError):
        Job.model_validate({"strategy": {"name": "krum", "f": 1, "m": 2}})


def test_built_rule_runs_a_round():
    rule = build_rule({"name": "multi_krum", "f": 1, "m": 3})
    agg = rule.begin({"w": torch.zeros(1)})
    for i, v in enumerate([0.0, 1.0, 2.0, 3.0, 1e6]):
        agg.add(ClientUpdate(str(i), 1, {"w": torch.tensor([v])}))
    # scores (2 nearest, squared): 0: 1+4 = 5, 1: 1+1 = 2, 2: 1+1 = 2, 3: 1+4 = 5, 1e6: huge
    # m = 3 lowest: "1", "2" (2 each), then "0" and "3" tie at 5 -> "0" (smaller id): mean(1, 2, 0) = 1
    assert agg.result()["w"].tolist() == [1.0]
