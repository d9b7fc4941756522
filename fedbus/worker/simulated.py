"""The worker side of ``fedbus sim``: a deployed worker minus the transport.

Each simulated worker has its own task object (a deep copy of the loaded task, as a
deployed worker loads its own), its own ``LocalTrainer`` and its own ``WorkerCore``, and
receives the control messages a deployed worker would: the same ``RoundOpen`` /
``EvalOpen`` bodies and tensors the coordinator service publishes, under a run id. What
comes back is the core's ``PublishUpdate`` / ``PublishEvalReport`` (the encoded update,
exactly what a deployed worker seals), which the simulator decodes with the receiving
half of the pipeline.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Mapping

import torch

from fedbus.coordinator.rounds import EvalReceived, UpdateReceived
from fedbus.jobspec import JobSpec
from fedbus.protocol.codec import Tensor, spec_of
from fedbus.protocol.messages import Body
from fedbus.tasks import Task
from fedbus.transforms import Pipeline, build_worker_pipeline, decode_update
from fedbus.worker.attacks import Attack
from fedbus.worker.core import (
    ControlVerified,
    Evaluate,
    PublishEvalReport,
    PublishUpdate,
    Train,
    WorkerCore,
)
from fedbus.worker.trainer import LocalTrainer


def sim_run_id(job: JobSpec) -> str:
    """A fixed run id per (job, seed), so a simulation is reproducible (training seeds include the run)."""
    tag = hashlib.blake2b(f"{job.job}\x1f{job.seed}".encode(), digest_size=4).hexdigest()
    return f"r0-{tag}"


class ControlChannel:
    """Stands in for the control stream: numbers each message (its nonce) once, for every receiver."""

    def __init__(self, run: str | None):
        self.run = run
        self._count = 0

    def message(self, fields: Body, tensors: Mapping[str, Tensor] | None, now_ms: int) -> ControlVerified:
        self._count += 1
        nonce = hashlib.blake2b(f"sim-control-{self._count}".encode(), digest_size=16).digest()
        round_ = getattr(fields, "round", 0)
        return ControlVerified(fields, tensors, self.run, round_, nonce, now_ms, now_ms)


class SimulatedWorker:
    def __init__(self, task: Task, job: JobSpec, worker_id: str, *, partition: int, num_partitions: int,
                 attack: Attack | None = None, shared_model: torch.nn.Module | None = None,
                 keep_sent: bool = True):
        self.worker_id = worker_id
        self.keep_sent = keep_sent
        self.trainer = LocalTrainer(copy.deepcopy(task), job, worker_id=worker_id, partition=partition,
                                    num_partitions=num_partitions, attack=attack)
        if shared_model is not None:
            # Simulated workers train one at a time and every Train / Evaluate loads the
            # received model into the trainer's module first, so one module (and its
            # gradients) can serve them all: 1,000 workers need not hold 1,000 models.
            self.trainer.model = shared_model
        self.core = WorkerCore(worker_id, partition, num_partitions, job.seed, spec_of(self.trainer.model.state_dict()),
                               deterministic=job.deterministic)

    @property
    def num_samples(self) -> int:
        return self.trainer.num_samples

    def receive(self, event: ControlVerified) -> list[PublishUpdate | PublishEvalReport]:
        """Run the core on one control message, and the work it asks for, to what it would publish."""
        out: list[PublishUpdate | PublishEvalReport] = []
        pending = self.core.handle(event)
        while pending:
            action = pending.pop(0)
            if isinstance(action, Train):
                pending += self.core.handle(self.trainer.run_train(action))
            elif isinstance(action, Evaluate):
                pending += self.core.handle(self.trainer.run_evaluate(action))
            elif isinstance(action, (PublishUpdate, PublishEvalReport)):
                out.append(action)
            # Ignore / Reject / Exit: nothing to publish
        # A deployed core keeps its last few sent updates to resend them to a resumed
        # coordinator; ``fedbus sim`` never resumes one, and 1,000 workers x a few models
        # each is memory for nothing (keep_sent=False). Resume tests keep them.
        if not self.keep_sent:
            self.core.sent.clear()
        return out


def update_received(receiver: Pipeline, worker_id: str, sent: PublishUpdate, now_ms: int,
                    base: Mapping[str, torch.Tensor] | None = None) -> UpdateReceived:
    """What the coordinator's machine sees for an update: the receiving half of the pipeline
    (``base``: the model of the update's base version, which compressed deltas need)."""
    fields = sent.fields
    return UpdateReceived(worker_id=worker_id, round=sent.round, base_version=fields.base_version,
                          update=decode_update(receiver, worker_id, fields, sent.tensors, base), now_ms=now_ms,
                          train_metrics=dict(fields.train_metrics), eval_metrics=dict(fields.eval_metrics),
                          eval_samples=fields.eval_samples)


def eval_received(worker_id: str, sent: PublishEvalReport, now_ms: int) -> EvalReceived:
    f = sent.fields
    return EvalReceived(worker_id, sent.round, f.num_samples, dict(f.metrics), now_ms)


def receiver_pipeline(job: JobSpec) -> Pipeline:
    return build_worker_pipeline(job)
