"""fedbus sim's virtual clock: delivery times, deadlines, stragglers, speeds, counters.

Every expected time here is computed by hand from base_train_ms (1,000 virtual ms per
local training), the slowdown and the job's 30 s round deadline; none is wall time.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedbus.coordinator.rounds import CloseRound, FinishJob, OpenRound, Start, UpdateReceived, WorkerSeen
from fedbus.jobspec import JobSpec
from fedbus.sim import SimSetupError, Speeds, parse_distribution, simulate, worker_ids

TASK = "fedbus.tasks.digits:task"


def job(**kw) -> JobSpec:
    base = dict(job="t", task=TASK, rounds=3, task_params={"partition": "iid"},
                cohort={"min_workers": 4, "min_updates": 4}, evaluation={"federated": False, "final_round": False})
    base.update(kw)
    return JobSpec.model_validate(base)


# ---- speeds -------------------------------------------------------------------------------

def test_uniform_speeds_with_the_last_n_slowed():
    assert Speeds("uniform", stragglers=2, slowdown=10.0).durations_ms(5, seed=0) == [1000, 1000, 1000, 10000, 10000]
    assert Speeds(base_train_ms=250).durations_ms(3, seed=7) == [250, 250, 250]
    assert list(Speeds(stragglers=3).straggler_indices(10)) == [7, 8, 9]  # w08, w09, w10


def test_lognormal_speeds_are_seeded_and_have_the_asked_spread():
    speeds = Speeds("lognormal:0.5")
    a, b, other = speeds.factors(10_000, seed=3), speeds.factors(10_000, seed=3), speeds.factors(10_000, seed=4)
    assert a == b and a != other
    logs = np.log(a)
    assert abs(float(np.median(logs))) < 0.05 and abs(float(np.std(logs)) - 0.5) < 0.02
    # Stragglers multiply whatever they drew.
    slowed = Speeds("lognormal:0.5", stragglers=1, slowdown=10.0).factors(10_000, seed=3)
    assert slowed[:-1] == a[:-1] and slowed[-1] == pytest.approx(10 * a[-1])
    assert Speeds("lognormal:0").factors(4, seed=1) == [1.0] * 4


@pytest.mark.parametrize("text", ["lognormal", "lognormal:x", "lognormal:-1", "lognormal:nan", "lognormal:11",
                                  "uniform:2", "gamma:1"])
def test_bad_speed_distributions_are_refused(text):
    with pytest.raises(SimSetupError):
        parse_distribution(text)


@pytest.mark.parametrize("kw", [dict(slowdown=0.5), dict(slowdown=1001.0), dict(stragglers=-1),
                                dict(base_train_ms=0)])
def test_bad_speed_settings_are_refused(kw):
    with pytest.raises(SimSetupError):
        Speeds(**kw)


def test_more_stragglers_than_workers_is_refused():
    with pytest.raises(SimSetupError):
        simulate(job(), 4, stragglers=5)


# ---- sync rounds on the virtual clock ---------------------------------------------------------

def test_a_full_cohort_round_lasts_as_long_as_its_slowest_worker():
    result = simulate(job(), 4, stragglers=1, slowdown=10.0)
    assert result.reason == "completed"
    # w04 trains 10 x 1 s; the others 1 s; each round waits for all four.
    assert [r["elapsed_s"] for r in result.rounds] == [10.0, 20.0, 30.0]
    assert [r["seconds"] for r in result.rounds] == [10.0, 10.0, 10.0]
    assert [r["accepted"] for r in result.rounds] == [4, 4, 4]
    assert [r["staleness"] for r in result.rounds] == [[0] * 4] * 3
    assert (result.updates_trained, result.updates_used, result.updates_wasted) == (12, 12, 0)
    assert result.virtual_seconds == 30.0
    # Time to accuracy is read off the rows: the first version that reached it.
    first = result.rounds[0]["test_accuracy"]
    assert result.seconds_to(first) == 10.0 and result.rounds_to(first) == 1
    assert result.seconds_to(1.01) is None
    # Without the straggler the same job takes 1 s a round, and trains the same models:
    # virtual time changes when updates arrive, not what they contain.
    fast = simulate(job(), 4)
    assert [r["elapsed_s"] for r in fast.rounds] == [1.0, 2.0, 3.0]
    assert [r["test_accuracy"] for r in fast.rounds] == [r["test_accuracy"] for r in result.rounds]


def test_a_straggler_beyond_the_deadline_is_dropped_and_its_work_counted_as_wasted():
    # w04 needs 50 s, the deadline is 30 s, the quorum 3: every round closes at its deadline.
    # Round 1 [0, 30): w04 busy until 50. Round 2 [30, 60): w04 starts it at 50, done at 100.
    # Round 3 [60, 90): w04 starts it at 100. Its round-1 update lands at 50 s in round 2: dropped.
    result = simulate(job(cohort={"min_workers": 4, "min_updates": 3}), 4, stragglers=1, slowdown=50.0)
    assert result.reason == "completed"
    assert [r["elapsed_s"] for r in result.rounds] == [30.0, 60.0, 90.0]
    assert [r["accepted_workers"] for r in result.rounds] == [["w01", "w02", "w03"]] * 3
    assert result.rejected == {"wrong_round": 1}
    assert (result.updates_trained, result.updates_used, result.updates_wasted, result.in_flight) == (12, 9, 3, 2)


def test_close_at_quorum_does_not_wait_for_the_straggler():
    j = job(cohort={"min_workers": 4, "min_updates": 0.75, "close_at_quorum": True})
    result = simulate(j, 4, stragglers=1, slowdown=10.0)
    assert result.reason == "completed"
    assert [r["elapsed_s"] for r in result.rounds] == [1.0, 2.0, 3.0]
    assert [r["accepted_workers"] for r in result.rounds] == [["w01", "w02", "w03"]] * 3
    # w04 is busy with round 1 until 10 s: none of its three updates arrives by 3 s.
    assert (result.updates_trained, result.updates_used, result.in_flight) == (12, 9, 3)


def test_next_round_folds_a_late_update_once_with_its_staleness():
    # w04 takes 1.5 s: its round-1 update lands at 1.5 s, in round 2 [1, 2), and is folded there.
    j = job(rounds=2, cohort={"min_workers": 4, "min_updates": 3, "close_at_quorum": True},
            late_updates="next_round")
    result = simulate(j, 4, stragglers=1, slowdown=1.5)
    assert [r["elapsed_s"] for r in result.rounds] == [1.0, 2.0]
    second = result.rounds[1]
    assert second["late_workers"] == ["w04"] and second["folded"] == 4 and second["staleness"] == [0, 0, 0, 1]
    # Its round-2 update (started at 1.5 s, due at 3 s) is still in flight when the job ends at 2 s.
    assert (result.updates_trained, result.updates_used, result.updates_wasted, result.in_flight) == (8, 7, 1, 1)


def test_silent_workers_close_rounds_at_the_deadline():
    result = simulate(job(rounds=2, cohort={"min_workers": 4, "min_updates": 3}), 4, silent={0})
    assert [r["elapsed_s"] for r in result.rounds] == [30.0, 60.0]
    assert [r["accepted_workers"] for r in result.rounds] == [["w02", "w03", "w04"]] * 2
    assert result.updates_trained == 6 and result.updates_wasted == 0


# ---- async versions on the virtual clock -------------------------------------------------------

def test_async_versions_do_not_wait_for_the_straggler():
    j = job(rounds=4, mode="async", **{"async": {"buffer_size": 3, "max_staleness": 100}})
    result = simulate(j, 4, stragglers=1, slowdown=10.0)
    assert result.reason == "completed"
    # Three workers finish every second, the buffer takes three: a version a second.
    assert [r["elapsed_s"] for r in result.rounds] == [1.0, 2.0, 3.0, 4.0]
    assert all(len(r["staleness"]) == r["folded"] == 3 for r in result.rounds)
    assert "w04" not in {w for r in result.rounds for w in r["accepted_workers"]}
    assert result.updates_used == 12 and result.updates_wasted == result.updates_trained - 12


# ---- several dispatches outstanding at once ---------------------------------------------------

class TwoTickets:
    """A stand-in machine: at Start it dispatches two tickets at once, the second one to a
    worker that already has the first, and finishes after three updates. It records when
    each update and heartbeat reached it."""

    def __init__(self, state):
        self.state = state
        self.rejections = {}
        self.updates: list[tuple[int, str, int]] = []
        self.seen: dict[str, list[int]] = {}

    def handle(self, event):
        if isinstance(event, Start):
            return [OpenRound(1, 0, ("w01", "w02"), 100_000, self.state),
                    OpenRound(2, 0, ("w02",), 100_000, self.state)]
        if isinstance(event, WorkerSeen):
            self.seen.setdefault(event.worker_id, []).append(event.now_ms)
        if isinstance(event, UpdateReceived):
            self.updates.append((event.now_ms, event.worker_id, event.round))
            if len(self.updates) == 3:
                return [CloseRound(1, 1, "aggregated", ("w01", "w02"), {}, 6.0, self.state, {}),
                        FinishJob("completed", 1, 1, {})]
        return []


def test_outstanding_dispatches_are_delivered_independently_and_a_worker_trains_one_at_a_time(monkeypatch):
    machines = []

    def fake_machine_for(job, state, num_workers_total, *a, **kw):
        machines.append(TwoTickets(state))
        return machines[0]

    monkeypatch.setattr("fedbus.sim.machine_for", fake_machine_for)
    result = simulate(job(cohort={"min_workers": 2, "min_updates": 1}), 2, stragglers=1, slowdown=3.0)
    machine = machines[0]
    # w01 (1 s) answers ticket 1 at 1 s; w02 (3 s) answers ticket 1 at 3 s, then ticket 2 at 6 s.
    assert machine.updates == [(1000, "w01", 1), (3000, "w02", 1), (6000, "w02", 2)]
    assert result.reason == "completed" and result.rounds[0]["elapsed_s"] == 6.0
    # Every worker heartbeats each virtual second while the job runs (and once before it starts).
    assert machine.seen["w01"] == machine.seen["w02"] == [0, 1000, 2000, 3000, 4000, 5000]


# ---- a thousand workers ---------------------------------------------------------------------

def test_a_thousand_workers_sync_with_lognormal_speeds():
    # 1,437 pool samples over 1,000 iid partitions: 1 or 2 training samples each (a
    # Dirichlet split cannot give all 1,000 a sample; see fedbus/sim.py).
    n, speeds = 1000, "lognormal:0.5"
    j = job(rounds=2, cohort={"min_workers": n, "min_updates": n}, round_deadline_s=60.0)
    result = simulate(j, n, speeds=speeds)
    slowest = max(Speeds(speeds).durations_ms(n, j.seed)) / 1000
    assert slowest < 60 and result.reason == "completed"
    assert [r["elapsed_s"] for r in result.rounds] == [slowest, 2 * slowest]
    assert [r["accepted"] for r in result.rounds] == [n, n]
    assert (result.updates_trained, result.updates_used, result.updates_wasted) == (2 * n, 2 * n, 0)
    assert result.rounds[1]["test_accuracy"] > result.rounds[0]["test_accuracy"]
    assert math.isfinite(result.peak_rss_mb) and result.peak_rss_mb > 0
    assert worker_ids(n)[-1] == "w1000"


def test_simulated_workers_share_one_module_and_keep_no_sent_updates():
    import torch

    from fedbus.coordinator.announcements import round_open_message
    from fedbus.tasks import load_task
    from fedbus.worker.simulated import ControlChannel, SimulatedWorker, sim_run_id

    j = job()
    task = load_task(TASK)
    shared = task.build_model(j.task_params)
    a, b = (SimulatedWorker(task, j, w, partition=i, num_partitions=4, shared_model=shared,
                                    keep_sent=False)
            for i, w in enumerate(("w01", "w02")))
    assert a.trainer.model is b.trainer.model is shared
    state = {k: v.detach().clone() for k, v in shared.state_dict().items()}
    message = ControlChannel(sim_run_id(j)).message(
        *round_open_message(j, OpenRound(1, 0, ("w01", "w02"), 10_000, state)), 0)
    [sent_a], [sent_b] = a.receive(message), b.receive(message)
    assert a.core.sent == {} and b.core.sent == {}
    # b trained after a in the same module, from the model in the message, not from a's result.
    lone = SimulatedWorker(task, j, "w02", partition=1, num_partitions=4)
    [sent_lone] = lone.receive(message)
    assert sent_b.tensors.keys() == sent_lone.tensors.keys()
    for name in sent_b.tensors:
        assert torch.equal(torch.as_tensor(sent_b.tensors[name]), torch.as_tensor(sent_lone.tensors[name]))
