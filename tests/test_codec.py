"""The tensor codec: exact round trips for every dtype, one copy on decode, and only
CodecError (never anything else) for bytes that are not a well-formed tensor section."""

from __future__ import annotations

import struct
import warnings

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from fedbus.protocol.codec import (
    ALIGN,
    MAGIC,
    NUMPY_DTYPES,
    TORCH_DTYPES,
    CodecError,
    TensorSpec,
    decode_tensors,
    encode_tensors,
    read_specs,
    spec_of,
)

# Budgets keep the file at a few seconds; the per-dtype tests share the work 31 ways.
PER_DTYPE = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---- helpers -------------------------------------------------------------------------

def torch_bytes(t: torch.Tensor) -> bytes:
    t = t.contiguous()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def value_bytes(v) -> bytes:
    return torch_bytes(v) if isinstance(v, torch.Tensor) else np.ascontiguousarray(v).tobytes()


def itemsize(kind: str, dtype: str) -> int:
    if kind == "t":
        return torch.empty(0, dtype=TORCH_DTYPES[dtype]).element_size()
    return NUMPY_DTYPES[dtype].itemsize


def make_value(kind: str, dtype: str, shape: tuple[int, ...], raw: bytes):
    """A tensor/array of exactly these bytes (any bit pattern: NaN payloads, odd bools)."""
    if kind == "t":
        if not raw:
            return torch.empty(shape, dtype=TORCH_DTYPES[dtype])
        flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        return flat.view(TORCH_DTYPES[dtype]).reshape(shape).clone()
    return np.frombuffer(raw, dtype=NUMPY_DTYPES[dtype]).reshape(shape).copy()


def assert_same(decoded: dict, original: dict) -> None:
    assert list(decoded) == list(original)
    for name, want in original.items():
        got = decoded[name]
        assert type(got) is type(want), name  # torch stays torch, numpy stays numpy
        assert got.dtype == want.dtype, name
        assert tuple(got.shape) == tuple(want.shape), name
        assert value_bytes(got) == value_bytes(want), name


def section(entries: list, data: bytes = b"", *, header: bytes | None = None) -> bytes:
    """Hand-built tensor section, laid out exactly as the module docstring describes."""
    h = msgpack.packb(entries, use_bin_type=True) if header is None else header
    start = (8 + len(h) + ALIGN - 1) // ALIGN * ALIGN
    return MAGIC + struct.pack("<I", len(h)) + h + b"\0" * (start - 8 - len(h)) + data


def parse(encoded: bytes) -> tuple[list, int]:
    """Header entries and the start of the raw data, read independently of the codec."""
    (hlen,) = struct.unpack("<I", encoded[4:8])
    entries = msgpack.unpackb(encoded[8:8 + hlen], raw=False)
    return entries, (8 + hlen + ALIGN - 1) // ALIGN * ALIGN


def address_range(v) -> tuple[int, int]:
    if isinstance(v, torch.Tensor):
        start = v.data_ptr()
        return start, start + v.numel() * v.element_size()
    start = v.__array_interface__["data"][0]
    return start, start + v.nbytes


# ---- strategies ----------------------------------------------------------------------

shapes = st.lists(st.integers(0, 4), min_size=0, max_size=4).map(tuple)
names = st.text(min_size=1, max_size=12)


@st.composite
def values(draw, kind: str | None = None, dtype: str | None = None):
    kind = kind or draw(st.sampled_from(["t", "n"]))
    table = TORCH_DTYPES if kind == "t" else NUMPY_DTYPES
    dtype = dtype or draw(st.sampled_from(sorted(table)))
    shape = draw(shapes)
    n = int(np.prod(shape, dtype=np.int64)) * itemsize(kind, dtype)
    return make_value(kind, dtype, shape, draw(st.binary(min_size=n, max_size=n)))


state_dicts = st.dictionaries(names, values(), min_size=0, max_size=5)


# ---- round trips ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", sorted(TORCH_DTYPES))
@PER_DTYPE
@given(data=st.data())
def test_every_torch_dtype_round_trips(dtype, data):
    sd = {"a": data.draw(values("t", dtype)), "b": data.draw(values("t", dtype))}
    assert_same(decode_tensors(encode_tensors(sd)), sd)


