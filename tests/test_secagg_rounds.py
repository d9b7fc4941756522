"""Secure aggregation in training rounds, without a bus: the job spec's refusals, the round
machine's two new events, the worker's round bookkeeping, and the server exchange with
in-process participants (a malformed masked input is refused by name; the sum stays right)."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest
import torch

from fedbus.aggregation.fedavg import FedAvg
from fedbus.coordinator.inline import drive
from fedbus.coordinator.rounds import (
    CloseRound,
    RoundPolicy,
    RoundStateMachine,
    SecureAggregationFailed,
    SecureSumReceived,
    Start,
    Tick,
    WorkerSeen,
)
from fedbus.jobspec import JobSpec
from fedbus.protocol.runs import new_run_id
from fedbus.protocol.secagg import SecAggInput, SecAggSetup
from fedbus.secagg.errors import SecAggAbort
from fedbus.secagg.exchange import SecAggParticipant, ServerExchange
from fedbus.secagg.rounds import NOISE_TAILS, coordinate_bound, flat_delta, secure_sum_partial, unflatten
from fedbus.secagg.spec import SecureAggregationSpec, quantizer_of
from fedbus.worker.secure import SimulatedDropout, WorkerSecureRounds

RUN = new_run_id(1_700_000_000_000)


def job(**privacy) -> dict:
    return {"job": "j", "task": "fedbus.tasks.digits:task", "rounds": 2,
            "cohort": {"min_workers": 4, "min_updates": 3}, "privacy": privacy}


SA = {"secure_aggregation": {"clip": 1.0}}


# ---- job spec ----------------------------------------------------------------------------

@pytest.mark.parametrize("change, reason", [
    ({"strategy": {"name": "median"}}, "compares updates with each other"),
    ({"strategy": {"name": "krum", "f": 0}}, "compares updates with each other"),
    ({"strategy": {"name": "median", "nnm": {"f": 1}}}, "compares updates"),
    ({"strategy": {"name": "fedavg", "norm_bound": {"max_norm": 1.0}}}, "norm_bound clips each update at the server"),
    ({"strategy": {"name": "scaffold"}}, "needs per-update weights"),
    ({"mode": "async"}, "needs mode: sync"),
    ({"topology": "regional"}, "not built yet"),
    ({"late_updates": "next_round"}, "late_updates: drop"),
    ({"cohort": {"min_workers": 2, "min_updates": 2}}, "at least 3 workers"),
    ({"privacy": {"secure_aggregation": {}}}, "needs a clip"),
    ({"privacy": {**SA, "dp": {"mode": "central", "noise_multiplier": 1.0, "clip": {"fixed": 1.0},
                               "target_delta": 1e-5, "max_epsilon": 10}}}, "mode: distributed"),
])
def test_the_job_spec_refuses_what_secure_aggregation_cannot_run_and_says_why(change, reason):
    spec = job(**SA) | change
    with pytest.raises(ValueError, match=reason):
        JobSpec.model_validate(spec)


def test_the_clip_and_the_quantizer_bound_follow_distributed_dp():
    assert JobSpec.model_validate(job(**SA)).secagg_clip == 1.0
    dp = {"mode": "distributed", "noise_multiplier": 1.0, "clip": {"fixed": 0.5}, "target_delta": 1e-5,
          "max_epsilon": 10}
    spec = JobSpec.model_validate(job(secure_aggregation={}, dp=dp))
    assert spec.secagg_clip == 0.5
    # C plus NOISE_TAILS standard deviations of one worker's noise share z·C/sqrt(q), q = 3
    assert coordinate_bound(spec) == pytest.approx(0.5 + NOISE_TAILS * 1.0 * 0.5 / 3 ** 0.5)


# ---- vectors and partials ---------------------------------------------------------------

def test_a_secure_sum_folds_as_fedavg_with_weight_one_per_survivor():
    base = {"b": torch.zeros(2), "a": torch.ones(2, 2), "n": torch.tensor(3, dtype=torch.int64)}
    new = {"b": torch.tensor([1.0, 2.0]), "a": torch.full((2, 2), 3.0), "n": torch.tensor(5, dtype=torch.int64)}
    delta = flat_delta(new, base)
    assert delta.tolist() == [2.0, 2.0, 2.0, 2.0, 1.0, 2.0]  # float tensors only, sorted by name
    assert unflatten(delta, base)["b"].tolist() == [1.0, 2.0]
    rule = FedAvg()
    acc = rule.begin(base, 4)
    acc.merge(secure_sum_partial(rule, base, 4, 2 * delta, ["w1", "w2"]))
    out = acc.finalize()
    assert out["b"].tolist() == [1.0, 2.0] and out["a"].tolist() == [[3.0, 3.0], [3.0, 3.0]]
    assert int(out["n"]) == 3  # integer buffers are not securely summed: they stay as the base has them
    with pytest.raises(ValueError, match="secure sum of 5 values"):
        unflatten(np.zeros(5), base)


# ---- the round machine ------------------------------------------------------------------

def opened_machine():
    m = RoundStateMachine(RoundPolicy(rounds=2, min_workers=4, min_updates=3, round_deadline_ms=1_000,
                                      unmask_grace_ms=500, max_failed_rounds=2, final_eval=False), {"w": torch.zeros(2)})
    drive(m, Start(0))
    actions = []
    for w in ("w1", "w2", "w3", "w4"):
        actions += drive(m, WorkerSeen(w, 10, 0))
    assert actions[0].deadline_ms == 1_500  # the unmasking's grace past the masked-input deadline
    return m


def partial(m, survivors, value=1.0):
    return secure_sum_partial(m.rule, m.state, m.model_version, np.full(2, value * len(survivors)), survivors)


def test_the_unmasked_sum_closes_the_round_at_once_as_the_survivors_fedavg():
    m = opened_machine()
    actions = drive(m, SecureSumReceived(1, partial(m, ["w1", "w2", "w4"], 0.5), ("w1", "w2", "w4"), 10))
    [close] = [a for a in actions if isinstance(a, CloseRound)]
    assert close.status == "aggregated" and close.accepted == ("w1", "w2", "w4")
    assert m.state["w"].tolist() == [0.5, 0.5]


def test_a_failed_exchange_fails_the_round_by_name_and_the_next_one_opens():
    m = opened_machine()
    actions = drive(m, SecureAggregationFailed(1, "below_threshold", "2 shares of w3, threshold 3", 10))
    [close] = [a for a in actions if isinstance(a, CloseRound)]
    assert close.status == "failed" and close.rejected == {"secagg_below_threshold": 1}
    assert m.round == 2 and m.state["w"].tolist() == [0.0, 0.0]


def test_fewer_survivors_than_the_quorum_or_strangers_fail_the_round():
    m = opened_machine()
    [close] = [a for a in drive(m, SecureSumReceived(1, partial(m, ["w1", "w2"]), ("w1", "w2"), 10))
               if isinstance(a, CloseRound)]
    assert close.rejected == {"quorum_not_reached": 1}
    m = opened_machine()
    [close] = [a for a in drive(m, SecureSumReceived(1, partial(m, ["w1", "w2", "x"]), ("w1", "w2", "x"), 10))
               if isinstance(a, CloseRound)]
    assert close.rejected == {"invalid_update": 1}


def test_without_any_outcome_the_round_fails_after_the_grace():
    m = opened_machine()
    assert not [a for a in drive(m, Tick(1_200)) if isinstance(a, CloseRound)]
    [close] = [a for a in drive(m, Tick(1_500)) if isinstance(a, CloseRound)]
    assert close.status == "failed"


# ---- the worker's rounds ----------------------------------------------------------------

def setup(round_=1, roster=("w1", "w2", "w3", "w4"), length=3) -> SecAggSetup:
    return SecureAggregationSpec().round_params(job="j", round=round_, roster=list(roster), seed=os.urandom(32),
                                                length=length, bound=1.0)


def test_a_worker_joins_rounds_of_its_run_that_name_it_and_keeps_a_delta_that_came_first():
    rounds = WorkerSecureRounds("w1", "j")
    assert rounds.provide(RUN, 1, np.zeros(3)) == []  # trained before the setup arrived: kept
    sends, _ = rounds.on_message(RUN, 1, setup())
    assert [s.phase for s in sends] == ["advertise"]
    assert rounds.on_message(RUN, 2, setup(round_=2, roster=("w2", "w3", "w4"))) == ([], [])  # not in roster
    older = new_run_id(1_600_000_000_000)
    assert rounds.on_message(older, 3, setup(round_=3)) == ([], [])  # an older run is not followed
    assert rounds.provide(None, 1, np.zeros(3)) == []


def test_dropout_simulation_parses_phase_round_and_silence():
    assert SimulatedDropout.parse("input@2") == SimulatedDropout("input", 2, False)
    assert SimulatedDropout.parse("unmask@1:silent") == SimulatedDropout("unmask", 1, True)
    for bad in ("input", "sideways@1", "input@x", "input@1:loud"):
        with pytest.raises(ValueError):
            SimulatedDropout.parse(bad)


# ---- the server exchange with in-process participants -----------------------------------

async def exchange_round(values: dict[str, np.ndarray], tamper: str | None = None):
    params = setup(roster=tuple(values), length=4)
    rejected = []
    participants = {w: SecAggParticipant(w, params) for w in values}

    async def publish(suffix: str, body) -> None:
        for w, p in participants.items():
            try:
                sends, _ = p.on_message(body)
            except SecAggAbort:  # e.g. the tampering worker, asked to unmask as if it had dropped
                continue
            if suffix == "secagg.keys" or suffix.startswith("secagg.bundle") or suffix == "secagg.unmask":
                for s in sends:
                    tensors = s.tensors
                    if s.phase == "input" and w == tamper:  # one value short of the round's length
                        tensors = {SecAggInput.TENSOR: s.tensors[SecAggInput.TENSOR][:-1]}
                    exchange.offer(w, type(s.body).TYPE, s.body, tensors)

    exchange = ServerExchange(params, publish, lambda r, d, s: rejected.append((r, s)), phase_timeout_s=0.5,
                              join_timeout_s=0.5, min_survivors=3)
    run = asyncio.create_task(exchange.run())
    await asyncio.sleep(0)
    for w, p in participants.items():
        for s in p.start() + p.provide(values[w]):
            exchange.offer(w, type(s.body).TYPE, s.body, s.tensors)
    result = await run
    return quantizer_of(params).dequantize_sum(result.total), result, rejected


def test_a_masked_input_of_the_wrong_length_is_refused_by_name_and_the_sum_of_the_rest_is_right():
    rng = np.random.default_rng(3)
    values = {w: rng.uniform(-1, 1, 4) for w in ("w1", "w2", "w3", "w4", "w5")}
    total, result, rejected = asyncio.run(exchange_round(values, tamper="w3"))
    assert rejected == [("wrong_length", "w3")]
    assert result.survivors == ["w1", "w2", "w4", "w5"] and result.dropped == ["w3"]
    plain = sum(values[w] for w in result.survivors)
    assert np.abs(total - plain).max() <= 5 / (2 * 65536.0)
    total, result, rejected = asyncio.run(exchange_round(values))
    assert rejected == [] and np.abs(total - sum(values.values())).max() <= 5 / (2 * 65536.0)


# ---- composition with distributed DP ------------------------------------------------------

DP = {"mode": "distributed", "noise_multiplier": 1.0, "clip": {"fixed": 0.5}, "target_delta": 1e-5,
      "max_epsilon": 10}


def test_workers_clip_then_noise_before_masking_and_the_dp_rule_takes_the_secure_sum():
    from fedbus.coordinator.factory import rule_for
    from fedbus.transforms import build_worker_pipeline

    assert build_worker_pipeline(JobSpec.model_validate(job(**SA))).names == ("clip", "encode")
    spec = JobSpec.model_validate(job(secure_aggregation={}, dp=DP))
    assert build_worker_pipeline(spec).names == ("clip", "dp_noise", "encode")
    rule = rule_for(spec)  # DP-FedAvg, distributed: the uniform mean, no server noise
    base = {"w": torch.zeros(3)}
    acc = rule.begin(base, 0)
    acc.merge(secure_sum_partial(rule, base, 0, np.array([0.3, -0.6, 0.9]), ["w1", "w2", "w3"]))
    assert acc.finalize()["w"].tolist() == pytest.approx([0.1, -0.2, 0.3])
