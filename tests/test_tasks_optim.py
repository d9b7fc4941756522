"""The in-house default optimizers (fedbus.tasks.optim) against torch.optim, the SCAFFOLD
gradient correction of Task.train, and what a worker's start-up does not import."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from fedbus.tasks import Task, TrainSettings
from fedbus.tasks.base import shuffled_batches
from fedbus.tasks.optim import SGD, Adam, make_optimizer

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


class _Net(nn.Module):
    """Two layers plus one parameter the loss never reaches and one frozen one."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(6, 8)
        self.out = nn.Linear(8, 3)
        self.unused = nn.Parameter(torch.ones(2))
        self.frozen = nn.Parameter(torch.ones(3), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x))) + self.frozen


class _NetTask(Task):
    def build_model(self, params):
        return _Net()

    def worker_data(self, partition, num_partitions, params, seed):
        raise NotImplementedError


def _data(num_samples: int = 40, dtype: torch.dtype = torch.float32) -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(num_samples, 6, generator=generator, dtype=dtype)
    labels = torch.randint(0, 3, (num_samples,), generator=generator)
    return TensorDataset(features, labels)


def _model(seed: int = 0, dtype: torch.dtype = torch.float32) -> _Net:
    torch.manual_seed(seed)
    return _Net().to(dtype)


def _run(model: nn.Module, optimizer, dataset: TensorDataset, steps: int) -> None:
    """`steps` optimizer steps on minibatches of 8, in a seeded order."""
    generator = torch.Generator().manual_seed(3)
    done = 0
    while done < steps:
        for inputs, targets in shuffled_batches(dataset, 8, generator):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(inputs), targets).backward()
            optimizer.step()
            done += 1
            if done == steps:
                return


def _assert_same_parameters(a: nn.Module, b: nn.Module) -> None:
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-8, msg=lambda m, name=name: f"{name}: {m}")


SGD_CASES = [
    {"lr": 0.1},
    {"lr": 0.1, "momentum": 0.9},
    {"lr": 0.05, "momentum": 0.5, "weight_decay": 1e-2},
    {"lr": 0.2, "weight_decay": 1e-3},
]
ADAM_CASES = [
    {"lr": 0.01},
    {"lr": 0.01, "weight_decay": 1e-2},
    {"lr": 0.003, "betas": (0.8, 0.99), "eps": 1e-6},
]


@pytest.mark.parametrize(
    ("ours", "theirs", "kwargs"),
    [(SGD, torch.optim.SGD, kw) for kw in SGD_CASES] + [(Adam, torch.optim.Adam, kw) for kw in ADAM_CASES],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_torch_optim(ours, theirs, kwargs, dtype):
    dataset = _data(dtype=dtype)
    reference, model = _model(dtype=dtype), _model(dtype=dtype)
    _run(reference, theirs(reference.parameters(), **kwargs), dataset, steps=12)
    _run(model, ours(model.parameters(), **kwargs), dataset, steps=12)
    _assert_same_parameters(model, reference)
    # Training moved the weights, except where there was no gradient.
    assert not torch.equal(model.hidden.weight, _model(dtype=dtype).hidden.weight)
    assert torch.equal(model.unused, torch.ones(2, dtype=dtype))


def test_adam_matches_torch_on_complex_parameters():
    torch.manual_seed(0)
    reference = nn.Parameter(torch.randn(5, dtype=torch.complex64))
    param = nn.Parameter(reference.detach().clone())
    target = torch.randn(5, dtype=torch.complex64)
    theirs, ours = torch.optim.Adam([reference], lr=0.05, weight_decay=0.1), Adam([param], lr=0.05, weight_decay=0.1)
    for p, opt in ((reference, theirs), (param, ours)):
        for _ in range(5):
            opt.zero_grad()
            (p - target).abs().pow(2).sum().backward()
            opt.step()
    torch.testing.assert_close(param, reference, rtol=1e-6, atol=1e-8)


def test_zero_grad_without_set_to_none_zeroes():
    model = _model()
    optimizer = SGD(model.parameters(), lr=0.1)
    F.cross_entropy(model(_data().tensors[0]), _data().tensors[1]).backward()
    optimizer.zero_grad(set_to_none=False)
    assert torch.equal(model.hidden.weight.grad, torch.zeros_like(model.hidden.weight))
    optimizer.zero_grad()
    assert model.hidden.weight.grad is None


@pytest.mark.parametrize(
    ("settings", "reference"),
    [
        (TrainSettings(epochs=2, batch_size=8, lr=0.1, momentum=0.9, weight_decay=1e-3),
         lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3)),
        (TrainSettings(epochs=2, batch_size=8, lr=0.01, optimizer="adam", weight_decay=1e-3),
         lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=1e-3)),
    ],
)
def test_default_train_loop_matches_the_torch_optim_loop(settings, reference):
    """Task.train is the same computation it was when it used torch.optim."""
    dataset = _data()
    model, expected = _model(), _model()
    _NetTask().train(model, dataset, settings, seed=7)

    optimizer = reference(expected.parameters())
    generator = torch.Generator().manual_seed(7)
    for _epoch in range(settings.epochs):
        for inputs, targets in shuffled_batches(dataset, settings.batch_size, generator):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(expected(inputs), targets).backward()
            optimizer.step()
    _assert_same_parameters(model, expected)


