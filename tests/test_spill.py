"""fedbus/spill.py: tensors backed by an unlinked, copy-on-write mapped file, and buffered
rules spilling their contributions above a threshold with bit-identical results."""

from __future__ import annotations

import gc
import os

import pytest
import torch

from fedbus.aggregation.base import Contribution
from fedbus.aggregation.specs import build_rule
from fedbus.spill import PREFIX, configure_spill, disable_spill, filesystem_type, page_out_, spill_policy, spill_state

MB = 1024 * 1024


@pytest.fixture(autouse=True)
def no_policy_left_behind():
    disable_spill()
    yield
    disable_spill()


def rss_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/self/status")


def mapping_of(t: torch.Tensor) -> tuple[str, str]:
    """(permissions, path) of the mapping holding t's data, from /proc/self/maps."""
    address = t.data_ptr()
    with open("/proc/self/maps", encoding="utf-8") as fh:
        for line in fh:
            fields = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end:
                return fields[1], fields[5].strip() if len(fields) > 5 else ""
    raise AssertionError("address not mapped")


def assert_file_backed(t: torch.Tensor, directory) -> None:
    perms, path = mapping_of(t)
    assert perms == "rw-p", perms  # MAP_PRIVATE: copy-on-write
    assert path.startswith(f"{directory}/{PREFIX}") and path.endswith("(deleted)"), path


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = a.resolve_conj().resolve_neg().contiguous(), b.resolve_conj().resolve_neg().contiguous()
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def every_kind() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    c = torch.randn(4, 3, dtype=torch.complex64, generator=g)
    out = {dt_name: base.to(dt) for dt_name, dt in [("f32", torch.float32), ("f16", torch.float16),
                                                      ("bf16", torch.bfloat16), ("f64", torch.float64)]}
    out.update({
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8), "u8": torch.arange(255, dtype=torch.uint8),
        "i16": torch.tensor([-3, 7], dtype=torch.int16), "i32": torch.tensor([[1, -2], [3, 4]], dtype=torch.int32),
        "i64": torch.tensor([2**62, -1]), "bool": torch.tensor([True, False, True]),
        "c64": c, "c128": c.to(torch.complex128),
        "scalar": torch.tensor(3.5), "int_scalar": torch.tensor(100), "empty": torch.empty(0, 4),
        "transposed": base.t(), "strided": base[::2, 1::2], "conj": c.conj(),
        "nan_inf": torch.tensor([float("nan"), float("inf"), -0.0]),
    })
    return out


def test_spill_state_keeps_every_dtype_and_value_and_leaves_no_file(tmp_path):
    state = every_kind()
    out = spill_state(state, tmp_path)
    assert list(out) == list(state)
    for k, t in state.items():
        assert same_bits(out[k], t), k
        assert out[k].is_contiguous()
        if t.numel():
            assert_file_backed(out[k], tmp_path)
    assert not os.listdir(tmp_path)  # unlinked right after mapping
    out["f32"].add_(1.0)  # copy-on-write: in-place works, nothing else changes
    assert torch.equal(out["f32"], state["f32"] + 1.0) and same_bits(out["f64"], state["f64"])


def test_spilled_tensors_are_not_anonymous_memory(tmp_path):
    x = torch.randn(16 * MB)  # 64 MB
    before = rss_kib("RssAnon")
    y = spill_state({"x": x}, tmp_path)["x"]
    expected = x.sum().item()
    del x
    gc.collect()
    assert y.sum().item() == expected  # every page of y read back
    # The 64 MB left anonymous memory and the spilled copy did not take its place.
    assert rss_kib("RssAnon") < before - 48 * 1024
    assert_file_backed(y, tmp_path)


def test_page_out_rebinds_in_place_keeps_views_and_frees_memory(tmp_path):
    w = torch.randn(12 * MB)  # 48 MB: far above any glibc mmap threshold, so freeing it unmaps it
    expected = w.clone()
    holder = {"w": w}
    view = w[: 4 * MB].view(1024, -1)  # another tensor on the same storage
    p = torch.nn.Parameter(torch.randn(3, 4))
    p_values = p.detach().clone()
    state = {"w": w, "view": view, "p": p, "t": expected[:6].view(2, 3).t(), "empty": torch.empty(0)}
    t_values = state["t"].clone()
    expected_sum = expected.sum().item()
    del expected
    gc.collect()
    before = rss_kib("RssAnon")
    page_out_(state, tmp_path)
    gc.collect()
    assert holder["w"] is w and state["w"] is w  # the same objects, rebound
    assert_file_backed(w, tmp_path)
    assert view.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()  # still one storage
    assert w.sum().item() == expected_sum and same_bits(p.detach(), p_values) and same_bits(state["t"], t_values)
    assert state["t"].stride() == (1, 3) and p.requires_grad and isinstance(p, torch.nn.Parameter)
    assert not os.listdir(tmp_path)
    assert rss_kib("RssAnon") < before - 36 * 1024  # w's 48 MB went back
    view[0, 0] = 42.0  # in place still works and aliasing is kept
    assert w[0].item() == 42.0
    w.mul_(2)
    assert view[0, 0].item() == 84.0


