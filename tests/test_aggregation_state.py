"""Server-side state (SCAFFOLD's c, server optimizer moments) persists and resumes bit-identically.

Each test runs a job for 5 rounds uninterrupted, and again with a snapshot after round 2
taken through the real tensor codec (encode_tensors/decode_tensors) into *fresh* rule and
optimizer objects; both must end with torch.equal models and states.
"""

from __future__ import annotations

import pytest
import torch

from fedbus.aggregation.base import Contribution, StrategyConfigError, state_to_tensors
from fedbus.aggregation.fedadagrad import FedAdagrad
from fedbus.aggregation.fedadam import FedAdam
from fedbus.aggregation.fedavgm import ServerMomentum
from fedbus.aggregation.fedyogi import FedYogi
from fedbus.aggregation.scaffold import DELTA_C, Scaffold, scaffold_client_update
from fedbus.aggregation.server_sgd import ServerSGD
from fedbus.aggregation.specs import build_rule
from fedbus.protocol.codec import decode_tensors, encode_tensors

OPTIMIZERS = {
    "adam": lambda: FedAdam(lr=0.05, beta1=0.9, beta2=0.99, tau=1e-3),
    "adam_bias_corrected": lambda: FedAdam(lr=0.05, bias_correction=True),
    "adagrad": lambda: FedAdagrad(lr=0.05),
    "yogi": lambda: FedYogi(lr=0.05),
    "momentum": lambda: ServerMomentum(lr=1.0, beta=0.9),
    "sgd": lambda: ServerSGD(lr=0.5),
}


def initial_model() -> dict[str, torch.Tensor]:
    torch.manual_seed(1234)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2, bias=False))
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def run_round(rule, opt, model, version: int, num_workers: int = 5):
    """One SCAFFOLD round: 3 workers with inputs fixed by the round number."""
    acc = rule.begin(model, version)
    c = rule.configure(None, version)["scaffold"]
    gen = torch.Generator().manual_seed(1000 + version)
    for i in range(3):
        local = {}
        for k, v in model.items():
            if v.is_floating_point():
                local[k] = v + 0.1 * torch.randn(v.shape, generator=gen, dtype=v.dtype)
            else:
                local[k] = v + int(torch.randint(1, 5, (), generator=gen))
        c_local = {k: 0.01 * torch.randn(t.shape, generator=gen, dtype=t.dtype) for k, t in c.items()}
        _, dc = scaffold_client_update(c, c_local, model, local, num_steps=5, lr=0.1, momentum=0.5)
        weight = float(torch.randint(1, 100, (), generator=gen))
        acc.fold(Contribution.from_local_state(f"w{i}", version, weight, local, model, {DELTA_C: dc}, num_steps=5))
    proposal = acc.finalize()
    new = opt.step(model, proposal)
    rule.commit(acc, num_workers)
    return new


def through_codec(state: dict) -> dict:
    return decode_tensors(encode_tensors(state_to_tensors(state)))


@pytest.mark.parametrize("opt_name", OPTIMIZERS)
def test_scaffold_and_server_optimizer_resume_bit_identically(opt_name):
    make_opt = OPTIMIZERS[opt_name]
    # Uninterrupted.
    rule, opt, model = Scaffold(eta_g=0.8), make_opt(), initial_model()
    for version in range(5):
        model = run_round(rule, opt, model, version)

    # Interrupted after round 2 (versions 0 and 1 done), resumed into fresh objects.
    rule_a, opt_a, model_a = Scaffold(eta_g=0.8), make_opt(), initial_model()
    for version in range(2):
        model_a = run_round(rule_a, opt_a, model_a, version)
    rule_sd, opt_sd, saved_model = through_codec(rule_a.state_dict()), through_codec(opt_a.state_dict()), \
        decode_tensors(encode_tensors(model_a))
    del rule_a, opt_a
    rule_b, opt_b = Scaffold(eta_g=0.8), make_opt()
    rule_b.load_state_dict(rule_sd)
    opt_b.load_state_dict(opt_sd)
    model_b = saved_model
    for version in range(2, 5):
        model_b = run_round(rule_b, opt_b, model_b, version)

    assert list(model) == list(model_b)
    for k in model:
        assert model[k].dtype == model_b[k].dtype and torch.equal(model[k], model_b[k]), k
    for k, v in rule.control.items():
        assert torch.equal(v, rule_b.control[k]), k
    sd, sd_b = opt.state_dict(), opt_b.state_dict()
    assert sd.keys() == sd_b.keys()
    for k in sd:
        assert (torch.equal(sd[k], sd_b[k]) if isinstance(sd[k], torch.Tensor) else sd[k] == sd_b[k]), k


