"""Built-in task: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes).

Small enough that a federated round of 10 workers takes milliseconds, real enough
that non-IID partitions visibly hurt. No download: the data ships with scikit-learn.

Data flow for a job seed s:
  all samples --stratified split(s)--> server test set (coordinator only)
                                   \\-> pool --partition(s)--> worker i --split(s, i)--> train / val
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
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


@lru_cache(maxsize=1)
def load_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Features in [0, 1] as float32 (N, 64) and int64 labels; loaded once per process."""
    # Imported here so that `import fedbus.tasks` does not pay for importing scikit-learn.
    from sklearn.datasets import load_digits

    bunch = load_digits()
    features = (bunch.data / MAX_PIXEL).astype(np.float32)
    labels = bunch.target.astype(np.int64)
    return _read_only(features), _read_only(labels)


@lru_cache(maxsize=8)
def global_split(test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(server test indices, worker pool indices): stratified, seeded, disjoint."""
    from sklearn.model_selection import train_test_split

    _features, labels = load_arrays()
    pool_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, stratify=labels, random_state=seed % 2**32
    )
    return _read_only(np.sort(test_idx)), _read_only(np.sort(pool_idx))


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