def test_make_optimizer_follows_the_settings():
    model = _model()
    sgd = make_optimizer(model, TrainSettings(lr=0.3, momentum=0.5, weight_decay=0.1))
    assert isinstance(sgd, SGD) and (sgd.lr, sgd.momentum, sgd.weight_decay) == (0.3, 0.5, 0.1)
    adam = make_optimizer(model, TrainSettings(optimizer="adam", lr=0.01))
    assert isinstance(adam, Adam) and (adam.lr, adam.beta1, adam.beta2, adam.eps) == (0.01, 0.9, 0.999, 1e-8)


@pytest.mark.parametrize("bad", [{"lr": -1.0}, {"lr": 0.1, "momentum": -0.1}, {"lr": 0.1, "weight_decay": -1.0}])
def test_sgd_rejects_bad_hyper_parameters(bad):
    with pytest.raises(ValueError):
        SGD(_model().parameters(), **bad)


def test_optimizers_reject_an_empty_parameter_list():
    with pytest.raises(ValueError, match="empty parameter list"):
        Adam([], lr=0.1)


# --- SCAFFOLD gradient correction ------------------------------------------------------------


def _corrections(model: nn.Module, scale: float = 1.0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return {
        name: scale * torch.randn(p.shape, generator=generator, dtype=p.dtype)
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def test_grad_correction_one_sgd_step_is_minus_lr_times_grad_plus_correction():
    dataset = _data(dtype=torch.float64)
    model = _model(dtype=torch.float64)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    correction = _corrections(model, scale=0.1)

    # The full-batch gradient at the starting weights, computed independently.
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    features, labels = dataset.tensors
    loss = F.cross_entropy(model(features), labels)
    grads = dict(zip(names, torch.autograd.grad(loss, params, allow_unused=True), strict=True))

    lr = 1e-4
    settings = TrainSettings(epochs=1, batch_size=len(dataset), lr=lr, momentum=0.0)
    result = _NetTask().train(model, dataset, settings, seed=0, grad_correction=correction)
    assert result.num_steps == 1

    for name, p in model.named_parameters():
        change = p.detach() - before[name]
        if name == "frozen":
            assert torch.equal(change, torch.zeros_like(change))
            continue
        grad = grads[name] if grads[name] is not None else torch.zeros_like(p)  # "unused": no gradient at all
        torch.testing.assert_close(change, -lr * (grad + correction[name]), rtol=1e-9, atol=1e-15)


def test_grad_correction_is_applied_every_step_before_momentum_and_weight_decay():
    dataset = _data()
    model, expected = _model(), _model()
    correction = _corrections(model, scale=0.05)
    settings = TrainSettings(epochs=2, batch_size=8, lr=0.05, momentum=0.9, weight_decay=1e-3)
    _NetTask().train(model, dataset, settings, seed=3, grad_correction=correction)

    optimizer = torch.optim.SGD(expected.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    generator = torch.Generator().manual_seed(3)
    for _epoch in range(settings.epochs):
        for inputs, targets in shuffled_batches(dataset, settings.batch_size, generator):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(expected(inputs), targets).backward()
            for name, p in expected.named_parameters():
                if p.requires_grad:
                    p.grad = correction[name].clone() if p.grad is None else p.grad + correction[name]
            optimizer.step()
    _assert_same_parameters(model, expected)


def test_zero_grad_correction_changes_nothing_and_extra_keys_are_ignored():
    dataset = _data()
    model, expected = _model(), _model()
    zeros = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    zeros["some_buffer"] = torch.ones(4)
    settings = TrainSettings(epochs=1, batch_size=8)
    _NetTask().train(model, dataset, settings, seed=0, grad_correction=zeros)
    _NetTask().train(expected, dataset, settings, seed=0)
    for (name, p), (_, q) in zip(model.named_parameters(), expected.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_grad_correction_missing_a_parameter_names_it():
    model = _model()
    correction = _corrections(model)
    del correction["out.bias"]
    with pytest.raises(KeyError, match="out.bias"):
        _NetTask().train(model, _data(), TrainSettings(), seed=0, grad_correction=correction)
    # The frozen parameter needs no entry: _corrections() never gives one, and the other tests pass.


def test_grad_correction_of_the_wrong_shape_is_rejected():
    model = _model()
    correction = _corrections(model)
    correction["hidden.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match="hidden.weight"):
        _NetTask().train(model, _data(), TrainSettings(), seed=0, grad_correction=correction)


# --- start-up cost ---------------------------------------------------------------------------

WORKER_STYLE_STARTUP = textwrap.dedent(
    """
    import copy, sys
    import torch
    import fedbus.worker.service  # noqa: F401  (what a worker process imports)
    from fedbus.tasks import TrainSettings, load_task, warm_up_torch

    task = load_task("fedbus.tasks.digits:task")
    for settings, params in ((TrainSettings(), {}), (TrainSettings(optimizer="adam", lr=0.01), {"model": "cnn"})):
        torch.manual_seed(0)
        model = task.build_model(params)
        data = task.worker_data(partition=0, num_partitions=10, params=params, seed=0)
        warm_up_torch()
        task.train(copy.deepcopy(model), data.train, settings, seed=0)
        task.evaluate(model, data.val)
    task.evaluate(model, task.server_test_data({}, seed=0))
    print(sorted(name for name in ("torch._dynamo", "sklearn") if name in sys.modules))
    """
)


def test_worker_start_up_imports_neither_dynamo_nor_sklearn():
    out = subprocess.run(
        [sys.executable, "-c", WORKER_STYLE_STARTUP], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"