def test_without_the_state_a_resume_diverges():
    # The test above would pass trivially if the state did nothing: show that dropping it changes the result.
    rule, opt, model = Scaffold(eta_g=0.8), FedAdam(lr=0.05), initial_model()
    for version in range(5):
        model = run_round(rule, opt, model, version)
    rule_a, opt_a, model_a = Scaffold(eta_g=0.8), FedAdam(lr=0.05), initial_model()
    for version in range(2):
        model_a = run_round(rule_a, opt_a, model_a, version)
    rule_b, opt_b = Scaffold(eta_g=0.8), FedAdam(lr=0.05)  # fresh, nothing loaded
    for version in range(2, 5):
        model_a = run_round(rule_b, opt_b, model_a, version)
    assert not torch.equal(model["0.weight"], model_a["0.weight"])


def test_state_dict_contents():
    rule, opt = Scaffold(), FedAdam()
    assert rule.state_dict() == {} and opt.state_dict() == {"t": 0}
    model = initial_model()
    run_round(rule, opt, model, 0)
    sd = rule.state_dict()
    assert set(sd) == {f"c/{k}" for k in model if model[k].is_floating_point()} | \
        {f"dtype/{k}" for k in model if model[k].is_floating_point()}
    assert all(sd[f"c/{k}"].dtype == torch.float64 for k in model if model[k].is_floating_point())
    osd = opt.state_dict()
    assert osd["t"] == 1 and {k.split("/", 1)[0] for k in osd if k != "t"} == {"m", "v"}
    assert ServerSGD().state_dict() == {} and build_rule({"name": "fedavg"}).state_dict() == {}


@pytest.mark.parametrize("target, bad", [
    (lambda: FedAdam(), {"m/w": torch.zeros(1, dtype=torch.float64)}),                          # no t
    (lambda: FedAdam(), {"t": 1, "m/w": torch.zeros(1, dtype=torch.float64)}),                  # m without v
    (lambda: FedAdam(), {"t": 1, "m/w": torch.zeros(1), "v/w": torch.zeros(1)}),                # float32
    (lambda: FedAdam(), {"t": 1.5}),
    (lambda: FedAdam(), {"t": 1, "x/w": torch.zeros(1, dtype=torch.float64)}),
    (lambda: ServerMomentum(), {"velocity/w": torch.tensor([float("nan")], dtype=torch.float64)}),
    (lambda: ServerSGD(), {"t": 1}),
    (lambda: Scaffold(), {"c/w": torch.zeros(1, dtype=torch.float64)}),                          # no dtype
    (lambda: Scaffold(), {"c/w": torch.zeros(1), "dtype/w": torch.zeros((), dtype=torch.float32)}),
    (lambda: build_rule({"name": "fedavg"}), {"c/w": torch.zeros(1)}),
    (lambda: build_rule({"name": "median", "bucketing": {"s": 2}}), {}),
])
def test_bad_state_is_refused(target, bad):
    with pytest.raises(StrategyConfigError):
        target().load_state_dict(bad)


def test_bucketing_round_counter_resumes():
    # Bucketing's permutation depends on the round counter: after a restore from state_dict the
    # next round draws the same buckets as the uninterrupted rule.
    spec = {"name": "median", "bucketing": {"s": 2, "seed": 7}}
    base = {"w": torch.zeros(1)}
    cs = [Contribution(str(i), 0, 1.0, {"w": torch.tensor([float(i)], dtype=torch.float64)}) for i in range(6)]

    def sources(rule):
        acc = rule.begin(base)
        for c in cs:
            acc.fold(c)
        acc.finalize()
        return acc.sources

    uninterrupted = build_rule(spec)
    expected = [sources(uninterrupted) for _ in range(4)]
    first = build_rule(spec)
    got = [sources(first) for _ in range(2)]
    resumed = build_rule(spec)
    resumed.load_state_dict(through_codec(first.state_dict()))
    got += [sources(resumed) for _ in range(2)]
    assert got == expected
    fresh = build_rule(spec)
    assert [sources(fresh) for _ in range(2)] != expected[2:]  # without the state the buckets differ
