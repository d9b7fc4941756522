"""Tensor codec: a small msgpack header (names, dtypes, shapes, offsets) plus raw bytes.

Layout of an encoded tensor section::

    b"FBT1" | u32 header_len (little endian) | msgpack header | padding | raw data

The header is a list of entries ``[name, kind, dtype, shape, offset, nbytes]`` where
``kind`` is ``"t"`` (torch) or ``"n"`` (numpy) so what goes in comes out, and offsets are
relative to the start of the raw data, each aligned to 64 bytes. Decoding copies the raw
data once into a writable buffer and then builds every tensor as a zero-copy view of it.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import msgpack
import numpy as np
import torch

MAGIC = b"FBT1"
ALIGN = 64
_LEN = struct.Struct("<I")
MAX_NDIM = 64  # numpy's limit
_MAX_EXTENT = 2**62  # bytes spanned by the strides of any decoded tensor

# Every dtype a torch state_dict can hold that has a fixed-width byte representation.
TORCH_DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "complex64": torch.complex64,
    "complex128": torch.complex128,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "uint16": torch.uint16,
    "uint32": torch.uint32,
    "uint64": torch.uint64,
    "bool": torch.bool,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}
_TORCH_NAMES = {v: k for k, v in TORCH_DTYPES.items()}

NUMPY_DTYPES = {
    name: np.dtype(name)
    for name in (
        "float64", "float32", "float16", "complex64", "complex128", "int64", "int32",
        "int16", "int8", "uint8", "uint16", "uint32", "uint64", "bool",
    )
}

Tensor = torch.Tensor | np.ndarray


class CodecError(ValueError):
    """The bytes are not a well-formed tensor section."""


@dataclass(frozen=True)
class TensorSpec:
    """What a tensor must look like: used to check updates against the model."""

    dtype: str
    shape: tuple[int, ...]


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _as_bytes_view(value: Tensor) -> tuple[str, str, tuple[int, ...], memoryview]:
    if isinstance(value, torch.Tensor):
        t = value.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.resolve_conj().resolve_neg().contiguous()  # lazy conj/neg views cannot be byte-viewed
        dtype = _TORCH_NAMES.get(t.dtype)
        if dtype is None:
            raise CodecError(f"unsupported torch dtype {t.dtype}")
        shape = tuple(t.shape)
        # A byte view works for every dtype, including ones numpy lacks (bfloat16, float8).
        flat = t.reshape(-1)
        if flat.numel() and flat.stride(0) != 1:  # a 1-element slice is "contiguous" with any stride
            flat = flat.clone(memory_format=torch.contiguous_format)
        raw = flat.view(torch.uint8).numpy() if t.numel() else np.empty(0, np.uint8)
        return "t", dtype, shape, memoryview(raw).cast("B")
    if isinstance(value, np.ndarray):
        # not np.ascontiguousarray: it turns 0-dim arrays into shape (1,)
        a = value if value.flags.c_contiguous else np.ascontiguousarray(value)
        dtype = a.dtype.name
        if dtype not in NUMPY_DTYPES:
            raise CodecError(f"unsupported numpy dtype {a.dtype}")
        if not a.dtype.isnative:
            raise CodecError("non-native byte order")
        return "n", dtype, tuple(a.shape), memoryview(a.reshape(-1).view(np.uint8))
    raise CodecError(f"cannot encode {type(value).__name__}")


def encode_tensors(tensors: Mapping[str, Tensor]) -> bytes:
    """Encode a name -> tensor mapping (torch or numpy) into one contiguous byte string."""
    entries = []
    views = []
    offset = 0
    for name, value in tensors.items():
        kind, dtype, shape, view = _as_bytes_view(value)
        entries.append([name, kind, dtype, list(shape), offset, view.nbytes])
        views.append((offset, view))
        offset = _align(offset + view.nbytes)
    header = msgpack.packb(entries, use_bin_type=True)
    data_start = _align(len(MAGIC) + _LEN.size + len(header))
    out = bytearray(data_start + offset)
    out[0:4] = MAGIC
    out[4:8] = _LEN.pack(len(header))
    out[8 : 8 + len(header)] = header
    for off, view in views:
        out[data_start + off : data_start + off + view.nbytes] = view
    return bytes(out)


def _read_header(buf: memoryview) -> tuple[list, int]:
    if buf.nbytes < 8 or bytes(buf[0:4]) != MAGIC:
        raise CodecError("bad magic")
    (hlen,) = _LEN.unpack(buf[4:8])
    if 8 + hlen > buf.nbytes:
        raise CodecError("header length beyond buffer")
    try:
        entries = msgpack.unpackb(buf[8 : 8 + hlen], raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise CodecError(f"header not msgpack: {exc}") from None
    if not isinstance(entries, list):
        raise CodecError("header is not a list")
    return entries, _align(8 + hlen)


def _check_entry(entry: object, data_len: int) -> tuple[str, str, str, tuple[int, ...], int, int]:
    if not (isinstance(entry, list) and len(entry) == 6):
        raise CodecError("malformed header entry")
    name, kind, dtype, shape, off, nbytes = entry
    if not isinstance(name, str) or kind not in ("t", "n"):
        raise CodecError("malformed header entry")
    table = TORCH_DTYPES if kind == "t" else NUMPY_DTYPES
    if not isinstance(dtype, str) or dtype not in table:  # a list or map here is unhashable
        raise CodecError(f"unknown dtype {dtype!r}")
    # type() rather than isinstance(): msgpack booleans are ints to isinstance.
    if not (isinstance(shape, list) and len(shape) <= MAX_NDIM
            and all(type(d) is int and d >= 0 for d in shape)):
        raise CodecError(f"bad shape for {name!r}")
    if not (type(off) is int and type(nbytes) is int and 0 <= off and 0 <= nbytes and off + nbytes <= data_len):
        raise CodecError(f"tensor {name!r} lies outside the data")
    itemsize = (torch.empty(0, dtype=TORCH_DTYPES[dtype]).element_size() if kind == "t"
                else NUMPY_DTYPES[dtype].itemsize)
    # Exact integer arithmetic (np.prod wraps around on overflow). Zero-size tensors must
    # still have strides torch and numpy can represent, hence the bound on non-zero dims.
    if math.prod(max(d, 1) for d in shape) * itemsize > _MAX_EXTENT:
        raise CodecError(f"shape of {name!r} is too large")
    if math.prod(shape) * itemsize != nbytes:
        raise CodecError(f"size of {name!r} does not match its shape")
    return name, kind, dtype, tuple(shape), off, nbytes


def read_specs(data: bytes | bytearray | memoryview) -> dict[str, TensorSpec]:
    """Names, dtypes and shapes only, without touching tensor bytes."""
    buf = memoryview(data)
    entries, start = _read_header(buf)
    specs = {}
    for entry in entries:
        name, _, dtype, shape, _, _ = _check_entry(entry, buf.nbytes - start)
        if name in specs:
            raise CodecError(f"duplicate tensor {name!r}")
        specs[name] = TensorSpec(dtype, shape)
    return specs


def decode_tensors(data: bytes | bytearray | memoryview) -> dict[str, Tensor]:
    """Inverse of encode_tensors. Copies the raw data exactly once."""
    buf = memoryview(data)
    entries, start = _read_header(buf)
    raw = bytearray(buf[start:])  # the single copy: makes every tensor writable
    out: dict[str, Tensor] = {}
    for entry in entries:
        name, kind, dtype, shape, off, nbytes = _check_entry(entry, len(raw))
        if name in out:
            raise CodecError(f"duplicate tensor {name!r}")
        if kind == "t":
            tdtype = TORCH_DTYPES[dtype]
            if nbytes == 0:
                out[name] = torch.empty(shape, dtype=tdtype)
            else:
                flat = torch.frombuffer(raw, dtype=torch.uint8, count=nbytes, offset=off)
                out[name] = flat.view(tdtype).view(shape)
        else:
            arr = np.frombuffer(raw, dtype=NUMPY_DTYPES[dtype], count=nbytes // max(1, NUMPY_DTYPES[dtype].itemsize), offset=off)
            out[name] = arr.reshape(shape)
    return out


def spec_of(tensors: Mapping[str, Tensor]) -> dict[str, TensorSpec]:
    specs = {}
    for name, value in tensors.items():
        _, dtype, shape, _ = _as_bytes_view(value)
        specs[name] = TensorSpec(dtype, shape)
    return specs
