"""The built-in digits task, and the default train loop of Task (settings, FedProx)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pydantic import ValidationError
from torch import nn
from torch.utils.data import TensorDataset

from fedbus.tasks import Task, TaskParamsError, TrainSettings
from fedbus.tasks import digits
from fedbus.tasks.digits import DigitsParams, task

NUM_DIGITS = 1797  # images in scikit-learn's bundled digits data


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _all_worker_indices(num_workers, params, seed):
    p = DigitsParams.model_validate(params)
    out = []
    for i in range(num_workers):
        own = digits.worker_indices(i, num_workers, p, seed)
        out.append(digits.split_worker_indices(own, p.val_fraction, seed, i))
    return out


# --- params -------------------------------------------------------------------------


def test_params_defaults():
    p = task.params(None)
    assert (p.model, p.hidden, p.partition, p.alpha) == ("mlp", 128, "dirichlet", 0.5)
    assert (p.test_fraction, p.val_fraction) == (0.2, 0.2)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"modle": "mlp"}, "modle"),
        ({"model": "resnet"}, "model"),
        ({"alpha": 0}, "alpha"),
        ({"test_fraction": 1.5}, "test_fraction"),
    ],
)
def test_bad_params_raise_a_readable_error(params, message):
    with pytest.raises(TaskParamsError, match=f"invalid task_params for fedbus.tasks.digits: {message}"):
        task.build_model(params)


# --- data ---------------------------------------------------------------------------


def test_worker_data_shapes_types_and_range():
    data = task.worker_data(partition=3, num_partitions=10, params={}, seed=0)
    for dataset in (data.train, data.val):
        features, labels = dataset.tensors
        assert features.dtype == torch.float32 and features.shape[1] == 64
        assert labels.dtype == torch.int64 and labels.shape == (features.shape[0],)
        assert 0.0 <= float(features.min()) and float(features.max()) <= 1.0
        assert set(labels.tolist()) <= set(range(10))
    assert len(data.val) == round(0.2 * (len(data.train) + len(data.val)))


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_server_test_set_is_disjoint_from_all_worker_data(partition):
    params = {"partition": partition}
    test_idx, pool_idx = digits.global_split(0.2, 5)
    seen = [test_idx]
    for train_idx, val_idx in _all_worker_indices(10, params, seed=5):
        assert len(np.intersect1d(train_idx, val_idx)) == 0
        seen += [train_idx, val_idx]
    everything = np.concatenate(seen)
    # Disjoint and, together, every image exactly once.
    assert np.array_equal(np.sort(everything), np.arange(NUM_DIGITS))

    test = task.server_test_data(params, seed=5)
    assert len(test) == len(test_idx) == math.ceil(0.2 * NUM_DIGITS)  # rounded up, as sklearn does
    worker_total = sum(
        len(d.train) + len(d.val) for d in (task.worker_data(i, 10, params, seed=5) for i in range(10))
    )
    assert worker_total + len(test) == NUM_DIGITS


@pytest.mark.parametrize("seed", [0, 1, 7, 2**40 + 3])
def test_server_test_set_is_stratified(seed):
    _features, labels = digits.load_arrays()
    test_labels = task.server_test_data({}, seed=seed).tensors[1].numpy()
    expected = np.bincount(labels) * 0.2
    # Largest-remainder allocation: every class within one sample of its exact share.
    assert np.all(np.abs(np.bincount(test_labels, minlength=10) - expected) < 1)


def test_global_split_is_deterministic_and_depends_on_the_seed():
    digits.global_split.cache_clear()
    test_a, pool_a = digits.global_split(0.2, 3)
    digits.global_split.cache_clear()
    test_b, pool_b = digits.global_split(0.2, 3)
    assert np.array_equal(test_a, test_b) and np.array_equal(pool_a, pool_b)
    test_c, _pool_c = digits.global_split(0.2, 4)
    assert not np.array_equal(test_a, test_c)
    # A different seed draws different images (two random 20% subsets share ~20%).
    assert len(np.intersect1d(test_a, test_c)) < 0.5 * len(test_a)


# --- the bundled data, read without scikit-learn -----------------------------------------------


def test_arrays_are_load_digits_exactly():
    from sklearn.datasets import load_digits

    features, labels = digits.load_arrays()
    bunch = load_digits()
    assert features.dtype == np.float32 and labels.dtype == np.int64
    assert np.array_equal(features, (bunch.data / 16.0).astype(np.float32))
    assert np.array_equal(labels, bunch.target)
    assert features.shape == (NUM_DIGITS, 64)
    assert not features.flags.writeable and not labels.flags.writeable


def test_data_file_is_the_one_in_the_installed_sklearn_package():
    import sklearn

    path = digits.data_file()
    assert path.name == "digits.csv.gz"
    assert path.resolve().is_relative_to(Path(sklearn.__file__).resolve().parent)


# --- the stratified split --------------------------------------------------------------------


@hypothesis_settings(max_examples=200, deadline=None)
@given(
    labels=st.lists(st.integers(0, 5), min_size=2, max_size=300),
    test_fraction=st.floats(0.01, 0.99),
    seed=st.integers(0, 2**32 - 1),
)
def test_stratified_split_properties(labels, test_fraction, seed):
    labels = np.array(labels)
    n = len(labels)
    num_test = math.ceil(test_fraction * n)
    if not 0 < num_test < n:
        with pytest.raises(ValueError, match="empty train or test set"):
            digits.stratified_split(labels, test_fraction, seed)
        return
    train_idx, test_idx = digits.stratified_split(labels, test_fraction, seed)
    # Sorted, disjoint, covering, with the test size rounded up.
    assert np.array_equal(np.sort(np.concatenate([train_idx, test_idx])), np.arange(n))
    assert np.all(np.diff(train_idx) > 0) and np.all(np.diff(test_idx) > 0)
    assert len(test_idx) == num_test
    # Stratified: each class's test count is its exact share rounded down or up.
    for label in np.unique(labels):
        share = num_test * np.sum(labels == label) / n
        assert math.floor(share) <= np.sum(labels[test_idx] == label) <= math.ceil(share)
    # Deterministic for the seed.
    again_train, again_test = digits.stratified_split(labels, test_fraction, seed)
    assert np.array_equal(again_train, train_idx) and np.array_equal(again_test, test_idx)


def test_stratified_split_picks_uniformly_within_a_class():
    labels = np.repeat([0, 1], [30, 10])
    hits = np.zeros(len(labels))
    for seed in range(400):
        _train, test = digits.stratified_split(labels, 0.5, seed)
        hits[test] += 1
    # Each image is in the test set half the time (binomial(400, 0.5): sd 10).
    assert np.all(np.abs(hits - 200) < 60)


def test_worker_data_is_deterministic_for_the_job_seed():
    a = task.worker_data(2, 10, {}, seed=11)
    b = task.worker_data(2, 10, {}, seed=11)
    c = task.worker_data(2, 10, {}, seed=12)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    assert torch.equal(a.val.tensors[1], b.val.tensors[1])
    assert len(a.train) != len(c.train) or not torch.equal(a.train.tensors[0], c.train.tensors[0])


def test_dirichlet_default_is_more_skewed_than_iid():
    def mean_classes_holding_80_percent(partition):
        counts = []
        for d in (task.worker_data(i, 10, {"partition": partition}, seed=0) for i in range(10)):
            share = np.sort(np.bincount(d.train.tensors[1].numpy(), minlength=10))[::-1] / len(d.train)
            counts.append(int(np.searchsorted(np.cumsum(share), 0.8) + 1))
        return np.mean(counts)

    assert mean_classes_holding_80_percent("dirichlet") < mean_classes_holding_80_percent("iid") - 2


def test_bad_partition_number_is_rejected():
    with pytest.raises(ValueError, match="partition must be in"):
        task.worker_data(partition=10, num_partitions=10, params={}, seed=0)


# --- models and training ----------------------------------------------------------------


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_models_map_flat_images_to_ten_logits(model_name):
    model = task.build_model({"model": model_name, "hidden": 32})
    assert model(torch.rand(5, 64)).shape == (5, 10)


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_one_local_step_reduces_the_loss(model_name):
    params = {"model": model_name}
    torch.manual_seed(0)
    model = task.build_model(params)
    data = task.worker_data(0, 10, params, seed=0)
    before = task.evaluate(model, data.train)
    # A batch the size of the data set makes this exactly one gradient step.
    settings = TrainSettings(epochs=1, batch_size=len(data.train), lr=0.1, momentum=0.0)
    result = task.train(model, data.train, settings, seed=0)
    after = task.evaluate(model, data.train)
    assert result.num_steps == 1
    assert result.num_samples == len(data.train)
    assert result.metrics["loss"] == pytest.approx(before.loss, rel=1e-5)
    assert after.loss < before.loss


def test_default_settings_learn_a_worker_partition():
    torch.manual_seed(0)
    model = task.build_model({"partition": "iid"})
    data = task.worker_data(0, 4, {"partition": "iid"}, seed=0)
    for round_seed in range(5):
        result = task.train(model, data.train, TrainSettings(), seed=round_seed)
    assert result.num_steps == TrainSettings().epochs * math.ceil(len(data.train) / TrainSettings().batch_size)
    assert task.evaluate(model, data.val).accuracy > 0.85


def test_training_is_reproducible_for_a_seed():
    data = task.worker_data(0, 10, {}, seed=0)
    states = []
    for _ in range(2):
        torch.manual_seed(0)
        model = task.build_model({})
        task.train(model, data.train, TrainSettings(), seed=42)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_adam_optimizer_trains():
    torch.manual_seed(0)
    model = task.build_model({})
    data = task.worker_data(0, 10, {}, seed=0)
    before = task.evaluate(model, data.train).loss
    task.train(model, data.train, TrainSettings(optimizer="adam", lr=0.01), seed=0)
    assert task.evaluate(model, data.train).loss < before


def test_evaluate_empty_dataset_reports_zero_samples():
    model = task.build_model({})
    empty = TensorDataset(torch.zeros(0, 64), torch.zeros(0, dtype=torch.int64))
    result = task.evaluate(model, empty)
    assert (result.num_samples, result.loss, result.accuracy) == (0, 0.0, 0.0)


# --- TrainSettings ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [{"epochs": 0}, {"batch_size": 0}, {"lr": 0}, {"momentum": 1.0}, {"proximal_mu": -1}, {"optimizer": "rmsprop"},
     {"learning_rate": 0.1}],
)
def test_train_settings_reject_bad_values(bad):
    with pytest.raises(ValidationError):
        TrainSettings(**bad)


# --- FedProx ------------------------------------------------------------------------------


class _TinyTask(Task):
    def build_model(self, params):
        return nn.Linear(3, 2)

    def worker_data(self, partition, num_partitions, params, seed):
        raise NotImplementedError


def _tiny_setup():
    features = np.array([[0.5, -1.0, 2.0], [1.5, 0.0, -0.5], [-1.0, 1.0, 1.0], [0.0, 0.3, -0.2]], dtype=np.float32)
    labels = np.array([0, 1, 1, 0])
    weight = np.array([[0.2, -0.1, 0.4], [-0.3, 0.5, 0.1]], dtype=np.float32)
    bias = np.array([0.05, -0.05], dtype=np.float32)
    global_weight = weight + np.array([[0.3, 0.0, -0.2], [0.1, 0.4, 0.0]], dtype=np.float32)
    global_bias = bias + np.array([-0.5, 0.25], dtype=np.float32)

    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(weight))
        model.bias.copy_(torch.from_numpy(bias))
    global_state = {"weight": torch.from_numpy(global_weight), "bias": torch.from_numpy(global_bias)}
    dataset = TensorDataset(torch.from_numpy(features), torch.from_numpy(labels))

    # The expected objective, in plain NumPy float64: mean cross-entropy + (mu/2)·||w − w_g||².
    logits = features.astype(np.float64) @ weight.T + bias
    log_norm = np.log(np.exp(logits).sum(axis=1))
    cross_entropy = float(np.mean(log_norm - logits[np.arange(len(labels)), labels]))
    squared_distance = float(((weight - global_weight) ** 2).sum() + ((bias - global_bias) ** 2).sum())
    return model, dataset, global_state, cross_entropy, squared_distance


@pytest.mark.parametrize("batch_size", [4, 2, 1])
def test_fedprox_loss_is_cross_entropy_plus_proximal_term(batch_size):
    mu = 0.7
    model, dataset, global_state, cross_entropy, squared_distance = _tiny_setup()
    # A tiny lr keeps the weights (almost) fixed over the epoch, so the mean of the
    # per-batch objectives is the full-data objective at the starting weights.
    settings = TrainSettings(epochs=1, batch_size=batch_size, lr=1e-7, momentum=0.0, proximal_mu=mu)
    result = _TinyTask().train(model, dataset, settings, seed=0, global_state=global_state)
    expected_proximal = mu / 2 * squared_distance
    assert result.metrics["proximal"] == pytest.approx(expected_proximal, rel=1e-5)
    assert result.metrics["loss"] == pytest.approx(cross_entropy + expected_proximal, rel=1e-5)


def test_without_fedprox_the_loss_is_plain_cross_entropy():
    model, dataset, global_state, cross_entropy, _ = _tiny_setup()
    settings = TrainSettings(epochs=1, batch_size=4, lr=1e-7, momentum=0.0)
    result = _TinyTask().train(model, dataset, settings, seed=0, global_state=global_state)
    assert result.metrics["loss"] == pytest.approx(cross_entropy, rel=1e-5)
    assert "proximal" not in result.metrics


def test_fedprox_without_global_state_anchors_at_the_starting_weights():
    model, dataset, _global_state, cross_entropy, _ = _tiny_setup()
    settings = TrainSettings(epochs=1, batch_size=4, lr=0.1, momentum=0.0, proximal_mu=1.0)
    result = _TinyTask().train(model, dataset, settings, seed=0, global_state=None)
    assert result.metrics["proximal"] == 0.0  # one step, taken from the anchor itself
    assert result.metrics["loss"] == pytest.approx(cross_entropy, rel=1e-5)


def test_fedprox_pulls_local_weights_towards_the_global_model():
    def distance_after_training(mu):
        model, dataset, global_state, _, _ = _tiny_setup()
        settings = TrainSettings(epochs=50, batch_size=4, lr=0.1, momentum=0.0, proximal_mu=mu)
        _TinyTask().train(model, dataset, settings, seed=0, global_state=global_state)
        return sum(float(((p.detach() - global_state[n]) ** 2).sum()) for n, p in model.named_parameters())

    assert distance_after_training(5.0) < 0.5 * distance_after_training(0.0)


def test_fedprox_reports_missing_global_entries():
    model, dataset, global_state, _, _ = _tiny_setup()
    del global_state["bias"]
    with pytest.raises(KeyError, match="bias"):
        _TinyTask().train(model, dataset, TrainSettings(proximal_mu=0.1), seed=0, global_state=global_state)
