"""`fedbus worker` (WorkerService over a real nats-server) and `fedbus sim` (SimulatedWorker)
produce the same update for the same round.open, bit for bit; the deployed worker rejoins a
reopened round by resending, also after a restart from its state directory, and a
job.done replayed from an earlier run does not stop it."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import torch
from nats.js.api import DeliverPolicy

from fedbus.bus import Subjects, connect, ensure_job_infrastructure
from fedbus.crypto.envelopes import now_ms
from fedbus.crypto.keys import Identity
from fedbus.demo import write_federation
from fedbus.jobspec import JobSpec
from fedbus.messaging import Messenger, Received, verifier_for
from fedbus.protocol.messages import EvalOpen, JobDone, RoundOpen, Update
from fedbus.protocol.runs import new_run_id
from fedbus.tasks import load_task
from fedbus.worker.service import WorkerService
from fedbus.coordinator.rounds import OpenRound
from fedbus.transforms import decode_update
from fedbus.coordinator.announcements import round_open_message
from fedbus.worker.simulated import (ControlChannel, SimulatedWorker, receiver_pipeline,
                                     update_received)

pytestmark = pytest.mark.e2e

TASK = "fedbus.tasks.digits:task"
WAIT_S = 60.0


def job_for(strategy: dict) -> JobSpec:
    return JobSpec(job="parity", task=TASK, rounds=3, seed=5, task_params={"model": "mlp", "partition": "dirichlet"},
                   strategy=strategy, train={"epochs": 1},
                   cohort={"min_workers": 2, "min_updates": 2}, evaluation={"federated": True})


def round_inputs(job: JobSpec) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """A global model and, for SCAFFOLD, a non-zero server control variate."""
    torch.manual_seed(123)
    model = load_task(TASK).build_model(job.task_params)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    groups = {}
    if job.strategy.name == "scaffold":
        gen = torch.Generator().manual_seed(9)
        groups["scaffold"] = {k: 0.01 * torch.randn(v.shape, generator=gen) for k, v in state.items()
                              if v.is_floating_point()}
    return state, groups


class Coordinator:
    """The coordinator's side of the wire for these tests: signed control messages, verified updates."""

    def __init__(self, tmp_path, url: str, job: JobSpec, federation):
        self.url, self.job, self.federation = url, job, federation
        self.identity = Identity.load(tmp_path / "keys" / "coordinator.key")
        self.subjects = Subjects(job.job, prefix=job.transport.prefix)
        self.verifier = verifier_for(job, federation, receiver=self.identity)  # opens the sealed updates
        self.updates: asyncio.Queue = asyncio.Queue()
        self.reports: asyncio.Queue = asyncio.Queue()

    async def __aenter__(self):
        self.nc = await connect(self.url, name="test-coordinator")
        self.js = self.nc.jetstream()
        await ensure_job_infrastructure(self.js, self.subjects, replicas=1)
        self.messenger = Messenger(self.nc, self.js, self.identity, self.subjects,
                                   inline_max_bytes=self.job.transport.inline_max_bytes)
        self.sub = await self.js.subscribe(self.subjects.upd_all, ordered_consumer=True,
                                           deliver_policy=DeliverPolicy.NEW, cb=self.updates.put)
        self.metrics_sub = await self.js.subscribe(self.subjects.metrics_all, ordered_consumer=True,
                                                   deliver_policy=DeliverPolicy.NEW, cb=self.reports.put)
        return self

    async def __aexit__(self, *exc):
        with contextlib.suppress(Exception):
            await self.sub.unsubscribe()
            await self.metrics_sub.unsubscribe()
        await self.nc.close()

    async def send(self, fields, tensors=None, *, run: str | None):
        await self.messenger.publish(self.subjects.ctl(fields.TYPE), fields, tensors, round=getattr(fields, "round", 0),
                                     run=run)

    async def next_update(self) -> Received:
        msg = await asyncio.wait_for(self.updates.get(), WAIT_S)
        return await self.messenger.receive(self.verifier, msg.data)

    async def next_report(self) -> Received:
        msg = await asyncio.wait_for(self.reports.get(), WAIT_S)
        return await self.messenger.receive(self.verifier, msg.data)

    async def no_update(self, seconds: float) -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(self.updates.get(), seconds)


async def wait_until(predicate, timeout: float = WAIT_S) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


def start(service: WorkerService) -> asyncio.Task:
    return asyncio.create_task(service.run())


async def stop(task: asyncio.Task) -> None:
    task.cancel()
    with contextlib.suppress(BaseException):
        await task


def assert_same_update(fields_a: Update, tensors_a: dict, fields_b: Update, tensors_b: dict) -> None:
    assert fields_a == fields_b
    assert set(tensors_a) == set(tensors_b)
    for name in tensors_a:
        a, b = tensors_a[name], tensors_b[name]
        assert a.dtype == b.dtype and torch.equal(a, b), name


