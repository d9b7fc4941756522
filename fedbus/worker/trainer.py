"""LocalTrainer: runs the worker core's Train and Evaluate actions, without any I/O.

Given the round's global model (plus any strategy extras the coordinator broadcast), it
evaluates the model on the held-out split when asked, trains locally with the task, and
passes the result through the job's update pipeline (``fedbus.transforms``: strategy
client step, clipping, the test-only attack, encoding). The NATS worker service and the
in-process simulator both run this class with the same actions, so simulation and
deployment train identically. Strategy-specific behaviour lives in the pipeline only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import TensorDataset

from fedbus.jobspec import JobSpec
from fedbus.tasks import (EvalResult, Task, TrainingContext, TrainSettings, call_evaluate, call_train,
                          training_context)
from fedbus.transforms import LocalUpdate, Pipeline, TrainPlan, UpdateContext, build_worker_pipeline
from fedbus.transforms.strategy import SCAFFOLD_C, ScaffoldStep
from fedbus.protocol.messages import EvalReport, finite_metrics
from fedbus.worker.attacks import Attack
from fedbus.worker.core import UPDATE_ALIAS_MIN_BYTES, Evaluate, EvaluationFinished, Train, TrainingFinished

__all__ = ["SCAFFOLD_C", "LocalTrainer"]


class LocalTrainer:
    def __init__(self, task: Task, job: JobSpec, *, worker_id: str, partition: int, num_partitions: int,
                 attack: Attack | None = None, pipeline: Pipeline | None = None,
                 state_loader: Callable[[str | None], dict] | None = None, model: torch.nn.Module | None = None):
        self.task = task
        self.job = job
        self.worker_id = worker_id
        self.partition = partition
        self.num_partitions = num_partitions
        self.attack = attack
        torch.manual_seed(job.seed)
        # ``model``: a module shared with other trainers of this process (a worker pool, the
        # simulator), which the caller trains one at a time; every Train / Evaluate loads
        # the received model into it first.
        self.model = model if model is not None else task.build_model(job.task_params)
        # A large update may alias the module's own tensors only when no other trainer loads
        # models into that module before this one's update has been sent (see train below).
        self.owns_model = model is None
        self.data = task.worker_data(partition=partition, num_partitions=num_partitions,
                                     params=job.task_params, seed=job.seed)
        if attack is not None and attack.poisons_data:
            self.data.train = self._flip_labels(self.data.train)
        self.pipeline = pipeline if pipeline is not None else build_worker_pipeline(job, attack=attack)
        # Per-run pipeline state (SCAFFOLD's c_i): a new coordinator run starts from fresh
        # server state, so the worker's state is per run too; the service loads a
        # persisted run's state from its state directory, the simulator has none.
        self.state_loader = state_loader or (lambda run: {})
        self.state_run: str | None = None

    def _flip_labels(self, dataset):
        if not isinstance(dataset, TensorDataset):
            raise ValueError("label_flip needs a TensorDataset")
        x, y = dataset.tensors[:2]
        classes = getattr(self.task, "num_classes", None) or int(y.max()) + 1
        return TensorDataset(x, self.attack.poison_labels(y, classes), *dataset.tensors[2:])

    @property
    def num_samples(self) -> int:
        return len(self.data.train)

    @property
    def control(self) -> dict[str, torch.Tensor]:
        """SCAFFOLD's c_i (empty for other strategies)."""
        step = next((t for t in self.pipeline.transforms if isinstance(t, ScaffoldStep)), None)
        return step.control if step is not None else {}

    def context(self, round_: int, run: str | None = None) -> TrainingContext:
        return training_context(job_seed=self.job.seed, run=run, worker_id=self.worker_id, partition=self.partition,
                                num_partitions=self.num_partitions, round_=round_)

    def settings_for(self, round_settings: dict) -> TrainSettings:
        """The settings local training will use: the round's, as the pipeline adjusts them (FedProx's mu)."""
        plan = self.pipeline.prepare(self.context(0), {}, list(self.model.named_parameters()),
                                     TrainPlan(TrainSettings.model_validate(round_settings)))
        return plan.settings

    def load(self, global_state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(global_state)

    def evaluate(self, dataset=None, context: TrainingContext | None = None) -> EvalResult:
        return call_evaluate(self.task, self.model, self.data.val if dataset is None else dataset, context=context)

    def train(self, round_: int, global_state: dict[str, torch.Tensor],
              broadcast: dict[str, dict[str, torch.Tensor]], settings: TrainSettings, *,
              context: TrainingContext | None = None, base_version: int = 0,
              eval_metrics: dict[str, float] | None = None, eval_samples: int = 0) -> LocalUpdate:
        """Train from the already loaded global model and run the pipeline; returns the encoded update."""
        ctx = context if context is not None else self.context(round_)
        plan = self.pipeline.prepare(ctx, broadcast, list(self.model.named_parameters()), TrainPlan(settings))
        # Only the task's train could modify what it is given (FedProx's anchor): a copy for it
        # alone; the transforms read the global model and never modify it (UpdateContext).
        anchor = ({k: v.detach().clone() for k, v in global_state.items()} if plan.settings.proximal_mu > 0 else None)
        result = call_train(self.task, self.model, self.data.train, plan.settings, context=ctx,
                            global_state=anchor, **plan.train_kwargs)
        live = self.model.state_dict()
        if self.owns_model and sum(v.numel() * v.element_size() for v in live.values()) >= UPDATE_ALIAS_MIN_BYTES:
            # A large model's update is the model's own tensors, not a copy: valid until the
            # next load, and the worker core lets go of a large sent update before any (core.py).
            state = {k: v.detach() for k, v in live.items()}
        else:
            state = {k: v.detach().clone() for k, v in live.items()}
        update = LocalUpdate(round=round_, base_version=base_version, state=state, num_samples=result.num_samples,
                             num_steps=result.num_steps, train_metrics={k: float(v) for k, v in result.metrics.items()},
                             eval_metrics=dict(eval_metrics or {}), eval_samples=eval_samples)
        uctx = UpdateContext(training=ctx, settings=plan.settings, global_state=global_state, broadcast=broadcast,
                             base_version=base_version)
        return self.pipeline.apply(uctx, update)

    # -- the core's actions ------------------------------------------------------------------

    def run_train(self, action: Train) -> TrainingFinished:
        """Execute a Train action: load, evaluate if asked, train, pipeline. Blocking (run it in a thread)."""
        if action.run != self.state_run:
            self.pipeline.load_state_dict(self.state_loader(action.run))
            self.state_run = action.run
        self.load(action.model)
        # The received tensors are the round's global model and a copy of their own (decoded
        # from the fetched body): no clone needed, and transforms never modify it.
        global_state = dict(action.model)
        eval_metrics, eval_samples = {}, 0
        if action.evaluate and len(self.data.val) > 0:
            ev = self.evaluate(context=action.context)
            eval_metrics, eval_samples = {"loss": float(ev.loss), "accuracy": float(ev.accuracy)}, ev.num_samples
        settings = TrainSettings.model_validate(action.settings)
        update = self.train(action.round, global_state, action.broadcast, settings, context=action.context,
                            base_version=action.base_version, eval_metrics=eval_metrics, eval_samples=eval_samples)
        assert update.fields is not None and update.tensors is not None  # Encode is always last
        return TrainingFinished(action.run, action.round, update.fields, update.tensors, action.trace)

    def run_evaluate(self, action: Evaluate) -> EvaluationFinished:
        self.load(action.model)
        ev = self.evaluate(context=action.context)
        report = EvalReport(round=action.round, model_version=action.model_version, num_samples=ev.num_samples,
                            metrics=finite_metrics({"loss": float(ev.loss), "accuracy": float(ev.accuracy)}))
        return EvaluationFinished(action.run, action.round, report, action.trace)