@pytest.mark.parametrize("dtype", sorted(NUMPY_DTYPES))
@PER_DTYPE
@given(data=st.data())
def test_every_numpy_dtype_round_trips(dtype, data):
    sd = {"a": data.draw(values("n", dtype)), "b": data.draw(values("n", dtype))}
    assert_same(decode_tensors(encode_tensors(sd)), sd)


@FAST
@given(sd=state_dicts)
def test_mixed_state_dicts_round_trip_and_are_writable(sd):
    encoded = encode_tensors(sd)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when it wraps a read-only buffer
        decoded = decode_tensors(encoded)
    assert_same(decoded, sd)
    assert read_specs(encoded) == spec_of(sd) == spec_of(decoded)
    entries, _ = parse(encoded)
    assert all(off % ALIGN == 0 for _, _, _, _, off, _ in entries)
    for name, v in decoded.items():
        if isinstance(v, np.ndarray):
            assert v.flags.writeable, name
            assert v.base is not None or v.size == 0
        if v.numel() if isinstance(v, torch.Tensor) else v.size:
            before = value_bytes(v)
            view = v.reshape(-1).view(torch.uint8) if isinstance(v, torch.Tensor) else v.reshape(-1).view(np.uint8)
            view[0] = (int(view[0]) + 1) % 256
            assert value_bytes(v) != before, name


@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (0, 0, 2), (1,), (2, 3)])
def test_zero_dim_and_zero_size(shape):
    sd = {"t": torch.ones(shape), "n": np.ones(shape, dtype=np.int16)}
    assert_same(decode_tensors(encode_tensors(sd)), sd)


def test_nan_payloads_survive_bit_for_bit():
    raw = struct.pack("<3I", 0x7FC00001, 0xFFC12345, 0x7F800000)  # two NaNs, +inf
    sd = {"t": make_value("t", "float32", (3,), raw), "n": make_value("n", "float32", (3,), raw)}
    out = decode_tensors(encode_tensors(sd))
    assert value_bytes(out["t"]) == raw and value_bytes(out["n"]) == raw


def test_real_module_state_dict_round_trips():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 3))
    model.train()
    for _ in range(3):
        model(torch.randn(8, 4))
    sd = model.state_dict()
    assert sd["0.num_batches_tracked"].dtype == torch.int64
    assert int(sd["0.num_batches_tracked"]) == 3
    decoded = decode_tensors(encode_tensors(sd))
    assert_same(decoded, dict(sd))
    clone = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 3))
    clone.load_state_dict(decoded)
    model.eval(), clone.eval()
    x = torch.randn(5, 4)
    assert torch.equal(model(x), clone(x))


def test_encoder_accepts_non_contiguous_grad_and_lazy_views():
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    z = torch.tensor([1 + 2j, 3 - 4j])
    sd = {
        "transposed": base.t(),
        "sliced": base[:, 1],
        "one_of_strided": base[:1, 2],  # 1 element, stride 4: "contiguous" yet not unit-stride
        "grad": torch.ones(2, requires_grad=True),
        "conj": z.conj(),
        "neg": z.conj().imag,
        "np_strided": np.arange(10, dtype=np.int32)[::3],
    }
    out = decode_tensors(encode_tensors(sd))
    for name, v in sd.items():
        want = v.detach().resolve_conj().resolve_neg() if isinstance(v, torch.Tensor) else v
        got = out[name]
        if isinstance(v, torch.Tensor):
            assert torch.equal(got, want), name
            assert not got.requires_grad
        else:
            assert np.array_equal(got, want), name


def _complex32():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "ComplexHalf support is experimental"
        return torch.zeros(2, dtype=torch.complex32)


@pytest.mark.parametrize("make", [
    lambda: np.arange(3, dtype=">f4"),  # non-native byte order
    lambda: np.array(["a"]),  # no fixed-width numeric dtype
    lambda: np.array([1], dtype=object),
    _complex32,  # no entry in TORCH_DTYPES
    lambda: [1.0, 2.0],
    lambda: 3.0,
], ids=["big-endian", "str", "object", "complex32", "list", "float"])
def test_encoding_unsupported_values_raises_codec_error(make):
    with pytest.raises(CodecError):
        encode_tensors({"x": make()})


# ---- one copy on decode --------------------------------------------------------------

