"""The sans-I/O worker core (run binding, rejoin), training context and seeds, the update
pipeline, the worker's state directory, and the simulator's worker side."""

from __future__ import annotations

import os

import pytest
import torch

from fedbus.jobspec import JobSpec
from fedbus.protocol.codec import spec_of
from fedbus.protocol.messages import EvalOpen, JobDone, RoundClose, RoundOpen, Update
from fedbus.protocol.runs import new_run_id
from fedbus.sim import simulate
from fedbus.tasks import TrainSettings, derive_seed, load_task, training_context
from fedbus.tasks.digits import DigitsTask
from fedbus.transforms import build_worker_pipeline, decode_update
from fedbus.transforms.base import LocalUpdate, UpdateContext
from fedbus.transforms.clip import ClipUpdateNorm
from fedbus.worker.core import (
    ControlVerified,
    Evaluate,
    Exit,
    Ignore,
    PublishEvalReport,
    PublishUpdate,
    Reject,
    SentUpdate,
    Train,
    TrainingFinished,
    WorkerCore,
    WorkFailed,
)
from fedbus.worker.simulated import ControlChannel, SimulatedWorker
from fedbus.worker.state import WorkerStateStore
from fedbus.worker.trainer import LocalTrainer

TASK = "fedbus.tasks.digits:task"
MODEL = {"w": torch.zeros(3), "b": torch.zeros(1)}
RUN_OLD = "r1000-00000001"
RUN_NEW = "r2000-00000002"
NOW = 10_000


def job(**kw) -> JobSpec:
    base = dict(job="t", task=TASK, rounds=3, task_params={"partition": "iid"},
                cohort={"min_workers": 2, "min_updates": 2}, evaluation={"federated": False, "final_round": False})
    base.update(kw)
    return JobSpec(**base)


def core(**kw) -> WorkerCore:
    return WorkerCore("w01", 0, 2, 7, spec_of(MODEL), **kw)


_nonces = iter(range(1, 1 << 30))


def ctl(fields, run, *, tensors=None, nonce=None, now=NOW) -> ControlVerified:
    if tensors is None and fields.HAS_TENSORS:
        tensors = {k: v.clone() for k, v in MODEL.items()}
    nonce = nonce if nonce is not None else next(_nonces).to_bytes(16, "big")
    return ControlVerified(fields, tensors, run, getattr(fields, "round", 0), nonce, now, now)


def round_open(round_=1, cohort=("w01", "w02"), deadline=NOW + 5000, evaluate=True) -> RoundOpen:
    return RoundOpen(round=round_, model_version=round_ - 1, cohort=list(cohort), deadline_ms=deadline,
                     train={"epochs": 1}, evaluate=evaluate)


def job_done() -> JobDone:
    return JobDone(rounds_completed=3, model_version=3)


def finished(action: Train, loss: float = 1.0) -> TrainingFinished:
    body = Update(round=action.round, base_version=action.base_version, num_samples=10, num_steps=2,
                  train_metrics={"loss": loss})
    return TrainingFinished(action.run, action.round, body, {k: v + 1 for k, v in action.model.items()})


# ---- training context and seeds ----------------------------------------------------------

def test_seeds_differ_per_worker_and_repeat_for_the_same_worker_round_and_run():
    run = new_run_id(1_700_000_000_000)
    a = derive_seed(1, run, "w01", 3)
    assert a == derive_seed(1, run, "w01", 3)
    assert a != derive_seed(1, run, "w02", 3)  # today's code gave every worker job.seed*1_000_003+round
    assert a != derive_seed(1, run, "w01", 4)
    assert a != derive_seed(1, new_run_id(1_700_000_000_001), "w01", 3)
    assert a != derive_seed(2, run, "w01", 3)
    assert 0 <= a < 2**63
    assert training_context(job_seed=1, run=run, worker_id="w01", partition=0, num_partitions=2, round_=3).seed == a