@pytest.mark.parametrize("strategy", [{"name": "scaffold"}, {"name": "fedprox", "mu": 0.1}])
def test_deployed_and_simulated_workers_send_identical_updates(nats_server, tmp_path, strategy):
    job = job_for(strategy)
    federation = write_federation(tmp_path, 3)
    run = new_run_id(now_ms())
    state, groups = round_inputs(job)
    # The round.open the simulator builds from the machine's OpenRound is the coordinator service's.
    opened = OpenRound(round=1, model_version=0, cohort=("w02",), deadline_ms=now_ms() + 600_000, state=state,
                       broadcast=groups)
    ro, tensors = round_open_message(job, opened)
    assert ro == RoundOpen(round=1, model_version=0, cohort=["w02"], deadline_ms=opened.deadline_ms,
                           train=job.train.model_dump(), evaluate=job.evaluation.federated)

    eo = EvalOpen(round=2, model_version=1, cohort=["w02"], deadline_ms=opened.deadline_ms)

    async def deployed() -> tuple[Received, Received]:
        service = WorkerService(job, federation, Identity.load(tmp_path / "keys" / "w02.key"), nats_server.url,
                                state_dir=tmp_path / "state-w02")
        async with Coordinator(tmp_path, nats_server.url, job, federation) as coord:
            task = start(service)
            try:
                await wait_until(lambda: service.follower is not None)
                await coord.send(ro, tensors, run=run)
                got = await coord.next_update()
                await coord.send(eo, state, run=run)
                report = await coord.next_report()
                await coord.send(JobDone(rounds_completed=1, model_version=1), run=run)
                assert await asyncio.wait_for(task, WAIT_S) == 0
            finally:
                await stop(task)
        return got, report

    got, report = asyncio.run(deployed())
    assert report.header.run == run and report.header.round == 2
    assert got.header.run == run and got.header.sender == "w02" and got.header.round == 1

    # The simulator's worker: same task module, same job, same position in the federation.
    worker = SimulatedWorker(load_task(TASK), job, "w02", partition=federation.partition_of("w02"),
                             num_partitions=len(federation.workers()))
    channel = ControlChannel(run)
    sent, = worker.receive(channel.message(ro, tensors, now_ms()))
    sim_report, = worker.receive(channel.message(eo, state, now_ms()))
    assert sim_report.run == run and sim_report.fields == report.fields
    assert sent.run == run and not sent.resend
    assert_same_update(got.fields, got.tensors, sent.fields, sent.tensors)
    # And what the machine is fed: the simulator's decode equals the receiving pipeline on the wire form.
    simulated = update_received(receiver_pipeline(job), "w02", sent, 0).update
    deployed = decode_update(receiver_pipeline(job), "w02", got.fields, got.tensors)
    assert simulated.num_samples == deployed.num_samples and simulated.num_steps == deployed.num_steps
    assert set(simulated.extra) == set(deployed.extra)
    for name, value in deployed.extra.items():
        other = simulated.extra[name]
        assert (value == other) if isinstance(value, float) else \
            all(torch.equal(value[k], other[k]) for k in value)
    assert got.fields.eval_samples > 0  # RoundOpen.evaluate was honoured on both sides
    if strategy["name"] == "scaffold":
        assert any(name.startswith("scaffold_delta_c/") for name in got.tensors)


def test_deployed_worker_rejoins_a_reopened_round_and_ignores_an_old_runs_job_done(nats_server, tmp_path):
    job = job_for({"name": "fedavg"})
    federation = write_federation(tmp_path, 2)
    old_run = new_run_id(now_ms() - 60_000)
    run = new_run_id(now_ms())
    state, _ = round_inputs(job)
    state_dir = tmp_path / "state-w01"

    def round_open(deadline_s: float) -> RoundOpen:
        return RoundOpen(round=4, model_version=3, cohort=["w01"], deadline_ms=now_ms() + int(deadline_s * 1000),
                         train=job.train.model_dump(), evaluate=False)

    async def scenario() -> None:
        identity = Identity.load(tmp_path / "keys" / "w01.key")
        async with Coordinator(tmp_path, nats_server.url, job, federation) as coord:
            # A job.done left on the control stream by an earlier run: a fresh worker must not exit.
            await coord.send(JobDone(rounds_completed=9, model_version=9), run=old_run)
            service = WorkerService(job, federation, identity, nats_server.url, state_dir=state_dir)
            task = start(service)
            try:
                await wait_until(lambda: service.follower is not None)
                await coord.send(round_open(600), state, run=run)
                first = await coord.next_update()
                assert first.header.run == run and service.rounds_trained == 1
                # The same old job.done replayed now (new nonce, as a fresh publish would have): still running.
                await coord.send(JobDone(rounds_completed=9, model_version=9), run=old_run)
                # A resumed coordinator reopens round 4 of the same run: the worker resends.
                await coord.send(round_open(600), state, run=run)
                again = await coord.next_update()
                assert again.header.nonce != first.header.nonce and again.header.run == run
                assert_same_update(first.fields, first.tensors, again.fields, again.tensors)
                assert service.rounds_trained == 1 and not task.done()
            finally:
                await stop(task)

            # Restarted from its state directory, the worker resends without training.
            restarted = WorkerService(job, federation, identity, nats_server.url, state_dir=state_dir)
            assert (run, 4) in restarted.core.sent
            task = start(restarted)
            try:
                await wait_until(lambda: restarted.follower is not None)
                await coord.send(round_open(600), state, run=run)
                third = await coord.next_update()
                assert_same_update(first.fields, first.tensors, third.fields, third.tensors)
                assert restarted.rounds_trained == 0
                await coord.send(JobDone(rounds_completed=4, model_version=4), run=run)
                assert await asyncio.wait_for(task, WAIT_S) == 0
            finally:
                await stop(task)

    asyncio.run(scenario())
