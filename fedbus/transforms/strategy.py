"""Strategies' client steps: the one place that maps a strategy name to what a worker does.

- FedProx: a training setting (mu in the local objective), nothing added to the update.
- FedNova: the update carries a_i = ||a_i||_1 of the local optimizer (``fednova_a``).
- SCAFFOLD (option II): train with the gradient correction c - c_i, then update the
  kept control variate c_i and send Δc_i (``scaffold_client_update``).
Every other strategy needs no client step.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import ClassVar

import torch

from fedbus.aggregation.fednova import fednova_a
from fedbus.aggregation.scaffold import DELTA_C, scaffold_client_update
from fedbus.jobspec import JobSpec
from fedbus.tasks import TrainingContext
from fedbus.transforms.base import LocalUpdate, State, TrainPlan, Transform, UpdateContext

SCAFFOLD_C = "scaffold"  # round.open carries a rule's broadcast under the rule's name


class FedProxStep(Transform):
    name: ClassVar[str] = "fedprox"

    def __init__(self, mu: float):
        self.mu = float(mu)

    def prepare(self, ctx, broadcast, model_params, plan: TrainPlan) -> TrainPlan:
        plan.settings = plan.settings.model_copy(update={"proximal_mu": self.mu})
        return plan


class FedNovaStep(Transform):
    name: ClassVar[str] = "fednova"

    def apply(self, ctx: UpdateContext, update: LocalUpdate) -> LocalUpdate:
        s = ctx.settings
        a_i = fednova_a(max(1, update.num_steps), s.momentum, s.proximal_mu, s.lr)
        return update.with_(extra_scalars={**update.extra_scalars, "fednova_a": a_i})


class ScaffoldStep(Transform):
    """Keeps c_i across rounds (per job; the service persists it per run)."""

    name: ClassVar[str] = "scaffold"

    def __init__(self) -> None:
        self.control: State = {}  # c_i; empty means 0 (a client's first round)

    def prepare(self, ctx: TrainingContext, broadcast: Mapping[str, Mapping[str, torch.Tensor]],
                model_params: Iterable[tuple[str, torch.Tensor]], plan: TrainPlan) -> TrainPlan:
        c = broadcast.get(SCAFFOLD_C, {})
        correction = {}
        for n, p in model_params:
            if n in c:
                correction[n] = (c[n] - self.control[n]) if n in self.control else c[n].clone()
            else:  # a parameter without a control variate gets none
                correction[n] = torch.zeros_like(p)
        plan.train_kwargs["grad_correction"] = correction
        return plan

    def apply(self, ctx: UpdateContext, update: LocalUpdate) -> LocalUpdate:
        # Option II's c_i+ = c_i - c + (x - y_i)/(K lr) assumes plain SGD; passing the local
        # optimizer's momentum and mu divides by lr * ||a_i||_1 instead (equal when both are 0).
        s = ctx.settings
        c = ctx.broadcast.get(SCAFFOLD_C, {})
        self.control, delta = scaffold_client_update(c, self.control, ctx.global_state, update.state,
                                                     max(1, update.num_steps), s.lr, momentum=s.momentum,
                                                     proximal_mu=s.proximal_mu)
        return update.with_(extra_groups={**update.extra_groups, DELTA_C: delta})

    def state_dict(self) -> dict[str, State]:
        return {"control": dict(self.control)} if self.control else {}

    def load_state_dict(self, state) -> None:
        self.control = {k: v.clone() for k, v in (state.get("control") or {}).items()}


def strategy_client_step(job: JobSpec) -> Transform | None:
    """The single strategy-name -> client transform mapping."""
    name = job.strategy.name
    if name == "fedprox":
        mu = getattr(job.strategy, "mu", None)
        return FedProxStep(mu) if mu is not None else None
    if name == "fednova":
        return FedNovaStep()
    if name == "scaffold":
        return ScaffoldStep()
    return None