def test_configure_spill_checks_its_arguments(tmp_path):
    with pytest.raises(ValueError):
        configure_spill(tmp_path, -1)
    with pytest.raises(ValueError):
        configure_spill(tmp_path, 1.5)
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError):
        configure_spill(tmp_path / "file" / "sub", 0)
    assert spill_policy() is None
    policy = configure_spill(tmp_path / "new", 1000)
    assert policy.threshold == 1000 and (tmp_path / "new").is_dir() and not os.listdir(tmp_path / "new")
    assert filesystem_type(tmp_path) is not None and filesystem_type(tmp_path.parent / "..") is not None
    assert filesystem_type(type(tmp_path)("/proc/self")) == "proc"


# ---- buffered rules ------------------------------------------------------------------------

RULES = [{"name": "median"}, {"name": "trimmed_mean", "beta": 0.2}, {"name": "krum", "f": 1},
         {"name": "multi_krum", "f": 1, "m": 3}, {"name": "geometric_median"}, {"name": "bulyan", "f": 1},
         {"name": "median", "nnm": {"f": 1}}, {"name": "trimmed_mean", "beta": 0.2, "bucketing": {"s": 2}},
         {"name": "median", "norm_bound": {"max_norm": 3.0}}]
N = 7


def model() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"w": torch.randn(40, 30, generator=g), "h": torch.randn(50, generator=g).to(torch.bfloat16),
            "c": torch.randn(10, dtype=torch.complex64, generator=g), "bn.num_batches_tracked": torch.tensor(5),
            "mask": torch.tensor([True, False])}


def round_result(spec: dict, base: dict[str, torch.Tensor]):
    acc = build_rule(spec).begin(base, 3)
    for i in range(N):
        g = torch.Generator().manual_seed(100 + i)
        local = {k: (v + torch.randn(v.shape, dtype=v.dtype, generator=g) if v.is_floating_point() or v.is_complex()
                     else v + i if v.dtype != torch.bool else v) for k, v in base.items()}
        acc.fold(acc.from_local_state(f"w{i}", 1.0 + i, local))
    return acc, acc.finalize()


def buffer_of(acc):
    while not hasattr(acc, "spilled_bytes"):  # a norm bound wraps the buffer
        acc = acc.inner
    return acc


@pytest.mark.parametrize("spec", RULES, ids=lambda s: "+".join(str(v) for v in s.values() if not isinstance(v, float)))
def test_buffered_rules_give_the_same_bits_when_they_spill(tmp_path, spec):
    base = model()
    _, expected = round_result(spec, base)
    one = sum(t.numel() * t.element_size() for k, t in base.items() if k != "mask")  # a delta's bytes
    configure_spill(tmp_path, 2 * one)
    acc, got = round_result(spec, base)
    buf = buffer_of(acc)
    assert buf.resident_bytes == 2 * one and buf.spilled_bytes == (N - 2) * one
    for c in buf.updates[2:]:
        assert_file_backed(c.delta["w"], tmp_path)
    if "nnm" in spec or "bucketing" in spec:  # the mixed inputs: two in memory, the rest written as computed
        k = len(buf.inner.updates)
        assert buf.inner.resident_bytes == 2 * one and buf.inner.spilled_bytes == (k - 2) * one
        for c in buf.inner.updates[2:]:
            assert_file_backed(c.delta["w"], tmp_path)
    assert list(got) == list(expected)
    for k in expected:
        assert same_bits(got[k], expected[k]), k
    assert not os.listdir(tmp_path)


def test_tensor_extras_spill_with_the_deltas_and_scalars_stay(tmp_path):
    configure_spill(tmp_path, 0)
    base = {"w": torch.zeros(4)}
    acc = build_rule({"name": "median"}).begin(base)
    extras = {"group": {"w": torch.ones(4)}, "one": torch.arange(3.0), "a": 0.5}
    acc.fold(Contribution("x", 0, 1.0, {"w": torch.full((4,), 2.0)}, extras))
    kept = acc.updates[0]
    assert_file_backed(kept.delta["w"], tmp_path)
    assert_file_backed(kept.extras["group"]["w"], tmp_path)
    assert_file_backed(kept.extras["one"], tmp_path)
    assert kept.extras["a"] == 0.5 and torch.equal(kept.extras["one"], torch.arange(3.0))
    assert acc.spilled_bytes == 4 * 4 * 2 + 3 * 4


def test_a_spill_that_cannot_be_written_keeps_the_round_in_memory(tmp_path):
    base = model()
    _, expected = round_result({"name": "median"}, base)
    configure_spill(tmp_path / "spill", 0)
    (tmp_path / "spill").rmdir()  # the directory vanished: every write fails
    acc, got = round_result({"name": "median"}, base)
    assert acc.spilled_bytes == 0 and acc.resident_bytes > 0
    assert all(same_bits(got[k], expected[k]) for k in expected)