def test_deterministic_jobs_leave_the_run_out_of_the_seed():
    # A rerun of a deterministic job is a new run but must train identically.
    a = WorkerCore("w01", 0, 2, 7, spec_of(MODEL), deterministic=True).context(RUN_OLD, 2)
    b = WorkerCore("w01", 0, 2, 7, spec_of(MODEL), deterministic=True).context(RUN_NEW, 2)
    assert a.seed == b.seed == derive_seed(7, None, "w01", 2) and (a.run, b.run) == (RUN_OLD, RUN_NEW)
    assert core().context(RUN_OLD, 2).seed != core().context(RUN_NEW, 2).seed
    assert WorkerCore("w02", 1, 2, 7, spec_of(MODEL), deterministic=True).context(RUN_OLD, 2).seed != a.seed


class RecordingTask(DigitsTask):
    """Records what each train/evaluate call was told (on the task object, as a stateful task would)."""

    def __init__(self):
        super().__init__()
        self.trained_with: list[tuple[int, object]] = []
        self.evaluated_with: list[object] = []

    def train(self, model, dataset, settings, seed, global_state=None, *, grad_correction=None, context=None):
        self.trained_with.append((seed, context))
        return super().train(model, dataset, settings, seed, global_state, grad_correction=grad_correction)

    def evaluate(self, model, dataset, *, context=None):
        self.evaluated_with.append(context)
        return super().evaluate(model, dataset)


class LegacyTask(DigitsTask):
    """A user task written before the training context existed: no ``context`` parameter."""

    def __init__(self):
        super().__init__()
        self.seeds: list[int] = []

    def train(self, model, dataset, settings, seed, global_state=None):
        self.seeds.append(seed)
        return super().train(model, dataset, settings, seed, global_state)

    def evaluate(self, model, dataset):
        return super().evaluate(model, dataset)


def test_trainers_of_two_workers_train_with_different_seeds_and_get_their_context():
    j = job()
    run = new_run_id(1_700_000_000_000)
    seen = {}
    for i, wid in enumerate(["w01", "w02"]):
        task = RecordingTask()
        t = LocalTrainer(task, j, worker_id=wid, partition=i, num_partitions=2)
        x = {k: v.detach().clone() for k, v in t.model.state_dict().items()}
        ctx = t.context(4, run)
        t.train(4, x, {}, j.train, context=ctx)
        t.evaluate(context=ctx)
        (seed, context), = task.trained_with
        assert context == ctx and seed == ctx.seed and task.evaluated_with == [ctx]
        assert (context.worker_id, context.partition, context.num_partitions, context.run, context.round) == \
            (wid, i, 2, run, 4)
        seen[wid] = seed
    assert seen["w01"] != seen["w02"]


def test_a_task_without_a_context_parameter_still_trains():
    task = LegacyTask()
    t = LocalTrainer(task, job(), worker_id="w01", partition=0, num_partitions=2)
    x = {k: v.detach().clone() for k, v in t.model.state_dict().items()}
    out = t.train(1, x, {}, t.job.train)
    assert out.num_steps > 0 and task.seeds == [derive_seed(0, None, "w01", 1)]
    assert t.evaluate(context=t.context(1)).num_samples > 0


# ---- run binding ----------------------------------------------------------------------------

def test_a_worker_follows_the_newest_run_and_rejects_older_ones():
    c = core()
    assert isinstance(c.handle(ctl(round_open(1), RUN_OLD))[0], Train)
    assert c.run == RUN_OLD
    assert isinstance(c.handle(ctl(round_open(1), RUN_NEW))[0], Train)  # a fresh coordinator run
    assert c.run == RUN_NEW
    out = c.handle(ctl(round_open(2), RUN_OLD))
    assert out == [Reject("wrong_run", "round.open", 2, RUN_OLD, f"following {RUN_NEW}")]
    assert c.handle(ctl(RoundClose(round=1, model_version=1, status="aggregated", accepted=[], seconds=0), RUN_OLD))[0] \
        .reason == "wrong_run"


