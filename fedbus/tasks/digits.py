"""Built-in task: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes).

Small enough that a federated round of 10 workers takes milliseconds, real enough
that non-IID partitions visibly hurt. No download: the data ships with scikit-learn
(sklearn/datasets/data/digits.csv.gz). This module reads that file itself and never
imports scikit-learn, which would cost each worker ~1.7 s of CPU and ~80 MB of RSS;
scikit-learn only has to be installed.

Data flow for a job seed s:
  all samples --stratified split(s)--> server test set (coordinator only)
                                   \\-> pool --partition(s)--> worker i --split(s, i)--> train / val
"""

from __future__ import annotations

import gzip
import importlib.util
import math
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.data import TensorDataset

from fedbus.tasks.base import Task, WorkerData, parse_task_params
from fedbus.tasks.partition import dirichlet_partition, iid_partition

NUM_CLASSES = 10
IMAGE_SIDE = 8
NUM_FEATURES = IMAGE_SIDE * IMAGE_SIDE
# load_digits pixel intensities are integers in 0..16.
MAX_PIXEL = 16.0
# Where scikit-learn keeps the data load_digits() reads, relative to its package directory.
DATA_FILE = ("datasets", "data", "digits.csv.gz")


class DigitsParams(BaseModel):
    """The task_params the digits task accepts."""

    model_config = ConfigDict(extra="forbid")

    model: Literal["mlp", "cnn"] = "mlp"
    hidden: int = Field(default=128, ge=1)
    partition: Literal["iid", "dirichlet"] = "dirichlet"
    alpha: float = Field(default=0.5, gt=0)
    test_fraction: float = Field(default=0.2, gt=0, lt=1)
    val_fraction: float = Field(default=0.2, ge=0, lt=1)
    min_partition_size: int = Field(default=10, ge=1)


class DigitsTask(Task):
    name = "digits"
    # 10 workers at Dirichlet(0.5) with default TrainSettings reach 0.95 server test
    # accuracy by round 16 and stay there from round 19 at the latest over seeds 0-9
    # (benchmarks/digits_inprocess.py; median round 7 over seeds 0-99).
    suggested_rounds = 20

    def params(self, params: Mapping[str, Any] | None) -> DigitsParams:
        return parse_task_params(DigitsParams, params, "fedbus.tasks.digits")

    def build_model(self, params: Mapping[str, Any] | None) -> nn.Module:
        p = self.params(params)
        if p.model == "cnn":
            return build_cnn(p.hidden)
        return build_mlp(p.hidden)

    def worker_data(
        self, partition: int, num_partitions: int, params: Mapping[str, Any] | None, seed: int
    ) -> WorkerData:
        p = self.params(params)
        if not 0 <= partition < num_partitions:
            raise ValueError(f"partition must be in [0, {num_partitions}), got {partition}")
        own = worker_indices(partition, num_partitions, p, seed)
        train_idx, val_idx = split_worker_indices(own, p.val_fraction, seed, partition)
        return WorkerData(train=_dataset(train_idx), val=_dataset(val_idx))

    def server_test_data(self, params: Mapping[str, Any] | None, seed: int) -> TensorDataset:
        p = self.params(params)
        test_idx, _pool = global_split(p.test_fraction, seed)
        return _dataset(test_idx)


def build_mlp(hidden: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(NUM_FEATURES, hidden),
        nn.ReLU(),
        nn.Linear(hidden, NUM_CLASSES),
    )


