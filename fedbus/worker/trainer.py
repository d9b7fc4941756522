"""LocalTrainer: what a worker does with one round, without any I/O.

Given the round's global model (plus any strategy extras the coordinator broadcast),
evaluate it on the held-out split, train locally, and produce the update: weights,
metrics, and the strategy's worker-side extras (FedNova's a_i, SCAFFOLD's Δc_i). The
NATS worker service and the in-process simulator both run this class, so simulation and
deployment train identically.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.data import TensorDataset

from fedbus.aggregation.fednova import fednova_a
from fedbus.aggregation.scaffold import DELTA_C, scaffold_client_update
from fedbus.jobspec import JobSpec
from fedbus.tasks import EvalResult, Task, TrainSettings
from fedbus.worker.attacks import Attack

SCAFFOLD_C = "scaffold"  # round.open carries a rule's broadcast under the rule's name


@dataclass
class LocalResult:
    num_samples: int
    num_steps: int
    train_metrics: dict[str, float]
    state: dict[str, torch.Tensor]
    extra_scalars: dict[str, float] = field(default_factory=dict)
    extra_groups: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


class LocalTrainer:
    def __init__(self, task: Task, job: JobSpec, *, partition: int, num_partitions: int, attack: Attack | None = None):
        self.task = task
        self.job = job
        self.attack = attack
        torch.manual_seed(job.seed)
        self.model = task.build_model(job.task_params)
        self.data = task.worker_data(partition=partition, num_partitions=num_partitions,
                                     params=job.task_params, seed=job.seed)
        if attack is not None and attack.poisons_data:
            self.data.train = self._flip_labels(self.data.train)
        self.strategy = job.strategy.name
        self.control: dict[str, torch.Tensor] = {}  # SCAFFOLD c_i, kept across rounds

    def _flip_labels(self, dataset):
        if not isinstance(dataset, TensorDataset):
            raise ValueError("label_flip needs a TensorDataset")
        x, y = dataset.tensors[:2]
        classes = getattr(self.task, "num_classes", None) or int(y.max()) + 1
        return TensorDataset(x, self.attack.poison_labels(y, classes), *dataset.tensors[2:])

    @property
    def num_samples(self) -> int:
        return len(self.data.train)

    def settings_for(self, round_settings: dict) -> TrainSettings:
        settings = TrainSettings.model_validate(round_settings)
        mu = getattr(self.job.strategy, "mu", None)
        if self.strategy == "fedprox" and mu is not None:
            settings = settings.model_copy(update={"proximal_mu": float(mu)})
        return settings

    def load(self, global_state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(global_state)

    def evaluate(self, dataset=None) -> EvalResult:
        return self.task.evaluate(self.model, self.data.val if dataset is None else dataset)

    def train(self, round_: int, global_state: dict[str, torch.Tensor],
              broadcast: dict[str, dict[str, torch.Tensor]], settings: TrainSettings) -> LocalResult:
        """Train from the already loaded global model; returns the update to send."""
        global_copy = {k: v.detach().clone() for k, v in global_state.items()}
        correction = None
        if self.strategy == "scaffold":
            c = broadcast.get(SCAFFOLD_C, {})
            params = dict(self.model.named_parameters())
            correction = {n: (c[n] - self.control[n]) if n in self.control else c[n].clone()
                          for n in params if n in c}
            for n, p in params.items():  # a parameter without a control variate gets none
                correction.setdefault(n, torch.zeros_like(p))
        result = self.task.train(self.model, self.data.train, settings, seed=self.job.seed * 1_000_003 + round_,
                                 global_state=global_copy if settings.proximal_mu > 0 else None,
                                 **({"grad_correction": correction} if correction is not None else {}))
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        out = LocalResult(result.num_samples, result.num_steps, {k: float(v) for k, v in result.metrics.items()}, state)
        steps = max(1, result.num_steps)
        if self.strategy == "fednova":
            out.extra_scalars["fednova_a"] = fednova_a(steps, settings.momentum, settings.proximal_mu, settings.lr)
        if self.strategy == "scaffold":
            # Option II's c_i+ = c_i - c + (x - y_i)/(K lr) assumes plain SGD; passing the local
            # optimizer's momentum and mu divides by lr * ||a_i||_1 instead (equal when both are 0).
            c = broadcast.get(SCAFFOLD_C, {})
            self.control, delta = scaffold_client_update(c, self.control, global_copy, state, steps, settings.lr,
                                                         momentum=settings.momentum,
                                                         proximal_mu=settings.proximal_mu)
            out.extra_groups[DELTA_C] = delta
        if self.attack is not None:
            out.state = self.attack.poison_update(global_copy, out.state, round_)
        return out