def test_job_done_is_accepted_only_for_the_followed_run():
    # A job.done replayed from an earlier run of the same job id must not end this one.
    c = core()
    c.handle(ctl(round_open(1), RUN_NEW))
    assert c.handle(ctl(job_done(), RUN_OLD))[0].reason == "wrong_run"
    assert c.status != "done"
    assert c.handle(ctl(job_done(), RUN_NEW)) == [Exit("completed", 3)]
    assert c.status == "done"


def test_a_worker_following_no_run_ignores_job_done():
    # The control stream replays the previous run's last job.done to a freshly started worker.
    c = core()
    assert c.handle(ctl(job_done(), RUN_OLD)) == [Ignore("no_run_followed", "job.done", 0, RUN_OLD)]
    assert c.run is None and c.status == "idle"
    # A newer run's job.done while following an older run is not for us either.
    c.handle(ctl(round_open(1), RUN_OLD))
    assert isinstance(c.handle(ctl(job_done(), RUN_NEW))[0], Ignore)


def test_control_messages_without_a_run_are_ignored():
    # Every coordinator names its run: an unbound control message can only be an old replay.
    c = core()
    assert c.handle(ctl(round_open(1), None)) == [Ignore("no_run", "round.open", 1)]
    c.handle(ctl(round_open(1), RUN_NEW))
    assert c.handle(ctl(job_done(), None)) == [Ignore("no_run", "job.done", 0)]
    assert c.status != "done"


# ---- rounds, rejoin -------------------------------------------------------------------------

def test_round_open_trains_then_publishes_under_its_run_and_round():
    c = core()
    train, = c.handle(ctl(round_open(2, evaluate=False), RUN_NEW))
    assert isinstance(train, Train) and c.status == "training"
    assert train.context == training_context(job_seed=7, run=RUN_NEW, worker_id="w01", partition=0,
                                              num_partitions=2, round_=2)
    assert train.evaluate is False and train.base_version == 1 and train.settings == {"epochs": 1}
    pub, = c.handle(finished(train))
    assert isinstance(pub, PublishUpdate) and not pub.resend and (pub.run, pub.round) == (RUN_NEW, 2)
    assert c.status == "idle" and c.rounds_trained == 1


def test_not_in_cohort_late_and_bad_models_are_ignored_or_rejected():
    c = core()
    mismatch = ControlVerified(round_open(2), dict(MODEL), RUN_NEW, 3, b"m" * 16, NOW, NOW)
    assert c.handle(mismatch)[0].reason == "header_mismatch"
    assert c.handle(ctl(round_open(1, cohort=["w02"]), RUN_NEW))[0].reason == "not_in_cohort"
    assert c.handle(ctl(round_open(2, deadline=NOW - 1), RUN_NEW))[0].reason == "deadline_passed"
    bad = {"w": torch.zeros(4), "b": torch.zeros(1)}
    assert c.handle(ctl(round_open(3), RUN_NEW, tensors=bad))[0].reason == "tensor_mismatch"
    nan = {"w": torch.tensor([0.0, float("nan"), 0.0]), "b": torch.zeros(1)}
    assert c.handle(ctl(round_open(4), RUN_NEW, tensors=nan))[0].reason == "non_finite"


def test_a_reopened_round_gets_the_stored_update_again_once_per_message():
    c = core()
    first = ctl(round_open(3), RUN_NEW)
    train, = c.handle(first)
    sent, = c.handle(finished(train))
    # The same message again (redelivery): nothing.
    assert c.handle(first)[0].reason == "duplicate_message"
    # The resumed coordinator reopens round 3 of the same run: a new message.
    reopened = ctl(round_open(3, deadline=NOW + 9000), RUN_NEW)
    again, = c.handle(reopened)
    assert isinstance(again, PublishUpdate) and again.resend
    assert again.fields == sent.fields and again.tensors is sent.tensors
    assert c.handle(reopened)[0].reason == "duplicate_message"  # once per distinct round.open
    assert c.rounds_trained == 1


