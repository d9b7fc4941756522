"""Worker-side strategy logic (LocalTrainer), attack simulation, and the in-process simulator."""

from __future__ import annotations

import pytest
import torch

from fedbus.aggregation.fednova import fednova_a
from fedbus.jobspec import JobSpec
from fedbus.sim import simulate
from fedbus.tasks import load_task
from fedbus.worker.attacks import Attack
from fedbus.worker.trainer import SCAFFOLD_C, LocalTrainer

TASK = "fedbus.tasks.digits:task"


def job(**kw) -> JobSpec:
    base = dict(job="t", task=TASK, rounds=3, task_params={"partition": "iid"},
                cohort={"min_workers": 4, "min_updates": 4}, evaluation={"federated": False, "final_round": False})
    base.update(kw)
    return JobSpec(**base)


def trainer(j: JobSpec, attack: Attack | None = None, partition: int = 0) -> LocalTrainer:
    return LocalTrainer(load_task(TASK), j, worker_id=f"w{partition + 1:02d}", partition=partition, num_partitions=4,
                        attack=attack)


def global_state(t: LocalTrainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in t.model.state_dict().items()}


# ---- attacks: the formulas of the module docstring, by hand ---------------------------

def test_sign_flip_and_scale_act_on_the_delta():
    x = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    y = {"w": torch.tensor([2.0, 0.0]), "n": torch.tensor(5)}  # delta = [1, -2]
    flipped = Attack("sign_flip", 5.0).poison_update(x, y, round_=1)
    assert torch.equal(flipped["w"], torch.tensor([1.0 - 5.0, 2.0 + 10.0]))  # x - 5 * delta
    assert torch.equal(flipped["n"], torch.tensor(5))  # integer buffers untouched
    scaled = Attack("scale", 3.0).poison_update(x, y, round_=1)
    assert torch.equal(scaled["w"], torch.tensor([1.0 + 3.0, 2.0 - 6.0]))


def test_gaussian_is_seeded_and_label_flip_maps_c_minus_1_minus_y():
    x = {"w": torch.zeros(1000)}
    a = Attack("gaussian", 0.5, seed=3).poison_update(x, x, round_=2)["w"]
    b = Attack("gaussian", 0.5, seed=3).poison_update(x, x, round_=2)["w"]
    assert torch.equal(a, b) and 0.4 < float(a.std()) < 0.6
    assert torch.equal(Attack("label_flip").poison_labels(torch.tensor([0, 3, 9]), 10), torch.tensor([9, 6, 0]))
    with pytest.raises(ValueError):
        Attack.parse("teleport:3")
    assert Attack.parse("sign_flip:5") == Attack("sign_flip", 5.0, 0)


# ---- LocalTrainer: each strategy's worker-side extras ----------------------------------

def test_fedprox_sends_mu_to_local_training():
    t = trainer(job(strategy={"name": "fedprox", "mu": 0.25}))
    assert t.settings_for(t.job.train.model_dump()).proximal_mu == 0.25
    plain = trainer(job())
    assert plain.settings_for(plain.job.train.model_dump()).proximal_mu == 0.0


def test_fednova_reports_a_i_from_steps_momentum_and_lr():
    t = trainer(job(strategy={"name": "fednova"}))
    x = global_state(t)
    out = t.train(1, x, {}, t.job.train)
    s = t.job.train
    assert out.extra_scalars == {"fednova_a": pytest.approx(fednova_a(out.num_steps, s.momentum, s.proximal_mu, s.lr))}
    assert out.extra_groups == {}


def test_scaffold_keeps_its_control_variate_and_sends_its_change():
    j = job(strategy={"name": "scaffold"}, train={"momentum": 0.0, "epochs": 1})
    t = trainer(j)
    x = global_state(t)
    zeros = {k: torch.zeros_like(v) for k, v in x.items() if v.is_floating_point()}
    out = t.train(1, x, {SCAFFOLD_C: zeros}, j.train)
    # Option II with plain SGD and c = c_i = 0: c_i+ = (x - y) / (K * lr), and the change equals it.
    k, lr = out.num_steps, j.train.lr
    for name in zeros:
        expected = (x[name] - out.state[name]) / (k * lr)
        torch.testing.assert_close(t.control[name], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.extra_groups["scaffold_delta_c"][name], expected, rtol=1e-5, atol=1e-6)
    # The next round's delta is measured against the kept c_i.
    before = {n: v.clone() for n, v in t.control.items()}
    t.load(x)
    out2 = t.train(2, x, {SCAFFOLD_C: zeros}, j.train)
    for name in zeros:
        torch.testing.assert_close(out2.extra_groups["scaffold_delta_c"][name], t.control[name] - before[name],
                                   rtol=1e-5, atol=1e-6)


def test_attacking_trainer_poisons_only_its_own_update():
    j = job()
    honest, evil = trainer(j), trainer(j, Attack("sign_flip", 5.0))
    x = global_state(honest)
    h = honest.train(1, x, {}, j.train)
    e = evil.train(1, x, {}, j.train)
    name = next(k for k, v in x.items() if v.is_floating_point())
    # Same data and seed, so the evil update is exactly x - 5 (y - x).
    torch.testing.assert_close(e.state[name], x[name] - 5 * (h.state[name] - x[name]), rtol=1e-5, atol=1e-6)


# ---- the simulator runs the same core --------------------------------------------------

def test_simulation_is_deterministic_and_learns():
    a = simulate(job(), 4)
    b = simulate(job(), 4)
    assert a.reason == "completed" and len(a.rounds) == 3
    assert [r["test_accuracy"] for r in a.rounds] == [r["test_accuracy"] for r in b.rounds]
    assert a.rounds[-1]["test_accuracy"] > a.rounds[0]["test_accuracy"]


def test_simulated_attack_breaks_fedavg_but_not_the_median():
    j = job(rounds=8, cohort={"min_workers": 5, "min_updates": 5})
    attack = {0: Attack("sign_flip", 10.0)}
    clean = simulate(j, 5).final["test_accuracy"]
    attacked = simulate(j, 5, attacks=attack).final["test_accuracy"]
    robust = simulate(j.model_copy(update={"strategy": JobSpec(job="t", task=TASK, rounds=1,
                                           strategy={"name": "median"}).strategy}), 5, attacks=attack)
    assert attacked < clean - 0.3
    assert robust.final["test_accuracy"] > clean - 0.1


def test_stragglers_are_selected_but_rounds_close_at_the_deadline_without_them():
    j = job(rounds=2, cohort={"min_workers": 4, "min_updates": 3})
    result = simulate(j, 4, silent={0})
    assert result.reason == "completed" and [r["status"] for r in result.rounds] == ["aggregated", "aggregated"]
    assert [r["accepted"] for r in result.rounds] == [3, 3]
    # Without enough updates for the quorum, the rounds fail at their deadlines.
    failed = simulate(j, 4, silent={0, 1})
    assert {r["status"] for r in failed.rounds} == {"failed"} and failed.reason == "quorum_not_reached"