def build_cnn(hidden: int) -> nn.Module:
    # The data stays flat (N, 64) for both models; the CNN reshapes it itself.
    return nn.Sequential(
        nn.Unflatten(1, (1, IMAGE_SIDE, IMAGE_SIDE)),
        nn.Conv2d(1, 16, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 8x8 -> 4x4
        nn.Flatten(),
        nn.Linear(32 * (IMAGE_SIDE // 2) ** 2, hidden),
        nn.ReLU(),
        nn.Linear(hidden, NUM_CLASSES),
    )


def data_file() -> Path:
    """The digits CSV bundled with scikit-learn, found without importing scikit-learn."""
    spec = importlib.util.find_spec("sklearn")  # finds the package, does not import it
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location).joinpath(*DATA_FILE)
        if candidate.is_file():
            return candidate
    if spec is None:
        raise FileNotFoundError("the digits task reads its data from scikit-learn, which is not installed")
    raise FileNotFoundError(f"no {'/'.join(DATA_FILE)} in the scikit-learn package at {locations}")


@lru_cache(maxsize=1)
def load_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Features in [0, 1] as float32 (N, 64) and int64 labels; loaded once per process.

    The same numbers as sklearn.datasets.load_digits(): one image a row, 64 pixel
    values then the label, comma-separated (tests/test_tasks_digits.py compares them).
    """
    path = data_file()
    with gzip.open(path, "rb") as stream:
        table = np.loadtxt(stream, delimiter=",", dtype=np.float64, ndmin=2)
    if table.shape[1] != NUM_FEATURES + 1 or len(table) < NUM_CLASSES:
        raise ValueError(f"{path}: expected rows of {NUM_FEATURES + 1} values, got an array of shape {table.shape}")
    features = (table[:, :-1] / MAX_PIXEL).astype(np.float32)
    labels = table[:, -1].astype(np.int64)
    return _read_only(features), _read_only(labels)


@lru_cache(maxsize=8)
def global_split(test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(server test indices, worker pool indices): stratified, seeded, disjoint, each sorted."""
    _features, labels = load_arrays()
    pool_idx, test_idx = stratified_split(labels, test_fraction, _derived_seed(seed, 0))
    return _read_only(test_idx), _read_only(pool_idx)


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split of range(len(labels)) into sorted (train, test) index arrays.

    The test set has ceil(test_fraction · n) samples (rounded up, as scikit-learn's
    train_test_split does). They are shared among the classes by largest remainder:
    class k with n_k samples gets floor(n_test · n_k / n), and the samples still missing
    go one each to the classes with the largest fractional parts (ties in random
    order), so every class's test count is within one of its exact share. Within each
    class the test samples are a uniformly random subset. Everything random comes from
    one NumPy generator seeded with `seed`, so the split depends on nothing else.
    """
    labels = np.asarray(labels)
    num_samples = len(labels)
    num_test = math.ceil(test_fraction * num_samples)
    if not 0 < num_test < num_samples:
        raise ValueError(
            f"test_fraction={test_fraction} of {num_samples} samples leaves an empty train or test set"
        )
    rng = np.random.default_rng(seed)
    classes, class_of_sample, class_sizes = np.unique(labels, return_inverse=True, return_counts=True)
    # Exact integer arithmetic: quota_k = num_test * n_k / n = floor_k + remainder_k / n.
    scaled = num_test * class_sizes
    test_counts, remainders = scaled // num_samples, scaled % num_samples
    missing = num_test - int(test_counts.sum())
    tie_break = rng.permutation(len(classes))
    # Largest remainder first, random order among equal remainders (lexsort: last key is primary).
    by_remainder = np.lexsort((tie_break, -remainders))
    test_counts[by_remainder[:missing]] += 1
    # Each of those classes had a positive remainder (they sum to `missing`, each < n), so
    # test_counts[k] <= n_k still holds.

    is_test = np.zeros(num_samples, dtype=bool)
    for k in range(len(classes)):
        members = np.flatnonzero(class_of_sample == k)
        is_test[rng.choice(members, size=int(test_counts[k]), replace=False)] = True
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def worker_indices(partition: int, num_partitions: int, p: DigitsParams, seed: int) -> np.ndarray:
    """Global sample indices of one worker's share of the pool."""
    return _partition_pool(num_partitions, p.partition, p.alpha, p.min_partition_size, p.test_fraction, seed)[
        partition
    ]


@lru_cache(maxsize=8)
def _partition_pool(
    num_partitions: int, kind: str, alpha: float, min_size: int, test_fraction: float, seed: int
) -> tuple[np.ndarray, ...]:
    _features, labels = load_arrays()
    _test_idx, pool_idx = global_split(test_fraction, seed)
    # A seed derived from the job seed so partitioning is not correlated with the test split.
    partition_seed = _derived_seed(seed, 1)
    pool_labels = labels[pool_idx]
    if kind == "iid":
        parts = iid_partition(pool_labels, num_partitions, partition_seed)
    else:
        parts = dirichlet_partition(pool_labels, num_partitions, alpha, partition_seed, min_size=min_size)
    # Read-only because the cache hands the same arrays to every caller.
    return tuple(_read_only(pool_idx[part]) for part in parts)


def split_worker_indices(
    indices: np.ndarray, val_fraction: float, seed: int, partition: int
) -> tuple[np.ndarray, np.ndarray]:
    """Random (train, val) split of one worker's indices; train keeps at least one sample."""
    rng = np.random.default_rng(_derived_seed(seed, 2, partition))
    shuffled = rng.permutation(indices)
    num_val = min(int(round(val_fraction * len(shuffled))), len(shuffled) - 1)
    return np.sort(shuffled[num_val:]), np.sort(shuffled[:num_val])


def _read_only(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


def _derived_seed(seed: int, *purpose: int) -> int:
    """An independent seed for one use of the job seed (NumPy's recommended way to spawn streams)."""
    return int(np.random.SeedSequence([seed % 2**32, *purpose]).generate_state(1)[0])


def _dataset(indices: np.ndarray) -> TensorDataset:
    features, labels = load_arrays()
    # Fancy indexing copies, so the cached arrays stay read-only and shared.
    return TensorDataset(torch.from_numpy(features[indices]), torch.from_numpy(labels[indices]))


task = DigitsTask()