def test_a_restarted_worker_resends_from_its_store_or_trains_without_one():
    body = Update(round=3, base_version=2, num_samples=10, num_steps=2)
    stored = SentUpdate(body, {k: v + 5 for k, v in MODEL.items()})
    with_state = core(sent={(RUN_NEW, 3): stored})
    # Stored work does not make it follow a run: only control messages do (so a replayed
    # job.done of that run cannot end a restarted worker before the run speaks).
    assert with_state.run is None
    assert with_state.handle(ctl(job_done(), RUN_NEW))[0].reason == "no_run_followed"
    out, = with_state.handle(ctl(round_open(3), RUN_NEW))
    assert isinstance(out, PublishUpdate) and out.resend and out.fields == body
    without = core()
    assert isinstance(without.handle(ctl(round_open(3), RUN_NEW))[0], Train)


def test_a_failed_training_can_be_retried_and_late_results_of_old_runs_are_dropped():
    c = core()
    train, = c.handle(ctl(round_open(1), RUN_OLD))
    assert c.handle(ctl(round_open(1), RUN_OLD))[0].reason == "in_progress"
    assert c.handle(WorkFailed("train", RUN_OLD, 1)) == [] and c.status == "idle"
    train, = c.handle(ctl(round_open(1), RUN_OLD))
    c.handle(ctl(round_open(1), RUN_NEW))  # a new run starts while round 1 of the old one trains
    assert c.handle(finished(train))[0].reason == "run_superseded"


def test_eval_open_evaluates_once_and_resends_its_report():
    c = core()
    eo = EvalOpen(round=4, model_version=4, cohort=["w01"], deadline_ms=NOW + 1000)
    ev, = c.handle(ctl(eo, RUN_NEW))
    assert isinstance(ev, Evaluate) and ev.context.round == 4
    from fedbus.protocol.messages import EvalReport
    from fedbus.worker.core import EvaluationFinished
    report = EvalReport(round=4, model_version=4, num_samples=5, metrics={"accuracy": 0.5})
    pub, = c.handle(EvaluationFinished(RUN_NEW, 4, report))
    assert isinstance(pub, PublishEvalReport) and pub.run == RUN_NEW
    again, = c.handle(ctl(eo, RUN_NEW))
    assert isinstance(again, PublishEvalReport) and again.fields == report


# ---- the update pipeline --------------------------------------------------------------------

@pytest.mark.parametrize("strategy,stages", [
    ({"name": "fedavg"}, ("encode",)),
    ({"name": "fedprox", "mu": 0.1}, ("fedprox", "encode")),
    ({"name": "fednova"}, ("fednova", "encode")),
    ({"name": "scaffold"}, ("scaffold", "encode")),
    ({"name": "median"}, ("encode",)),
])
def test_the_pipeline_is_built_once_from_the_strategy(strategy, stages):
    assert build_worker_pipeline(job(strategy=strategy)).names == stages


def test_pipeline_order_with_clip_and_attack_and_the_receiving_decode():
    from fedbus.worker.attacks import Attack

    p = build_worker_pipeline(job(strategy={"name": "fednova"}), attack=Attack("scale", 3.0), client_clip_norm=1.0)
    assert p.names == ("fednova", "clip", "attack", "encode")
    t = LocalTrainer(load_task(TASK), job(strategy={"name": "fednova"}), worker_id="w01", partition=0,
                     num_partitions=2)
    x = {k: v.detach().clone() for k, v in t.model.state_dict().items()}
    out = t.train(1, x, {}, t.job.train)
    got = decode_update(build_worker_pipeline(t.job), "w01", out.fields, out.tensors)
    assert got.worker_id == "w01" and got.num_samples == out.num_samples and got.num_steps == out.num_steps
    assert got.extra == {"fednova_a": out.extra_scalars["fednova_a"]}
    assert all(torch.equal(got.state[k], out.state[k]) for k in out.state)


