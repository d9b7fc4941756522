"""Sample-level DP-SGD through Opacus in the default train loop: ε reported apart, composing over rounds."""

from __future__ import annotations

import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant

from fedbus.jobspec import JobSpec
from fedbus.tasks import TrainingContext, TrainSettings
from fedbus.tasks.digits import task


def context(round_: int) -> TrainingContext:
    return TrainingContext(worker_id="w01", partition=0, num_partitions=4, run=None, round=round_, seed=round_)


def test_dp_sgd_reports_its_epsilon_composed_over_rounds():
    params = {"model": "mlp", "partition": "iid"}
    data = task.worker_data(0, 4, params, 0).train
    model = task.build_model(params)
    settings = TrainSettings(epochs=2, batch_size=30, lr=0.1, momentum=0.0,
                             dp_sgd_noise_multiplier=1.1, dp_sgd_max_grad_norm=1.0, dp_sgd_delta=1e-5)
    first = task.train(model, data, settings, seed=1, context=context(1))
    second = task.train(model, data, settings, seed=2, context=context(2))
    n = len(data)
    steps = 2 * -(-n // 30)
    assert first.num_steps == steps  # within the coordinator's epochs x ceil(samples / batch) cap
    # Opacus's RDP accountant (Poisson sampling, rate 1 / batches per epoch) against dp-accounting's.
    acc = rdp_privacy_accountant.RdpAccountant()
    acc.compose(dp_event.PoissonSampledDpEvent(1 / -(-n // 30), dp_event.GaussianDpEvent(1.1)), steps)
    assert first.metrics["dp_sgd_epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=0.05)
    acc.compose(dp_event.PoissonSampledDpEvent(1 / -(-n // 30), dp_event.GaussianDpEvent(1.1)), steps)
    assert second.metrics["dp_sgd_epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=0.05)
    assert second.metrics["dp_sgd_epsilon"] > first.metrics["dp_sgd_epsilon"]
    # Opacus's hooks are gone: the same model trains normally afterwards.
    plain = task.train(model, data, TrainSettings(epochs=1), seed=3, context=context(3))
    assert "dp_sgd_epsilon" not in plain.metrics
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters())


def test_dp_sgd_clips_per_example_gradients():
    params = {"model": "mlp", "partition": "iid"}
    data = task.worker_data(0, 4, params, 0).train
    model = task.build_model(params)
    before = torch.cat([p.detach().clone().reshape(-1) for p in model.parameters()])
    # Almost no noise, a tiny clip: each step moves the weights by about lr * C at most.
    settings = TrainSettings(epochs=1, batch_size=30, lr=1.0, momentum=0.0,
                             dp_sgd_noise_multiplier=1e-4, dp_sgd_max_grad_norm=1e-3)
    result = task.train(model, data, settings, seed=1, context=context(1))
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    # Poisson batches may exceed the expected size: allow a factor 2 over lr * C * steps.
    assert float((after - before).norm()) <= 2 * 1.0 * 1e-3 * result.num_steps


def test_dp_sgd_refuses_client_steps_it_does_not_privatise():
    spec = {"job": "j", "task": "fedbus.tasks.digits:task", "rounds": 1,
            "train": {"dp_sgd_noise_multiplier": 1.0, "dp_sgd_max_grad_norm": 1.0}}
    JobSpec.model_validate(spec)
    with pytest.raises(ValueError, match="not privatised"):
        JobSpec.model_validate({**spec, "strategy": {"name": "scaffold"}})


def test_dp_sgd_through_the_round_open_wire_form_in_sim():
    from fedbus.sim import simulate

    job = JobSpec.model_validate({
        "job": "j", "task": "fedbus.tasks.digits:task", "task_params": {"model": "mlp", "partition": "iid"},
        "rounds": 2, "cohort": {"min_workers": 2, "min_updates": 2}, "evaluation": {"federated": False},
        "train": {"epochs": 1, "batch_size": 32, "dp_sgd_noise_multiplier": 1.0, "dp_sgd_max_grad_norm": 1.0}})
    rows = simulate(job, 2).rounds
    eps = [r["train_dp_sgd_epsilon"] for r in rows]
    assert len(eps) == 2 and 0 < eps[0] < eps[1]  # composes over the rounds each worker trained
    assert "dp_epsilon" not in rows[0]  # no client-level DP in this job: nothing mixed in
