"""A data-path test task: P float32 parameters whose "training" adds an offset to each.

Used by ``benchmarks/big_payload.py`` (and tests) to measure what moving a model of a
given size costs, with training itself out of the picture: ``train`` adds
``offset`` to every parameter in place and takes no other step, so an update is the
global model plus ``offset`` and FedAvg of N such updates is the model plus ``offset``,
which makes a run's result checkable by arithmetic.

``task_params``: ``bytes`` (model size, default 4 MiB, rounded down to whole float32s),
``tensors`` (how many parameter tensors the size is split into, default 4), ``offset``
(default 0.001), ``samples`` (the size of each worker's nominal training set, default 8).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from fedbus.tasks.base import EvalResult, Task, TrainResult, TrainSettings, WorkerData, parse_task_params
from pydantic import BaseModel, ConfigDict, Field


class OffsetParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bytes: int = Field(4 * 1024 * 1024, ge=4, le=16 * 1024**3)
    tensors: int = Field(4, ge=1, le=1024)
    offset: float = 0.001
    samples: int = Field(8, ge=1, le=1_000_000)


class OffsetModel(nn.Module):
    """``tensors`` flat float32 parameters of about equal length, ``bytes`` in all."""

    def __init__(self, numel: int, tensors: int):
        super().__init__()
        base, extra = divmod(numel, tensors)
        # Zeros: allocated lazily by the OS until written, so a 1 GB model costs nothing
        # until it is loaded; any starting value does for an offset-only task.
        self.params = nn.ParameterList(
            nn.Parameter(torch.zeros(base + (1 if i < extra else 0))) for i in range(tensors))


class OffsetTask(Task):
    name = "offset"

    def _params(self, params: Mapping[str, Any] | None) -> OffsetParams:
        return parse_task_params(OffsetParams, params, self.name)

    def build_model(self, params: Mapping[str, Any] | None) -> nn.Module:
        p = self._params(params)
        model = OffsetModel(p.bytes // 4, p.tensors)
        model._offset = p.offset  # what train adds (train gets no task_params)
        return model

    def worker_data(self, partition: int, num_partitions: int, params: Mapping[str, Any] | None,
                    seed: int) -> WorkerData:
        n = self._params(params).samples
        x = torch.zeros(n, 1)
        return WorkerData(train=TensorDataset(x, torch.zeros(n, dtype=torch.long)),
                          val=TensorDataset(x[:0], torch.zeros(0, dtype=torch.long)))

    @torch.no_grad()
    def train(self, model: nn.Module, dataset: Dataset, settings: TrainSettings, seed: int,
              global_state=None, *, grad_correction=None, context=None) -> TrainResult:
        offset = float(getattr(model, "_offset", 0.001))
        for p in model.parameters():
            p.add_(offset)
        return TrainResult(num_samples=len(dataset), num_steps=1)  # type: ignore[arg-type]

    def evaluate(self, model: nn.Module, dataset: Dataset, *, context=None) -> EvalResult:
        return EvalResult(num_samples=0, loss=0.0, accuracy=0.0)


task = OffsetTask()
