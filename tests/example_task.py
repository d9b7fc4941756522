"""A user-defined task living outside fedbus, as a user would write one.

Synthetic, linearly separable 2-class data: each worker gets its own draw from
the same distribution. Only build_model and worker_data are written here; train
and evaluate are fedbus's defaults.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedbus.tasks import Task, WorkerData

NUM_FEATURES = 4
# The separating direction all workers share.
TRUE_WEIGHTS = torch.tensor([1.5, -2.0, 0.5, 1.0])


def _linear_data(num_samples: int, generator: torch.Generator) -> TensorDataset:
    features = torch.randn(num_samples, NUM_FEATURES, generator=generator)
    labels = (features @ TRUE_WEIGHTS > 0).long()
    return TensorDataset(features, labels)


class LinearTask(Task):
    name = "example-linear"

    def build_model(self, params):
        return nn.Linear(NUM_FEATURES, 2)

    def worker_data(self, partition, num_partitions, params, seed):
        samples = int((params or {}).get("samples_per_worker", 64))
        generator = torch.Generator().manual_seed(seed * 1000 + partition)
        return WorkerData(train=_linear_data(samples, generator), val=_linear_data(samples // 4, generator))


# The three forms load_task accepts.
task = LinearTask()


def make_task() -> Task:
    return LinearTask()


# Not tasks, for the loader's error messages.
not_a_task = 42


def make_something_else():
    return "not a task"


class NotATask:
    pass