def test_client_clip_bounds_the_delta_norm():
    x = {"w": torch.zeros(4), "n": torch.tensor(3)}
    update = LocalUpdate(round=1, base_version=0, state={"w": torch.tensor([3.0, 4.0, 0.0, 0.0]), "n": torch.tensor(5)},
                         num_samples=1, num_steps=1)
    ctx = UpdateContext(training=training_context(job_seed=0, run=None, worker_id="w01", partition=0,
                                                  num_partitions=1, round_=1),
                        settings=TrainSettings(), global_state=x, broadcast={}, base_version=0)
    clipped = ClipUpdateNorm(1.0).apply(ctx, update)
    torch.testing.assert_close(clipped.state["w"], torch.tensor([0.6, 0.8, 0.0, 0.0]))
    assert torch.equal(clipped.state["n"], torch.tensor(5))
    assert ClipUpdateNorm(10.0).apply(ctx, update) is update


# ---- state directory ------------------------------------------------------------------------

def test_state_store_round_trips_updates_and_strategy_state_atomically(tmp_path):
    store = WorkerStateStore(tmp_path / "s")
    body = Update(round=2, base_version=1, num_samples=3, num_steps=1, train_metrics={"loss": 0.5})
    tensors = {"w": torch.arange(3.0), "scaffold_delta_c/w": torch.ones(3)}
    store.save_update(RUN_NEW, 2, body, tensors)
    store.save_update(None, 1, body.model_copy(update={"round": 1}), tensors)
    loaded = store.load_updates()
    assert set(loaded) == {(RUN_NEW, 2), (None, 1)}
    assert loaded[(RUN_NEW, 2)].fields == body
    assert all(torch.equal(loaded[(RUN_NEW, 2)].tensors[k], v) for k, v in tensors.items())
    state = {"scaffold": {"control": {"w": torch.tensor([1.0, -2.0, 3.0])}}}
    store.save_strategy(RUN_NEW, state)
    assert torch.equal(store.load_strategy(RUN_NEW)["scaffold"]["control"]["w"], state["scaffold"]["control"]["w"])
    assert store.load_strategy(RUN_OLD) == {}
    for k in range(3, 10):  # only the newest few updates of a run are kept
        store.save_update(RUN_NEW, k, body.model_copy(update={"round": k}), tensors)
    assert sorted(r for run, r in store.load_updates() if run == RUN_NEW) == [6, 7, 8, 9]
    leftovers = [p for p in (tmp_path / "s").rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
    # A damaged file costs a retrain, not the worker.
    (tmp_path / "s" / "runs" / RUN_NEW / "update-9.body").write_bytes(b"\x00garbage")
    assert (RUN_NEW, 9) not in store.load_updates()


def test_scaffold_control_variate_is_per_run_and_survives_a_restart(tmp_path):
    j = job(strategy={"name": "scaffold"}, train={"momentum": 0.0, "epochs": 1})
    store = WorkerStateStore(tmp_path)
    t = LocalTrainer(load_task(TASK), j, worker_id="w01", partition=0, num_partitions=2,
                     state_loader=store.load_strategy)
    c = WorkerCore("w01", 0, 2, j.seed, spec_of(t.model.state_dict()))
    x = {k: v.detach().clone() for k, v in t.model.state_dict().items()}
    zeros = {k: torch.zeros_like(v) for k, v in x.items() if v.is_floating_point()}
    tensors = {**x, **{f"scaffold/{k}": v for k, v in zeros.items()}}
    train, = c.handle(ctl(RoundOpen(round=1, model_version=0, cohort=["w01"], deadline_ms=NOW + 1, train={}),
                          RUN_NEW, tensors=tensors))
    pub, = c.handle(t.run_train(train))
    store.save_update(pub.run, pub.round, pub.fields, pub.tensors)
    store.save_strategy(pub.run, t.pipeline.state_dict())
    kept = {k: v.clone() for k, v in t.control.items()}
    assert kept
    restarted = LocalTrainer(load_task(TASK), j, worker_id="w01", partition=0, num_partitions=2,
                             state_loader=store.load_strategy)
    train2 = Train(c.context(RUN_NEW, 2), x, {"scaffold": zeros}, {}, False, 1, NOW + 1)
    restarted.run_train(train2)  # loads c_i of RUN_NEW before training
    fresh = LocalTrainer(load_task(TASK), j, worker_id="w01", partition=0, num_partitions=2)
    fresh.run_train(train2)
    first_delta_restarted = restarted.control
    assert not all(torch.equal(first_delta_restarted[k], fresh.control[k]) for k in kept)
    # Another run starts from c_i = 0 again.
    other = Train(c.context(RUN_OLD, 1), x, {"scaffold": zeros}, {}, False, 0, NOW + 1)
    restarted.run_train(other)
    fresh2 = LocalTrainer(load_task(TASK), j, worker_id="w01", partition=0, num_partitions=2)
    fresh2.run_train(other)
    assert all(torch.equal(restarted.control[k], fresh2.control[k]) for k in kept)


# ---- the simulator's workers ----------------------------------------------------------------

def test_simulated_workers_honour_round_open_evaluate_and_own_their_task():
    j = job()
    task = load_task(TASK)
    a = SimulatedWorker(task, j, "w01", partition=0, num_partitions=2)
    b = SimulatedWorker(task, j, "w02", partition=1, num_partitions=2)
    assert a.trainer.task is not b.trainer.task and a.trainer.task is not task
    state = {k: v.detach().clone() for k, v in a.trainer.model.state_dict().items()}
    channel = ControlChannel(RUN_NEW)
    for evaluate in (False, True):
        ro = RoundOpen(round=1 + evaluate, model_version=0, cohort=["w01"], deadline_ms=NOW + 1, train={},
                       evaluate=evaluate)
        pub, = a.receive(channel.message(ro, state, NOW))
        assert (pub.fields.eval_samples > 0) == evaluate and bool(pub.fields.eval_metrics) == evaluate


class OneWorkerPerTask(DigitsTask):
    """A task that keeps per-worker state on itself: correct only if each worker has its own object."""

    def train(self, model, dataset, settings, seed, global_state=None, *, grad_correction=None, context=None):
        owner = getattr(self, "owner", None)
        if owner is not None and owner != context.worker_id:
            raise RuntimeError(f"task object shared by {owner} and {context.worker_id}")
        self.owner = context.worker_id
        return super().train(model, dataset, settings, seed, global_state, grad_correction=grad_correction)


task_one_worker_per_task = OneWorkerPerTask()


def test_simulation_gives_each_worker_its_own_task_object():
    result = simulate(job(task="tests.test_worker_core:task_one_worker_per_task", rounds=2), 2)
    assert result.reason == "completed" and [r["status"] for r in result.rounds] == ["aggregated", "aggregated"]


def test_state_dir_default_is_relative_to_the_working_directory():
    from fedbus.worker.state import default_state_dir

    assert default_state_dir("job-a", "w07") == type(default_state_dir("x", "y"))(".fedbus-state/job-a/w07")
    assert not os.path.isabs(default_state_dir("job-a", "w07"))


def test_sync_worker_does_not_train_a_round_it_already_saw_closed():
    """A slow worker catching up on queued control messages skips rounds that closed."""
    def closed(round_):
        return ctl(RoundClose(round=round_, model_version=round_, status="aggregated", accepted=[], rejected={},
                              seconds=0.1, metrics={}), RUN_NEW)

    c = core(skip_closed_rounds=True)
    c.handle(closed(3))
    assert [(type(a).__name__, a.reason) for a in c.handle(ctl(round_open(3), RUN_NEW))] == [("Ignore", "round_closed")]
    assert [type(a).__name__ for a in c.handle(ctl(round_open(4), RUN_NEW))] == ["Train"]
    # Async mode: round.close numbers versions, not the tickets round.open carries: nothing is skipped.
    c = core(skip_closed_rounds=False)
    c.handle(closed(3))
    assert [type(a).__name__ for a in c.handle(ctl(round_open(3), RUN_NEW))] == ["Train"]