def test_decode_copies_the_input_exactly_once():
    sd = {
        "a": torch.arange(10, dtype=torch.float32),
        "b": torch.ones(3, 3, dtype=torch.float64),
        "c": np.arange(7, dtype=np.int16),
        "d": torch.tensor(5, dtype=torch.int64),
        "e": torch.zeros(0),
    }
    encoded = encode_tensors(sd)
    buf = bytearray(encoded)
    decoded = decode_tensors(buf)
    snapshot = {k: value_bytes(v) for k, v in decoded.items()}

    # 1. the tensors do not alias the caller's buffer: scribbling over it changes nothing
    buf[:] = b"\xff" * len(buf)
    assert {k: value_bytes(v) for k, v in decoded.items()} == snapshot
    assert_same(decoded, sd)

    # 2. they are views into one shared buffer: addresses relative to each other are
    #    exactly the header offsets, so they all live in one allocation of the data size
    entries, data_start = parse(encoded)
    offsets = {e[0]: e[4] for e in entries}
    ranges = {k: address_range(v) for k, v in decoded.items() if value_bytes(v)}
    assert len(ranges) == 4
    first = min(ranges, key=lambda k: offsets[k])
    base = ranges[first][0] - offsets[first]
    for name, (start, end) in ranges.items():
        assert start - base == offsets[name], name
        assert end - base <= len(encoded) - data_start, name
    torch_storages = {decoded[k].untyped_storage().data_ptr() for k in ranges if isinstance(decoded[k], torch.Tensor)}
    # Each torch view's storage lies inside the same block (torch.frombuffer may or may
    # not give every view the same storage start; both are one buffer).
    for ptr in torch_storages:
        assert base <= ptr < base + len(encoded) - data_start

    # 3. writing through one decoded tensor is visible through the shared block only at
    #    its own offset: the others are untouched
    decoded["a"][0] = 42.0
    assert decoded["b"].sum().item() == 9.0 and int(decoded["d"]) == 5
    assert decoded["c"].tolist() == list(range(7))


def test_decode_accepts_memoryview_and_bytes_alike():
    sd = {"w": torch.randn(4, 2)}
    encoded = encode_tensors(sd)
    for data in (encoded, bytearray(encoded), memoryview(encoded), memoryview(b"xx" + encoded)[2:]):
        assert_same(decode_tensors(data), sd)


# ---- malformed input -----------------------------------------------------------------

