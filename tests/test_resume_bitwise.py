"""A resumed SCAFFOLD + FedAdam job ends bit-identical to the same job run uninterrupted
(issue 7, acceptance 6), in process.

The coordinator is the real machine (``machine_for``), settled inline
(``fedbus.coordinator.inline``); the workers are the simulator's (``SimulatedWorker``: the
worker core, trainer and update pipeline a deployed worker runs), answering control
messages of one run. The job runs once without interruption. Then it runs again, and the
coordinator "dies" at a chosen point: everything it had not committed is dropped, the last
``Commit`` it proposed (record, model, strategy state) goes through what JobStateStore
persists (``flatten_state``, the tensor codec, JSON for the record and the leaf kinds) and
back, and a fresh machine continues from it with ``restore``. The workers live on, as in
a coordinator crash. After the restart the workers answer in the reverse order, so the
comparison also covers arrival order, which deterministic mode must not depend on.

Every tensor of the final model, and the server's SCAFFOLD c and Adam moments, must be
``torch.equal`` to the uninterrupted run's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import torch

from fedbus.coordinator.factory import machine_for
from fedbus.coordinator.inline import drive
from fedbus.coordinator.jobstate import MODEL_PREFIX, STRATEGY_PREFIX, flatten_state, unflatten_state
from fedbus.coordinator.records import JobRecord
from fedbus.coordinator.rounds import CloseRound, Commit, FinishJob, OpenRound, RejectUpdate, Start, WorkerSeen
from fedbus.jobspec import CohortSpec, JobSpec
from fedbus.protocol.codec import decode_tensors, encode_tensors
from fedbus.sim import worker_ids
from fedbus.tasks import load_task
from fedbus.coordinator.announcements import round_open_message
from fedbus.worker.simulated import (ControlChannel, SimulatedWorker, receiver_pipeline,
                                     sim_run_id, update_received)

NUM_WORKERS = 4
ROUNDS = 4


def scaffold_fedadam_job(*, deterministic: bool = True) -> JobSpec:
    return JobSpec(job="resume-bitwise", task="fedbus.tasks.digits:task", seed=7, rounds=ROUNDS,
                   task_params={"model": "mlp", "partition": "dirichlet", "alpha": 0.5},
                   deterministic=deterministic,
                   cohort=CohortSpec(min_workers=NUM_WORKERS, min_updates=NUM_WORKERS, wait_for_workers_s=60),
                   strategy={"name": "scaffold"},
                   server_optimizer={"name": "adam", "lr": 0.05},
                   train={"epochs": 1, "batch_size": 32, "lr": 0.05},
                   evaluation={"server_test": False, "federated": True, "final_round": False})


class RecordingMachine:
    """The machine, with every Commit it proposes kept: what a service would have persisted."""

    def __init__(self, machine):
        self.machine = machine
        self.commits: list[Commit] = []

    def handle(self, event):
        actions = self.machine.handle(event)
        self.commits += [a for a in actions if isinstance(a, Commit)]
        return actions


def through_storage(commit: Commit) -> tuple[JobRecord, dict, dict]:
    """What a resumed coordinator loads for ``commit``: the same encoding JobStateStore uses."""
    tensors, kinds = flatten_state(commit.strategy_state, STRATEGY_PREFIX)
    tensors.update({f"{MODEL_PREFIX}{k}": v for k, v in commit.model.items()})
    data = encode_tensors(tensors)
    doc = json.loads(json.dumps({"record": commit.record.as_dict(), "strategy_kinds": kinds}, sort_keys=True))
    back = dict(decode_tensors(data))
    model = {k[len(MODEL_PREFIX):]: v for k, v in back.items() if k.startswith(MODEL_PREFIX)}
    strategy = unflatten_state(back, doc["strategy_kinds"]).get("strategy", {})
    return JobRecord.from_dict(doc["record"]), model, strategy


@dataclass
class Outcome:
    state: dict
    strategy_state: dict
    rounds: list[tuple[int, str, tuple[str, ...]]] = field(default_factory=list)
    rejected: dict = field(default_factory=dict)
    finished: str = ""
    resumed: bool = False


def run_job(job: JobSpec, *, crash: tuple[int, str] | None = None) -> Outcome:
    """Run ``job`` to the end. ``crash=(k, "between_rounds")``: the coordinator dies right after
    committing round k's close (round k+1 opened in storage, never announced);
    ``(k, "mid_round")``: it dies after round k+1 was announced and half of the cohort answered."""
    task = load_task(job.task)
    ids = worker_ids(NUM_WORKERS)
    workers = {wid: SimulatedWorker(task, job, wid, partition=i, num_partitions=NUM_WORKERS)
               for i, wid in enumerate(ids)}
    control = ControlChannel(sim_run_id(job))
    receiver = receiver_pipeline(job)
    torch.manual_seed(job.seed)
    initial = {k: v.detach().clone() for k, v in task.build_model(job.task_params).state_dict().items()}
    machine = RecordingMachine(machine_for(job, initial, NUM_WORKERS))
    clock = 0
    resumed = False
    out = Outcome(state={}, strategy_state={})

    def tick() -> int:
        nonlocal clock
        clock += 1
        return clock

    def start(m) -> list:
        pending = drive(m, Start(tick()))
        for wid in ids:
            pending += drive(m, WorkerSeen(wid, workers[wid].num_samples, tick()))
        return pending

    def answer(m, action: OpenRound, who) -> list:
        message = control.message(*round_open_message(job, action), clock)
        pending = []
        for wid in who:
            for sent in workers[wid].receive(message):
                pending += drive(m, update_received(receiver, wid, sent, tick()))
        return pending

    def restart(old: RecordingMachine) -> tuple[RecordingMachine, list]:
        record, model, strategy = through_storage(old.commits[-1])
        fresh = RecordingMachine(machine_for(job, {k: v.clone() for k, v in initial.items()}, NUM_WORKERS))
        fresh.machine.restore(record, model, strategy)
        return fresh, start(fresh)

    pending = start(machine)
    while pending:
        action = pending.pop(0)
        match action:
            case OpenRound():
                order = list(reversed(action.cohort)) if resumed else list(action.cohort)
                if crash and not resumed and crash[1] == "mid_round" and action.round == crash[0] + 1:
                    answer(machine, action, order[: len(order) // 2])  # reach the machine, never committed
                    machine, pending = restart(machine)
                    resumed = True
                    continue
                pending += answer(machine, action, order)
            case CloseRound():
                out.rounds.append((action.round, action.status, action.accepted))
                if crash and not resumed and crash[1] == "between_rounds" and action.round == crash[0]:
                    # Dies right after the commit: the next round.open was never published.
                    machine, pending = restart(machine)
                    resumed = True
            case RejectUpdate():
                raise AssertionError(f"unexpected rejection: {action}")
            case FinishJob():
                out.finished = action.reason
    out.state = machine.machine.state
    out.strategy_state = machine.machine.strategy_state()
    out.rejected = dict(machine.machine.rejections)
    out.resumed = resumed
    return out


def assert_bit_identical(a: dict, b: dict, what: str) -> None:
    assert set(a) == set(b), f"{what}: keys differ"
    for key in a:
        if isinstance(a[key], dict):
            assert_bit_identical(a[key], b[key], f"{what}/{key}")
        elif isinstance(a[key], torch.Tensor):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), \
                f"{what}/{key} differs (max abs diff {(a[key].double() - b[key].double()).abs().max().item()})"
        else:
            assert a[key] == b[key], f"{what}/{key}: {a[key]!r} != {b[key]!r}"


@pytest.fixture(scope="module")
def uninterrupted() -> Outcome:
    out = run_job(scaffold_fedadam_job())
    assert out.finished == "completed" and [r[1] for r in out.rounds] == ["aggregated"] * ROUNDS
    return out


@pytest.mark.parametrize("crash", [(1, "between_rounds"), (2, "between_rounds"), (2, "mid_round")],
                         ids=lambda c: f"{c[1]}-after-round-{c[0]}")
def test_resumed_scaffold_fedadam_job_is_bit_identical(uninterrupted, crash):
    resumed = run_job(scaffold_fedadam_job(), crash=crash)
    assert resumed.resumed and resumed.finished == "completed"
    assert [r[:2] for r in resumed.rounds] == [(r, "aggregated") for r in range(1, ROUNDS + 1)]
    assert resumed.rejected == {}
    # The server state really is there (not trivially equal because empty).
    assert {"rule", "optimizer"} <= set(uninterrupted.strategy_state)
    assert any(k.startswith("c/") for k in uninterrupted.strategy_state["rule"])
    assert uninterrupted.strategy_state["optimizer"]["t"] == ROUNDS
    assert_bit_identical(uninterrupted.state, resumed.state, "model")
    assert_bit_identical(uninterrupted.strategy_state, resumed.strategy_state, "strategy")


def test_strategy_state_survives_the_commit_encoding(uninterrupted):
    """The SCAFFOLD c and FedAdam moments a commit carries load back into fresh rule and
    optimizer objects unchanged (their keys contain '/', as flatten_state's separator does)."""
    job = scaffold_fedadam_job()
    out = uninterrupted
    task = load_task(job.task)
    torch.manual_seed(job.seed)
    initial = {k: v.detach().clone() for k, v in task.build_model(job.task_params).state_dict().items()}
    fake_commit = Commit(1, JobRecord(round=ROUNDS, phase="done", model_version=ROUNDS, rounds_completed=ROUNDS),
                         out.state, out.strategy_state)
    _, model, strategy = through_storage(fake_commit)
    target = machine_for(job, initial, NUM_WORKERS)
    target._load_strategy_state(strategy)
    assert_bit_identical(out.strategy_state, target.strategy_state(), "strategy")
    assert_bit_identical(out.state, model, "model")
