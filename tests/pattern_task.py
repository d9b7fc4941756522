"""A task whose every update is a known byte pattern, to look for it on the wire and on disk.

"Training" sets the model's one weight vector to a constant that depends only on the
worker's partition, so worker p's update is PATTERN_VALUES[p] repeated (4 recognisable
bytes, over a megabyte). FedAvg of two different constants is neither, so the models the
coordinator publishes never carry a worker's pattern: any occurrence of one outside the
worker is its update in the clear. The model is larger than the inline limit, so updates
travel through the Object Store (claim check).
"""

from __future__ import annotations

import struct

import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedbus.tasks import Task, TrainResult, WorkerData

NUM_FLOATS = 300_000  # 1.2 MB of float32: above transport.inline_max_bytes (512 KiB)
PATTERN_VALUES = (1.2345678, -7.654321, 3.1415927, -0.5772157)
SAMPLES = 8


def pattern_of(partition: int, repeats: int = 64) -> bytes:
    """The bytes worker ``partition``'s update is made of (``repeats`` floats of them)."""
    return struct.pack("<f", PATTERN_VALUES[partition]) * repeats


class PatternModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(NUM_FLOATS))


class PatternTask(Task):
    name = "pattern"

    def build_model(self, params):
        return PatternModel()

    def worker_data(self, partition, num_partitions, params, seed):
        # Only the sample count matters (the FedAvg weight); nothing is held out.
        return WorkerData(train=TensorDataset(torch.zeros(SAMPLES, 1), torch.zeros(SAMPLES, dtype=torch.long)),
                          val=TensorDataset(torch.zeros(0, 1), torch.zeros(0, dtype=torch.long)))

    def train(self, model, dataset, settings, seed, global_state=None, *, grad_correction=None, context=None):
        value = PATTERN_VALUES[context.partition if context is not None else 0]
        with torch.no_grad():
            model.weight.fill_(value)
        return TrainResult(num_samples=len(dataset), num_steps=1, metrics={"loss": 0.0})


task = PatternTask()
