"""The large-model data path (docs/data-path.md): bodies in pieces without copies, decoding
into views, the lean streaming fold, and the settings that follow the model's size.

The end-to-end numbers (round time against raw object-store rounds, peak memory at 1 GB)
are in benchmarks/big_payload.py; these tests check the pieces cheaply.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from fedbus.aggregation import streaming
from fedbus.aggregation.base import InvalidUpdate
from fedbus.aggregation.fedavg import WeightedMeanAccumulator
from fedbus.aggregation.fednova import FedNovaAccumulator
from fedbus.bus.blobs import read_timeout_s
from fedbus.chunking import regroup
from fedbus.jobspec import JobSpec, SecuritySpec
from fedbus.protocol.codec import decode_tensors, encode_tensors, tensor_pieces
from fedbus.protocol.messages import Update, body_pieces, decode_body, encode_body, pieces_length
from fedbus.sizing import model_fits, scaled_round_deadline_s
from fedbus.tasks.offset import task as offset_task


def state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"a": torch.randn(1000, generator=g), "empty": torch.zeros(0), "b": torch.randn(3, 7, generator=g),
            "half": torch.randn(5, generator=g).half(), "n": torch.tensor(4), "c": torch.randn(33, generator=g)}


def test_pieces_are_the_encoding_without_copying_tensor_bytes():
    s = state()
    pieces = tensor_pieces(s)
    assert b"".join(pieces) == encode_tensors(s)
    # the tensor pieces are views of the tensors' own memory
    ptrs = {t.data_ptr() for t in s.values() if t.numel()}
    views = [p for p in pieces if isinstance(p, memoryview)]
    assert len(views) == len(ptrs)
    body = body_pieces(Update(round=1, base_version=0, num_samples=3, num_steps=1), s)
    assert pieces_length(body) == len(b"".join(body)) == len(encode_body(Update(round=1, base_version=0,
                                                                              num_samples=3, num_steps=1), s))


def test_decoding_a_writable_buffer_without_copy_gives_views_over_it():
    s = state()
    buf = bytearray(encode_tensors(s))
    out = decode_tensors(buf, copy=False)
    assert all(torch.equal(out[k], s[k]) for k in s)
    lo, hi = torch.frombuffer(buf, dtype=torch.uint8).data_ptr(), torch.frombuffer(buf, dtype=torch.uint8).data_ptr() + len(buf)
    assert all(lo <= out[k].data_ptr() < hi for k in s if s[k].numel())
    out["a"][0] = 42.0  # writable, and it is the buffer
    assert decode_tensors(buf)["a"][0] == 42.0
    # a read-only buffer is still copied (tensors must be writable)
    ro = decode_tensors(bytes(buf), copy=False)
    ro["a"][1] = 7.0
    fields, tensors = decode_body(Update, encode_body(Update(round=1, base_version=0, num_samples=3, num_steps=1), s),
                                  copy=False)
    assert fields.num_samples == 3 and torch.equal(tensors["b"], s["b"])


@pytest.mark.parametrize("sizes,step", [([10, 0, 7, 30], 8), ([1], 4), ([4, 4], 4), ([100], 100), ([], 5)])
def test_regroup_makes_exact_chunks_of_pieces(sizes, step):
    data = bytes(range(sum(sizes))) if sum(sizes) < 256 else bytes(sum(sizes))
    pieces, pos = [], 0
    for n in sizes:
        pieces.append(memoryview(data)[pos:pos + n])
        pos += n
    chunks = list(regroup(pieces, step))
    assert b"".join(chunks) == data
    assert all(len(c) == step for c in chunks[:-1]) and all(isinstance(c, bytes) for c in chunks)
    assert not chunks or 0 < len(chunks[-1]) <= step


@pytest.fixture
def lean(monkeypatch):
    monkeypatch.setattr(streaming, "LEAN_MIN_ELEMENTS", 100)


def _updates(base, n=3):
    g = torch.Generator().manual_seed(9)
    return [{k: (v + 0.01 * torch.randn(v.shape, generator=g).to(v.dtype) if v.is_floating_point() else v + i)
             for k, v in base.items()} for i in range(n)]


@pytest.mark.parametrize("cls", [WeightedMeanAccumulator, FedNovaAccumulator])
def test_the_lean_fold_matches_the_exact_one_within_float32_rounding(cls, lean, monkeypatch):
    base = {k: v for k, v in state().items() if k != "half"}
    ups = _updates(base)
    acc = cls(base)
    assert acc.lean
    for i, u in enumerate(ups):
        acc.fold_local_state(f"w{i}", 1.0 + i, u, num_steps=2 + i)
    got = acc.finalize()
    monkeypatch.setattr(streaming, "LEAN_MIN_ELEMENTS", 10**12)
    exact = cls(base)
    assert not exact.lean
    for i, u in enumerate(ups):
        exact.fold(exact.from_local_state(f"w{i}", 1.0 + i, u, num_steps=2 + i))
    want = exact.finalize()
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype
        assert torch.allclose(got[k].double(), want[k].double(), atol=1e-6), k
    # A partial of a lean accumulator carries delta sums like any other: merged into an
    # exact one (same dtypes: a float32 model), it gives the same result.
    half = cls(base)
    for i, u in enumerate(ups[:2]):
        half.fold_local_state(f"w{i}", 1.0 + i, u, num_steps=2 + i)
    rest = cls(base)
    rest.fold_local_state("w2", 3.0, ups[2], num_steps=4)
    rest.merge(half.partial())
    merged = rest.finalize()
    assert all(torch.allclose(merged[k].double(), want[k].double(), atol=1e-6) for k in want)
    # The base was not touched, and the lean accumulator is spent by its in-place finalize.
    assert all(torch.equal(base[k], state()[k]) for k in base)
    with pytest.raises(RuntimeError):
        acc.finalize()


def test_the_lean_fold_refuses_what_the_exact_one_refuses(lean):
    base = {k: v for k, v in state().items() if k != "half"}
    acc = WeightedMeanAccumulator(base)
    bad_shape = dict(_updates(base, 1)[0], a=torch.zeros(999))
    with pytest.raises(InvalidUpdate):
        acc.fold_local_state("w1", 1.0, bad_shape)
    with pytest.raises(InvalidUpdate):
        acc.fold_local_state("w1", -1.0, _updates(base, 1)[0])
    missing = {k: v for k, v in _updates(base, 1)[0].items() if k != "n"}
    with pytest.raises(InvalidUpdate):
        acc.fold_local_state("w1", 1.0, missing)
    inf = dict(_updates(base, 1)[0], c=torch.full((33,), float("inf")))
    with pytest.raises(InvalidUpdate):  # non-finite: decided by the exact path
        acc.fold_local_state("w1", 1.0, inf)
    assert acc.count == 0
    acc.fold_local_state("w1", 2.0, _updates(base, 1)[0])
    assert acc.count == 1 and acc.total_weight == 2.0


def _job(**over) -> JobSpec:
    return JobSpec(job="j", task="fedbus.tasks.offset:task", rounds=1, **over)


def test_a_model_over_the_message_limit_is_refused_naming_the_limit():
    model = offset_task.build_model({"bytes": 2_000_000}).state_dict()
    assert model_fits(_job(), model) is None
    msg = model_fits(_job(security=SecuritySpec(max_message_bytes=1_000_000)), model)
    assert msg is not None and "raise security.max_message_bytes" in msg and "1000000" in msg


def test_the_round_deadline_follows_the_model_only_when_left_at_its_default():
    small = offset_task.build_model({"bytes": 1000}).state_dict()
    big = offset_task.build_model({"bytes": 80_000_000}).state_dict()
    assert scaled_round_deadline_s(_job(), small) == 30.0  # exactly: small models keep the default
    assert scaled_round_deadline_s(_job(), big) == pytest.approx(40.0, abs=0.1)
    assert scaled_round_deadline_s(_job(round_deadline_s=5.0), big) == 5.0
    assert read_timeout_s(0) == 30.0 and read_timeout_s(10**9) == 130.0


def test_the_coordinator_refuses_a_too_large_model_at_start_with_the_reason_in_summary(tmp_path):
    from fedbus.demo import write_federation

    write_federation(tmp_path, 1)
    _job(task_params={"bytes": 2_000_000}, security=SecuritySpec(max_message_bytes=1_000_000)).dump(
        tmp_path / "job.yaml")
    out = subprocess.run([sys.executable, "-m", "fedbus.cli", "coordinator", "--job", str(tmp_path / "job.yaml"),
                          "--federation", str(tmp_path / "federation.yaml"), "--key",
                          str(tmp_path / "keys/coordinator.key"), "--nats", "nats://127.0.0.1:9",
                          "--run-dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["reason"] == "model_too_large"
    assert "security.max_message_bytes" in summary["error"]
