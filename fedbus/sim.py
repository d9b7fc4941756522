"""In-process simulation: the same coordinator machine and worker core, no bus.

Researchers run a job spec with many simulated clients on one machine; the coordinator
core and the workers' core, trainer and update pipeline are exactly those of a
deployment (``fedbus.worker.simulated``: each simulated worker has its own task object
and the training context a deployed worker would have), only the transport (and its
verification) is replaced by direct calls, and time is virtual, so a run is
deterministic for a seed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fedbus.coordinator.factory import machine_for
from fedbus.coordinator.inline import drive
from fedbus.coordinator.rounds import (
    CloseRound,
    FinishJob,
    OpenEval,
    OpenRound,
    RejectUpdate,
    Start,
    Tick,
    WorkerSeen,
)
from fedbus.jobspec import JobSpec
from fedbus.tasks import load_task
from fedbus.coordinator.announcements import eval_open_message, round_open_message
from fedbus.worker.attacks import Attack
from fedbus.worker.simulated import (
    ControlChannel,
    SimulatedWorker,
    eval_received,
    receiver_pipeline,
    sim_run_id,
    update_received,
)


@dataclass
class SimResult:
    rounds: list[dict] = field(default_factory=list)
    final: dict[str, float] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    reason: str = ""
    wall_seconds: float = 0.0

    def rounds_to(self, accuracy: float) -> int | None:
        for r in self.rounds:
            if r.get("test_accuracy", 0.0) >= accuracy:
                return r["model_version"]
        return None


def worker_ids(n: int) -> list[str]:
    width = max(2, len(str(n)))
    return [f"w{i + 1:0{width}d}" for i in range(n)]


def simulate(job: JobSpec, num_workers: int, *, attacks: dict[int, Attack] | None = None,
             stragglers: frozenset[int] | set[int] = frozenset(),
             on_round: Callable[[dict], None] | None = None) -> SimResult:
    """Run ``job`` with ``num_workers`` in-process workers; ``attacks`` maps worker index to an attack.

    ``stragglers`` are worker indices that stay alive (they heartbeat and are selected) but
    never deliver an update: a round that selected one closes at its deadline, with the
    updates that arrived if they reach ``min_updates``.
    """
    started = time.perf_counter()
    task = load_task(job.task)
    ids = worker_ids(num_workers)
    silent = {ids[i] for i in stragglers}
    trainers = {wid: SimulatedWorker(task, job, wid, partition=i, num_partitions=num_workers,
                                     attack=(attacks or {}).get(i)) for i, wid in enumerate(ids)}
    control = ControlChannel(sim_run_id(job))
    receiver = receiver_pipeline(job)
    torch.manual_seed(job.seed)
    model = task.build_model(job.task_params)
    test_data = task.server_test_data(job.task_params, job.seed) if job.evaluation.server_test else None
    machine = machine_for(job, {k: v.detach().clone() for k, v in model.state_dict().items()}, num_workers)
    clock = 0
    result = SimResult()

    def tick() -> int:
        nonlocal clock
        clock += 1
        return clock

    def server_eval(state) -> dict[str, float]:
        if test_data is None:
            return {}
        model.load_state_dict(state)
        ev = task.evaluate(model, test_data)
        return {"test_loss": float(ev.loss), "test_accuracy": float(ev.accuracy)}

    pending = drive(machine, Start(tick()))
    for wid in ids:
        pending += drive(machine, WorkerSeen(wid, trainers[wid].num_samples, tick()))
    while pending:
        action = pending.pop(0)
        match action:
            case OpenRound():
                message = control.message(*round_open_message(job, action), clock)
                for wid in action.cohort:
                    if wid not in silent:
                        pending += _train_one(machine, trainers[wid], message, receiver, tick)
                if silent & set(action.cohort):
                    # Virtual time jumps to the deadline; every worker heartbeats on the way.
                    clock = max(clock, action.deadline_ms)
                    for wid in ids:
                        pending += drive(machine, WorkerSeen(wid, trainers[wid].num_samples, tick()))
                    pending += drive(machine, Tick(tick()))
            case CloseRound():
                metrics = {**action.metrics, **(server_eval(action.state) if action.status == "aggregated" else {})}
                row = {"round": action.round, "model_version": action.model_version, "status": action.status,
                       "accepted": len(action.accepted), **metrics}
                result.rounds.append(row)
                if on_round:
                    on_round(row)
            case OpenEval():
                message = control.message(*eval_open_message(action), clock)
                for wid in action.cohort:
                    for sent in trainers[wid].receive(message):
                        pending += drive(machine, eval_received(wid, sent, tick()))
            case RejectUpdate():
                pass
            case FinishJob():
                result.reason = action.reason
                result.final = {**server_eval(machine.state), **action.metrics}
    result.rejected = dict(machine.rejections)
    result.wall_seconds = time.perf_counter() - started
    return result


def _train_one(machine, worker: SimulatedWorker, message, receiver, tick) -> list:
    """One simulated worker answers a round.open exactly as a deployed one (RoundOpen.evaluate included)."""
    out = []
    for sent in worker.receive(message):
        out += drive(machine, update_received(receiver, worker.worker_id, sent, tick()))
    return out
