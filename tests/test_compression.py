"""Update compression: codecs (hand-computed), unbiasedness, error feedback across a restart,
the receiver's bounded decode and its named rejections, and the job spec's refusals."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from fedbus.compression.codecs import (INT8_SCALE, TOPK_INDEX, TOPK_VALUE, CastCodec, CompressionError, Int8Codec,
                                       TopKCodec, stochastic_round)
from fedbus.crypto.envelopes import REASONS, Rejection
from fedbus.jobspec import JobSpec
from fedbus.protocol.messages import encode_body
from fedbus.tasks import TrainSettings, training_context
from fedbus.transforms import LocalUpdate, UpdateContext, build_worker_pipeline, decode_update
from fedbus.transforms.compress import Compress
from fedbus.worker.state import WorkerStateStore


def job(**compression) -> JobSpec:
    return JobSpec(job="cmp", task="fedbus.tasks.digits:task", rounds=2, compression=compression or {"method": "none"})


# ---- int8 -------------------------------------------------------------------------------

def test_int8_hand_computed():
    # One chunk: s = max|x| / 127 = 1.27 / 127 = 0.01; r = x / s = [127, -63.5, 0, 50].
    r = torch.tensor([127.0, -63.5, 0.0, 50.0])
    u = torch.tensor([0.3, 0.6, 0.9, 0.2])
    # floor(r + u) = [127, floor(-62.9) = -63, 0, 50]
    assert stochastic_round(r, u).tolist() == [127, -63, 0, 50]
    assert stochastic_round(torch.tensor([126.9, -127.2]), torch.tensor([0.99, 0.0])).tolist() == [127, -127]
    codec = Int8Codec(chunk_size=16, entropy_coding=False)
    x = torch.tensor([1.27, -0.635, 0.0, 0.5])
    assert codec.scales(x).tolist() == pytest.approx([0.01])
    parts = {"": torch.tensor([127, -63, 0, 50], dtype=torch.int8), INT8_SCALE: torch.tensor([0.01])}
    assert codec.decode(parts, 4, "w").tolist() == pytest.approx([1.27, -0.63, 0.0, 0.5])


def test_int8_scales_per_chunk_and_roundtrip_error_within_one_step():
    codec = Int8Codec(chunk_size=16, entropy_coding=True)
    x = torch.cat([torch.linspace(-1, 1, 16), torch.linspace(-100, 100, 16), torch.tensor([3.0])])
    parts = codec.encode(x, torch.Generator().manual_seed(0))
    s = parts[INT8_SCALE]
    assert s.tolist() == pytest.approx([1 / 127, 100 / 127, 3 / 127])  # 33 elements: 3 chunks
    got = codec.decode(parts, x.numel(), "w")
    step = s.repeat_interleave(16)[: x.numel()]
    assert bool(((got - x).abs() <= step * (1 + 1e-6)).all())  # stochastic rounding moves < one step
    assert parts[""].dtype == torch.uint8 and parts[""].numel() < x.numel() * 2


def test_int8_is_unbiased_statistically():
    """E[x^] = x: the mean of T independent quantizations is within 5 standard errors of x
    (per element, Var <= s^2/4). Round-to-nearest misses by up to s/2, here 0.35 s (8 bounds)."""
    codec = Int8Codec(chunk_size=16, entropy_coding=False)
    x = torch.tensor([1.0, 0.3, -0.77, 0.013, -0.5051, 0.25, 0.999, -0.001] * 2)  # s = 1/127
    trials = 4000
    gen = torch.Generator().manual_seed(1234)
    total = torch.zeros_like(x, dtype=torch.float64)
    for _ in range(trials):
        total += codec.decode(codec.encode(x, gen), x.numel(), "w").to(torch.float64)
    s = 1.0 / 127
    bound = 5 * (s / 2) / math.sqrt(trials)
    assert float((total / trials - x.to(torch.float64)).abs().max()) < bound
    # ...and deterministic rounding would not pass the same check:
    nearest = torch.round(x / s) * s
    assert float((nearest - x).abs().max()) > 5 * bound


# ---- top-k ------------------------------------------------------------------------------

def test_topk_hand_computed():
    codec = TopKCodec(0.5)
    parts = codec.encode(torch.tensor([0.1, -3.0, 2.0, 0.5]))
    assert parts[TOPK_INDEX].tolist() == [1, 2] and parts[TOPK_INDEX].dtype == torch.int32
    assert parts[TOPK_VALUE].tolist() == [-3.0, 2.0]
    assert codec.decode(parts, 4, "w").tolist() == [0.0, -3.0, 2.0, 0.0]
    assert [TopKCodec(0.01).k(n) for n in (1, 10, 100, 101, 9610)] == [1, 1, 1, 2, 97]


RUN = "r1700000000000-0123abcd"


def ctx_for(global_state, round_=1):
    training = training_context(job_seed=0, run=RUN, worker_id="w01", partition=0, num_partitions=1, round_=round_)
    return UpdateContext(training=training, settings=TrainSettings(), global_state=global_state, broadcast={},
                         base_version=round_ - 1)


def test_error_feedback_sends_everything_eventually_and_survives_a_restart(tmp_path):
    x = {"w": torch.zeros(10)}
    deltas = [torch.arange(10, dtype=torch.float32) / 10, torch.ones(10), -torch.arange(10, dtype=torch.float32)]
    first = Compress(TopKCodec(0.2), error_feedback=True)
    sent = torch.zeros(10)
    store = WorkerStateStore(tmp_path)
    for i, d in enumerate(deltas):
        stage = first
        if i == 2:  # a restarted worker: a fresh stage loads what the store kept
            stage = Compress(TopKCodec(0.2), error_feedback=True)
            stage.load_state_dict(store.load_strategy(RUN)["compress"])
        out = stage.apply(ctx_for(x, i + 1), LocalUpdate(i + 1, i, {"w": x["w"] + d}, 1, 1))
        assert "w" not in out.state and out.extra_groups[TOPK_INDEX]["w"].numel() == 2
        sent[out.extra_groups[TOPK_INDEX]["w"].long()] += out.extra_groups[TOPK_VALUE]["w"]
        store.save_strategy(RUN, {"compress": stage.state_dict()})
    # What was sent plus what is still kept is exactly the sum of the deltas.
    assert torch.allclose(sent + stage.residual["w"], sum(deltas), atol=1e-6)
    # Round 1 sent 0.9 and 0.8; round 2 the largest of 1 + kept: 1.7 (index 7) and 1.6 (index 6).
    assert stage.residual["w"][9].item() == pytest.approx(0.0)


# ---- the full path: worker pipeline -> body -> receiver decode --------------------------

# Big enough that tensor headers and fields (~600 bytes) do not hide the payload's ratio.
MODEL = {"a.weight": torch.linspace(-1, 1, 6000).reshape(200, 30), "a.bias": torch.zeros(20),
         "bn.num_batches_tracked": torch.tensor(7)}


def send(job_spec: JobSpec, y: dict) -> LocalUpdate:
    pipeline = build_worker_pipeline(job_spec)
    return pipeline.apply(ctx_for(MODEL), LocalUpdate(1, 0, y, 5, 2))


def receive(job_spec: JobSpec, sent: LocalUpdate, base=MODEL):
    return decode_update(build_worker_pipeline(job_spec), "w01", sent.fields, sent.tensors, base)


@pytest.mark.parametrize("spec,tol,ratio", [
    ({"method": "fp16"}, 1e-3, 1.9), ({"method": "bf16"}, 1e-2, 1.9),
    ({"method": "int8", "chunk_size": 64}, 0.05 / 127 * 1.01, 3.5),
    ({"method": "topk", "fraction": 1.0}, 1e-6, 0.4),
])
def test_roundtrip_rebuilds_the_weights(spec, tol, ratio):
    gen = torch.Generator().manual_seed(3)
    y = {k: (v + 0.05 * torch.rand(v.shape, generator=gen) if v.is_floating_point() else v + 2)
         for k, v in MODEL.items()}
    sent = send(job(**spec), y)
    got = receive(job(**spec), sent)
    for k, v in y.items():
        assert got.state[k].dtype == v.dtype and got.state[k].shape == v.shape
        assert float((got.state[k].double() - v.double()).abs().max()) <= tol, k
    plain = send(job(), y)
    assert len(encode_body(plain.fields, plain.tensors)) / len(encode_body(sent.fields, sent.tensors)) > ratio


def test_sparse_update_is_twenty_times_smaller_than_weights():
    big = {"w": torch.randn(100, 100)}
    sizes = {}
    for name, spec in (("none", {}), ("topk", {"method": "topk", "fraction": 0.01})):
        pipeline = build_worker_pipeline(job(**spec))
        out = pipeline.apply(ctx_for(big), LocalUpdate(1, 0, {"w": big["w"] + torch.randn(100, 100)}, 5, 2))
        sizes[name] = len(encode_body(out.fields, out.tensors))
    assert sizes["none"] / sizes["topk"] > 20


def tampered(spec: dict, edit) -> LocalUpdate:
    y = {k: v + 0.01 if v.is_floating_point() else v for k, v in MODEL.items()}
    sent = send(job(**spec), y)
    tensors = dict(sent.tensors)
    edit(tensors)
    return sent.with_(tensors=tensors)


TOPK = {"method": "topk", "fraction": 0.1}
INT8 = {"method": "int8", "chunk_size": 64}
INT8_RAW = {"method": "int8", "chunk_size": 64, "entropy_coding": False}


def _set(name, value):
    return lambda t: t.__setitem__(name, value)


@pytest.mark.parametrize("spec,edit,reason", [
    (TOPK, _set(f"{TOPK_INDEX}/a.weight", torch.arange(601, dtype=torch.int32)), "excessive_k"),
    (TOPK, _set(f"{TOPK_INDEX}/a.bias", torch.tensor([0, 1, 2], dtype=torch.int32)), "excessive_k"),
    (TOPK, _set(f"{TOPK_INDEX}/a.weight", torch.tensor([*range(599), 6000], dtype=torch.int32)), "index_out_of_range"),
    (TOPK, _set(f"{TOPK_INDEX}/a.weight", torch.tensor([-1, *range(1, 600)], dtype=torch.int32)),
     "index_out_of_range"),
    (TOPK, _set(f"{TOPK_INDEX}/a.weight", torch.tensor([3, *range(3, 602)], dtype=torch.int32)), "duplicate_indices"),
    (TOPK, _set(f"{TOPK_VALUE}/a.weight", torch.full((600,), float("nan"))), "non_finite"),
    (TOPK, _set(f"{TOPK_VALUE}/a.weight", torch.zeros(599)), "tensor_mismatch"),
    (TOPK, _set(f"{TOPK_INDEX}/a.weight", torch.zeros(600)), "tensor_mismatch"),  # float indices
    (TOPK, lambda t: t.pop(f"{TOPK_VALUE}/a.bias"), "tensor_mismatch"),
    (TOPK, _set("a.weight", torch.zeros(200, 30)), "tensor_mismatch"),  # a dense part beside the sparse one
    (TOPK, _set(f"{TOPK_INDEX}/nope", torch.zeros(1, dtype=torch.int32)), "tensor_mismatch"),
    (INT8, _set(f"{INT8_SCALE}/a.weight", torch.tensor([0.1, -0.1] + [0.1] * 92)), "bad_scale"),
    (INT8, _set(f"{INT8_SCALE}/a.weight", torch.tensor([0.1, float("inf")] + [0.1] * 92)), "bad_scale"),
    (INT8, _set(f"{INT8_SCALE}/a.weight", torch.tensor([0.1] * 93)), "tensor_mismatch"),
    (INT8, _set("a.weight", torch.frombuffer(bytearray(b"not deflate"), dtype=torch.uint8)), "malformed_body"),
    # A deflate bomb: 10 MB of codes for a 6000-element tensor; inflation stops at 6000 bytes.
    (INT8, _set("a.weight", torch.frombuffer(bytearray(zlib.compress(bytes(10 << 20))), dtype=torch.uint8)),
     "tensor_mismatch"),
    (INT8, _set("a.weight", torch.frombuffer(bytearray(zlib.compress(bytes(5999))), dtype=torch.uint8)),
     "tensor_mismatch"),
    (INT8_RAW, _set("a.weight", torch.zeros(200, 30, dtype=torch.int8)), "tensor_mismatch"),  # not flat
    ({"method": "fp16"}, _set("a.bias", torch.full((20,), float("inf"), dtype=torch.float16)), "non_finite"),
    ({"method": "fp16"}, _set("a.bias", torch.zeros(20)), "tensor_mismatch"),  # float32 where fp16 is due
])
def test_hostile_parts_get_named_rejections(spec, edit, reason):
    assert reason in REASONS
    bad = tampered(spec, edit)
    with pytest.raises(Rejection) as err:
        receive(job(**spec), bad)
    assert err.value.reason == reason, err.value


def test_an_honest_update_passes_the_same_checks():
    for spec in (TOPK, INT8, INT8_RAW, {"method": "fp16"}):
        receive(job(**spec), tampered(spec, lambda t: None))


def test_no_base_model_is_a_wrong_round():
    sent = tampered(TOPK, lambda t: None)
    with pytest.raises(Rejection) as err:
        receive(job(**TOPK), sent, base=None)
    assert err.value.reason == "wrong_round"


def test_codec_errors_carry_known_reasons():
    with pytest.raises(CompressionError) as err:
        CastCodec(torch.float16).decode({}, 3, "w")
    assert err.value.reason in REASONS


# ---- the job spec -----------------------------------------------------------------------

def test_job_spec_refuses_meaningless_combinations():
    with pytest.raises(ValueError, match="late_updates"):
        JobSpec(job="x", task="t:t", rounds=1, late_updates="next_round", compression={"method": "fp16"})
    with pytest.raises(ValueError, match="robust rule median"):
        JobSpec(job="x", task="t:t", rounds=1, strategy={"name": "median"}, compression={"method": "topk"})
    dp = {"dp": {"mode": "distributed", "noise_multiplier": 1.0, "clip": {"fixed": 1.0}, "target_delta": 1e-5,
                 "max_epsilon": 8.0}}
    with pytest.raises(ValueError, match="noise share"):
        JobSpec(job="x", task="t:t", rounds=1, privacy=dp, compression={"method": "topk"})
    assert JobSpec(job="x", task="t:t", rounds=1, privacy=dp, compression={"method": "int8"})
    # Dense compressions keep every coordinate: fine with a robust rule.
    assert JobSpec(job="x", task="t:t", rounds=1, strategy={"name": "median"},
                   compression={"method": "int8"}).compression.method == "int8"
    assert JobSpec(job="x", task="t:t", rounds=1, mode="async", compression={"method": "int8"})
    assert JobSpec(job="x", task="t:t", rounds=1).compression.method == "none"
    with pytest.raises(ValueError):
        JobSpec(job="x", task="t:t", rounds=1, compression={"method": "topk", "fraction": 0})
    with pytest.raises(ValueError):
        JobSpec(job="x", task="t:t", rounds=1, compression={"method": "zip"})


def test_async_sim_decodes_stale_deltas_against_their_own_base():
    """FedBuff folds updates trained from older versions: each is rebuilt from the model of
    its own base version (the machine's history), so none is refused."""
    from fedbus.sim import simulate

    spec = {"job": "cmp-async", "task": "fedbus.tasks.digits:task", "rounds": 4, "mode": "async",
            "task_params": {"model": "mlp", "partition": "iid"}, "cohort": {"min_workers": 4},
            "async": {"buffer_size": 2, "concurrency": 4},
            "train": {"epochs": 1}, "evaluation": {"server_test": True, "federated": False, "final_round": False}}
    result = simulate(JobSpec.model_validate({**spec, "compression": {"method": "topk", "fraction": 0.1}}), 4)
    assert result.reason == "completed" and result.rejected == {}
    assert max(max(r["staleness"], default=0) for r in result.rounds) >= 1  # some were stale
    assert result.final["test_accuracy"] > 0.5


@pytest.mark.parametrize("codec", [CastCodec(torch.bfloat16), Int8Codec(16, True), Int8Codec(16, False),
                                   TopKCodec(0.01)])
def test_empty_tensors_roundtrip_and_cap_inflation(codec):
    parts = codec.encode(torch.zeros(0), torch.Generator().manual_seed(0))
    assert codec.decode(parts, 0, "e").numel() == 0
    if isinstance(codec, Int8Codec) and codec.entropy_coding:
        bomb = {"": torch.frombuffer(bytearray(zlib.compress(bytes(1 << 20))), dtype=torch.uint8),
                INT8_SCALE: torch.zeros(0)}
        with pytest.raises(CompressionError, match="tensor_mismatch"):
            codec.decode(bomb, 0, "e")