def valid_section() -> bytes:
    return encode_tensors({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": np.arange(3, dtype=np.int64)})


def test_every_truncation_fails_cleanly_or_only_drops_padding():
    encoded = valid_section()
    entries, data_start = parse(encoded)
    needed = data_start + max(off + n for *_, off, n in entries)
    for cut in range(len(encoded) + 1):
        if cut < needed:
            with pytest.raises(CodecError):
                decode_tensors(encoded[:cut])
            with pytest.raises(CodecError):
                read_specs(encoded[:cut])
        else:  # only alignment padding after the last tensor is gone
            assert_same(decode_tensors(encoded[:cut]), decode_tensors(encoded))


@pytest.mark.parametrize("data", [
    b"", b"FBT", b"FBT1", b"FBT1\0\0\0", b"XBT1" + valid_section()[4:], b"fbt1" + valid_section()[4:],
])
def test_bad_magic_or_too_short(data):
    with pytest.raises(CodecError):
        decode_tensors(data)


@pytest.mark.parametrize("entries,data", [
    ([["w", "t", "float32", [2], 0, 8]], b"\0" * 4),  # runs past the data
    ([["w", "t", "float32", [2], 60, 8]], b"\0" * 64),  # starts inside, ends outside
    ([["w", "t", "float32", [2], -8, 8]], b"\0" * 64),  # negative offset
    ([["w", "t", "float32", [2], 2**64 - 1, 8]], b"\0" * 64),  # beyond any buffer
    ([["w", "t", "float32", [2], 0, -8]], b"\0" * 64),  # negative size
    ([["w", "n", "float32", [1], 64, 4]], b"\0" * 64),  # offset == end, size > 0
], ids=["past-end", "straddles-end", "negative-offset", "huge-offset", "negative-size", "at-end"])
def test_offsets_outside_data(entries, data):
    with pytest.raises(CodecError):
        decode_tensors(section(entries, data))


@pytest.mark.parametrize("entries", [
    [["w", "t", "float32", [3], 0, 8]],  # 12 bytes needed
    [["w", "t", "float32", [2], 0, 12]],
    [["w", "n", "int16", [2, 2], 0, 4]],
    [["w", "t", "bool", [], 0, 0]],  # 0-dim holds one element
    [["w", "t", "float64", [0], 0, 8]],
    [["w", "t", "float32", [2**32, 2**32], 0, 0]],  # int64 overflow wraps to 0
    [["w", "n", "float32", [2**32, 2**32], 0, 0]],
    [["w", "t", "uint8", [2**64 - 1], 0, 8]],
], ids=["too-few-bytes", "too-many-bytes", "numpy", "zero-dim", "zero-size", "wrap-t", "wrap-n", "u64-dim"])
def test_size_shape_mismatch(entries):
    with pytest.raises(CodecError):
        decode_tensors(section(entries, b"\0" * 64))


@pytest.mark.parametrize("entries", [
    [["w", "t", "float32", [True], 0, 4]],  # msgpack booleans are not dimensions
    [["w", "n", "float32", [1], False, 4]],
    [["w", "t", "float32", [-1], 0, 4]],
    [["w", "t", "float32", [1.0], 0, 4]],
    [["w", "t", "float32", "4", 0, 4]],
    [["w", "n", "float32", [0] * 65, 0, 0]],  # more dims than numpy supports
    [["w", "t", "float32", [0, 2**62, 2**62], 0, 0]],  # empty, but strides overflow
    [["w", "x", "float32", [1], 0, 4]],
    [["w", "n", "bfloat16", [1], 0, 2]],  # numpy has no bfloat16
    [["w", "t", "float33", [1], 0, 4]],
    [[7, "t", "float32", [1], 0, 4]],
    [["w", "t", "float32", [1], 0]],
    ["w"],
    [None],
], ids=lambda e: repr(e)[:40])
def test_malformed_entries(entries):
    with pytest.raises(CodecError):
        decode_tensors(section(entries, b"\0" * 64))
    with pytest.raises(CodecError):
        read_specs(section(entries, b"\0" * 64))


@pytest.mark.parametrize("header", [
    b"\xc1",  # never-used msgpack byte
    msgpack.packb({"w": 1}),
    msgpack.packb("list"),
    msgpack.packb([1, 2])[:-1],  # truncated msgpack
    msgpack.packb([1]) + b"\x00",  # trailing bytes inside the declared header
    msgpack.packb({1: 2}),  # int map key
])
def test_header_not_a_msgpack_list(header):
    with pytest.raises(CodecError):
        decode_tensors(section([], b"", header=header))


def test_header_length_beyond_buffer():
    good = valid_section()
    bad = good[:4] + struct.pack("<I", len(good)) + good[8:]
    with pytest.raises(CodecError):
        decode_tensors(bad)


def test_duplicate_names():
    entries = [["w", "t", "float32", [1], 0, 4], ["w", "t", "float32", [1], 64, 4]]
    with pytest.raises(CodecError, match="duplicate"):
        decode_tensors(section(entries, b"\0" * 128))
    with pytest.raises(CodecError, match="duplicate"):
        read_specs(section(entries, b"\0" * 128))


def test_empty_section_round_trips():
    assert decode_tensors(encode_tensors({})) == {}


# ---- fuzzing: CodecError or success, nothing else -----------------------------------

def decode_or_codec_error(data: bytes) -> None:
    for fn in (decode_tensors, read_specs):
        try:
            fn(data)
        except CodecError:
            pass
    # Any other exception propagates and fails the test, with hypothesis' shrunk input.


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes(data):
    decode_or_codec_error(data)


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_after_magic(data):
    decode_or_codec_error(MAGIC + data)


@st.composite
def mutated_encodings(draw):
    encoded = bytearray(encode_tensors(draw(st.dictionaries(names, values(), min_size=1, max_size=3))))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        if not encoded:
            break
        i = draw(st.integers(0, len(encoded) - 1))
        if op == "flip":
            encoded[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            encoded[i] = draw(st.integers(0, 255))
        elif op == "insert":
            encoded[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del encoded[i:i + draw(st.integers(1, 8))]
        else:
            del encoded[i:]
    return bytes(encoded)


@FUZZ
@given(mutated_encodings())
def test_random_mutations_of_valid_encodings(data):
    decode_or_codec_error(data)


msgpack_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=True),
    st.text(max_size=8), st.binary(max_size=8),
)
msgpack_values = st.recursive(msgpack_scalars, lambda inner: st.lists(inner, max_size=3)
                              | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=8)
dims = st.one_of(st.integers(0, 5), st.integers(-3, 2**64 - 1), st.booleans(), msgpack_scalars)
counts = st.one_of(st.integers(0, 200), st.sampled_from([0, 64, 128, 2**31, 2**63 - 1, 2**64 - 1]),
                   st.integers(-(2**63), 2**64 - 1), st.booleans(), msgpack_scalars)
entry = st.one_of(
    st.tuples(
        st.one_of(st.sampled_from(["w", "b"]), msgpack_scalars),
        st.one_of(st.sampled_from(["t", "n"]), msgpack_scalars),
        st.one_of(st.sampled_from(sorted(TORCH_DTYPES)), msgpack_scalars),
        st.one_of(st.lists(dims, max_size=5), st.lists(st.integers(0, 2**63), max_size=70), msgpack_values),
        counts,
        counts,
    ).map(list),
    msgpack_values,
)


@FUZZ
@given(st.lists(entry, max_size=4), st.binary(max_size=200))
def test_structured_header_fuzz(entries, data):
    decode_or_codec_error(section(entries, data))


nasty_ints = st.one_of(st.sampled_from([-1, 0, 1, 2**31, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1, -(2**63)]),
                       st.integers(-(2**63), 2**64 - 1))
nasty = st.one_of(st.booleans(), nasty_ints, msgpack_values)


def _wrap64(n: int) -> int:
    return (n + 2**63) % 2**64 - 2**63


@st.composite
def near_valid_entries(draw):
    """A valid entry with one or two fields corrupted, the size kept consistent where it can
    be, so the corruption reaches the later checks instead of failing the size check."""
    kind = draw(st.sampled_from(["t", "n"]))
    dtype = draw(st.sampled_from(sorted(TORCH_DTYPES if kind == "t" else NUMPY_DTYPES)))
    size = itemsize(kind, dtype)
    shape: list = draw(st.lists(st.integers(0, 3), max_size=3))
    entry = [draw(st.sampled_from(["w", "b"])), kind, dtype, shape, draw(st.sampled_from([0, 64, 1, 3])), 0]
    for _ in range(draw(st.integers(0, 2))):
        field = draw(st.integers(0, 5))
        if field == 3:  # still a list, with dims that are bools, huge, negative or too many
            entry[3] = draw(st.one_of(
                st.lists(st.one_of(st.integers(0, 3), st.booleans(), nasty_ints), max_size=4),
                st.lists(st.sampled_from([0, 1, 2, 2**31, 2**32, 2**62, 2**63 - 1]), max_size=4),
                st.lists(st.integers(0, 1), min_size=60, max_size=70)))
        elif field != 5:
            entry[field] = draw(nasty)
    dims = entry[3] if isinstance(entry[3], list) else []
    numel = 1
    for d in dims:
        numel *= int(d) if isinstance(d, int) else 1
    entry[5] = draw(st.sampled_from([numel * size, _wrap64(numel) * size, 0, size])) if draw(st.integers(0, 9)) \
        else draw(nasty)
    if isinstance(entry[5], int) and not -(2**63) <= entry[5] < 2**64:
        entry[5] = 0
    return entry


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(near_valid_entries(), min_size=1, max_size=3), st.sampled_from([0, 8, 64, 256]))
def test_near_valid_header_fuzz(entries, data_len):
    decode_or_codec_error(section(entries, b"\x01" * data_len))


@FUZZ
@given(msgpack_values, st.binary(max_size=64))
def test_header_of_any_msgpack_value(header, data):
    decode_or_codec_error(section([], data, header=msgpack.packb(header, use_bin_type=True)))


def test_specs_match_tensor_spec():
    assert read_specs(valid_section()) == {"w": TensorSpec("float32", (2, 3)), "b": TensorSpec("int64", (3,), "n")}
