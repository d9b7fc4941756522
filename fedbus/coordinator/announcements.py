"""The wire form of what the coordinator announces: one builder, used by the NATS service
and by ``fedbus sim``, so a simulated worker receives exactly what a deployed one does."""

from __future__ import annotations

from fedbus.coordinator.rounds import OpenEval, OpenRound
from fedbus.jobspec import JobSpec
from fedbus.protocol.codec import Tensor
from fedbus.protocol.messages import EvalOpen, RoundOpen
from fedbus.protocol.tensor_groups import join_groups


def round_open_message(job: JobSpec, a: OpenRound) -> tuple[RoundOpen, dict[str, Tensor]]:
    """The round.open body and tensors (the model and the strategy's groups) for ``a``."""
    body = RoundOpen(round=a.round, model_version=a.model_version, cohort=list(a.cohort), deadline_ms=a.deadline_ms,
                     train=job.train.model_dump(), evaluate=job.evaluation.federated, declared=list(a.declared))
    return body, join_groups(a.state, a.broadcast)


def eval_open_message(a: OpenEval) -> tuple[EvalOpen, dict[str, Tensor]]:
    body = EvalOpen(round=a.round, model_version=a.model_version, cohort=list(a.cohort), deadline_ms=a.deadline_ms)
    return body, dict(a.state)