def test_cli_byte_sizes_and_default_spill_directory(tmp_path):
    import argparse

    from fedbus.cli import build_parser, byte_size, configure_spill_from

    assert [byte_size(s) for s in ("0", "4096", "512M", "2G", "2GiB", "3kb", "1T")] == \
        [0, 4096, 512 * MB, 2 << 30, 2 << 30, 3072, 1 << 40]
    for bad in ("", "-1", "1.5G", "M", "12X"):
        with pytest.raises(argparse.ArgumentTypeError):
            byte_size(bad)
    args = build_parser().parse_args(["coordinator", "--job", "j", "--federation", "f", "--key", "k",
                                      "--spill-above", "1M"])
    configure_spill_from(args, tmp_path / "run" / "spill")
    assert spill_policy().directory == tmp_path / "run" / "spill" and spill_policy().threshold == MB
    args = build_parser().parse_args(["aggregator", "--job", "j", "--federation", "f", "--key", "k", "--region", "r"])
    disable_spill()
    configure_spill_from(args, tmp_path)
    assert spill_policy() is None  # off unless asked for


def test_spill_writer_takes_pieces_in_any_order_and_rounds_like_copy(tmp_path):
    from fedbus.spill import SpillWriter, is_spilled

    values = torch.randn(10, dtype=torch.float64)
    w = SpillWriter({"a": ((2, 5), torch.bfloat16), "z": ((0,), torch.float32), "c": ((3,), torch.complex64),
                     "gap": ((4,), torch.int32)}, tmp_path)
    w.write_values("c", 2, values[:4])  # real/imaginary parts 2..5 of c, i.e. c[1:3]
    w.write_values("a", 5, values[5:])
    w.write_values("a", 0, values[:5])
    w.write_values("c", 0, values[8:])
    with pytest.raises(ValueError):
        w.write_values("a", 6, values[:5])  # past the end
    out = w.finish()
    assert not os.listdir(tmp_path)
    assert same_bits(out["a"], torch.empty(2, 5, dtype=torch.bfloat16).copy_(values.view(2, 5)))
    expected_c = torch.empty(3, dtype=torch.complex64)
    torch.view_as_real(expected_c).reshape(-1).copy_(torch.cat([values[8:], values[:4]]))
    assert same_bits(out["c"], expected_c) and is_spilled(out["c"]) and not is_spilled(values)
    assert out["z"].shape == (0,) and torch.equal(out["gap"], torch.zeros(4, dtype=torch.int32))  # never written
    aborted = SpillWriter({"x": ((3,), torch.float32)}, tmp_path)
    assert len(os.listdir(tmp_path)) == 1
    aborted.abort()
    assert not os.listdir(tmp_path)


def test_mixed_inputs_are_written_as_computed_or_else_computed_in_memory(tmp_path, monkeypatch):
    import fedbus.aggregation.preaggregation as preaggregation
    from fedbus.spill import SpillWriter

    class Counting(SpillWriter):
        finished = 0

        def finish(self):
            Counting.finished += 1
            return super().finish()

    class FullDisk(SpillWriter):
        def write_values(self, key, start, values):
            raise OSError(28, "No space left on device")

    spec = {"name": "median", "nnm": {"f": 1}}
    base = model()
    _, expected = round_result(spec, base)
    configure_spill(tmp_path, 0)
    monkeypatch.setattr(preaggregation, "SpillWriter", Counting)
    acc, _ = round_result(spec, base)
    assert Counting.finished == 1  # every mixed input went to one file straight from the pass
    assert len({c.delta["w"].untyped_storage().data_ptr() for c in acc.inner.updates}) == 1
    monkeypatch.setattr(preaggregation, "SpillWriter", FullDisk)
    acc, got = round_result(spec, base)
    assert acc.spilled_bytes > 0 and acc.inner.spilled_bytes > 0  # the inner buffer spilled them itself
    assert all(same_bits(got[k], expected[k]) for k in expected)
    assert not os.listdir(tmp_path)


def test_leftovers_of_a_killed_process_are_removed_and_nothing_else(tmp_path):
    from fedbus.spill import PREFIX, remove_leftovers

    stale = tmp_path / f"{PREFIX}abc123"
    stale.write_bytes(b"x" * 4096)  # created, never mapped: the process died in between
    other = tmp_path / "notes.txt"
    other.write_text("keep")
    target = tmp_path / "elsewhere"
    target.write_text("keep")
    (tmp_path / f"{PREFIX}link").symlink_to(target)
    assert remove_leftovers(tmp_path) == 1
    assert not stale.exists() and other.exists() and target.exists() and (tmp_path / f"{PREFIX}link").is_symlink()
    assert remove_leftovers(tmp_path / "missing") == 0
