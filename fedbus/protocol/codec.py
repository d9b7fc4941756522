"""Tensor codec: a small msgpack header (names, dtypes, shapes, offsets) plus raw bytes.

Layout of an encoded tensor section::

    b"FBT1" | u32 header_len (little endian) | msgpack header | padding | raw data

The header is a list of entries ``[name, kind, dtype, shape, offset, nbytes]`` where
``kind`` is ``"t"`` (torch) or ``"n"`` (numpy) so what goes in comes out, and offsets are
relative to the start of the raw data, each aligned to 64 bytes. Decoding copies the raw
data once into a writable buffer and then builds every tensor as a zero-copy view of it.

Decoding treats the bytes as hostile: the number of tensors, the header length, name
lengths and the msgpack containers are bounded before anything is built, and the entries
must describe exactly the layout ``encode_tensors`` writes (in order, each at the aligned
end of the previous one, the data section covered up to its final alignment padding), so
a section cannot alias, overlap or smuggle bytes, and nothing is allocated on a claimed
size before the claim is checked against the actual buffer.
"""

from __future__ import annotations

import itertools
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
# A model with more tensors than this is unusual (a 70B-parameter LLM has ~1k); callers
# that know the model pass a tighter bound, which is what keeps hostile headers cheap.
DEFAULT_MAX_TENSORS = 65_536
MAX_NAME_BYTES = 512  # utf-8 bytes of one tensor name (state_dict keys are ~100)
# Upper bound on one msgpack header entry: name, kind, dtype, MAX_NDIM 9-byte dims, 2 ints.
_MAX_ENTRY_BYTES = MAX_NAME_BYTES + 3 + 2 + 16 + (3 + MAX_NDIM * 9) + 2 * 9 + 1

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
    """What a tensor must look like: used to check updates against the model.

    ``kind`` is "t" (torch) or "n" (numpy): a model is torch, and a numpy array of the
    same dtype and shape is not a drop-in for a tensor (every aggregation rule calls
    torch on it), so the kind is part of what must match.
    """

    dtype: str
    shape: tuple[int, ...]
    kind: str = "t"


class _ContainerBudget:
    """msgpack list/object hook that fails once more than ``limit`` containers were built.

    msgpack's own limits are per container; a flat list of empty maps or many small
    lists would still build millions of objects from a few MB. The hook runs as each
    container completes, so the work stops within ``limit`` containers.
    """

    def __init__(self, limit: int):
        self.left = limit

    def __call__(self, obj):
        self.left -= 1
        if self.left < 0:
            raise ValueError("too many msgpack containers")
        return obj


_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


def container_header(buf: memoryview, pos: int) -> tuple[str, int, int] | None:
    """("map" | "array", element count, position after the header) of the msgpack value
    at ``pos``, or None when it is not a container. Reads the claimed count without
    building anything, so callers check it against their bound first."""
    if pos >= buf.nbytes:
        raise ValueError("msgpack value cut short")
    b = buf[pos]
    if 0x80 <= b <= 0x9F:
        return ("map" if b < 0x90 else "array"), b & 0x0F, pos + 1
    if b in (0xDC, 0xDE):
        if pos + 3 > buf.nbytes:
            raise ValueError("msgpack header cut short")
        return ("array" if b == 0xDC else "map"), _U16.unpack(buf[pos + 1 : pos + 3])[0], pos + 3
    if b in (0xDD, 0xDF):
        if pos + 5 > buf.nbytes:
            raise ValueError("msgpack header cut short")
        return ("array" if b == 0xDD else "map"), _U32.unpack(buf[pos + 1 : pos + 5])[0], pos + 5
    return None


def unpack_values(buf: memoryview, pos: int, count: int, *, max_array_len: int = 0, max_map_len: int = 0,
                  max_str_len: int, max_bin_len: int = 0, max_containers: int = 0) -> tuple[list, int]:
    """The ``count`` consecutive msgpack values at ``pos``, and the position after them.

    Every msgpack bound is set: containers inside the values are at most
    ``max_array_len``/``max_map_len`` long and at most ``max_containers`` in all
    (msgpack preallocates a list of the claimed length for each container it is inside,
    so small per-container limits are what keep a deep nest of huge claims cheap).
    Ext types are refused. The values are decoded in C (no Python per value). Raises
    ValueError or another msgpack exception; callers map any Exception to their error.
    """
    budget = _ContainerBudget(max_containers)
    unpacker = msgpack.Unpacker(
        raw=False, strict_map_key=True, use_list=True, max_buffer_size=max(1, buf.nbytes - pos),
        max_array_len=max_array_len, max_map_len=max_map_len, max_str_len=max_str_len,
        max_bin_len=max_bin_len, max_ext_len=0, list_hook=budget, object_hook=budget,
    )
    unpacker.feed(buf[pos:])
    values = list(itertools.islice(unpacker, count))
    if len(values) != count:
        raise ValueError("msgpack values cut short")
    return values, pos + unpacker.tell()


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


def tensor_pieces(tensors: Mapping[str, Tensor]) -> list[bytes | memoryview]:
    """The encoding of ``tensors`` as consecutive pieces: the header (with its padding),
    then each tensor's bytes as a view of the tensor's own memory (zero padding between).

    Nothing is copied: ``b"".join`` of the pieces is ``encode_tensors``, and a writer
    that streams them (``BlobStore.put_stream``, a file) never builds the whole body.
    The views keep the tensors alive; they must not change until the pieces are used.
    """
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
    pieces: list[bytes | memoryview] = [
        MAGIC + _LEN.pack(len(header)) + header + bytes(data_start - 8 - len(header))]
    end = 0
    for off, view in views:
        if off > end:
            pieces.append(bytes(off - end))  # alignment padding (< ALIGN bytes)
        if view.nbytes:
            pieces.append(view)
        end = off + view.nbytes
    if offset > end:
        pieces.append(bytes(offset - end))
    return pieces


def encode_tensors(tensors: Mapping[str, Tensor]) -> bytes:
    """Encode a name -> tensor mapping (torch or numpy) into one contiguous byte string
    (one copy of the tensor bytes: ``tensor_pieces`` joined)."""
    return b"".join(tensor_pieces(tensors))


_TORCH_ITEMSIZE = {name: torch.empty(0, dtype=dt).element_size() for name, dt in TORCH_DTYPES.items()}
_NUMPY_ITEMSIZE = {name: dt.itemsize for name, dt in NUMPY_DTYPES.items()}


def max_header_len(max_tensors: int) -> int:
    return 16 + max_tensors * _MAX_ENTRY_BYTES


def _read_header(buf: memoryview, max_tensors: int) -> tuple[list, int]:
    if buf.nbytes < 8 or bytes(buf[0:4]) != MAGIC:
        raise CodecError("bad magic")
    (hlen,) = _LEN.unpack(buf[4:8])
    if 8 + hlen > buf.nbytes:
        raise CodecError("header length beyond buffer")
    if hlen > max_header_len(max_tensors):
        raise CodecError(f"header of {hlen} bytes is too long for {max_tensors} tensors")
    header = buf[8 : 8 + hlen]
    try:
        top = container_header(header, 0)
        if top is None or top[0] != "array":
            raise CodecError("header is not a list")
        _, count, pos = top
        if count > max_tensors:  # checked on the claim, before anything is built
            raise CodecError(f"{count} tensors, at most {max_tensors} allowed")
        # Only the top-level list may be long: entries have 6 fields and shapes at most
        # MAX_NDIM dims, two containers per entry, and no maps anywhere.
        entries, end = unpack_values(header, pos, count, max_array_len=MAX_NDIM, max_map_len=0,
                                     max_str_len=MAX_NAME_BYTES, max_containers=2 * count)
    except CodecError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types
        raise CodecError(f"header not msgpack within bounds: {exc}") from None
    if end != hlen:
        raise CodecError("trailing bytes in the header")
    return entries, _align(8 + hlen)


def _check_entry(entry: object, data_len: int, allow_numpy: bool) -> tuple[str, str, str, tuple[int, ...], int, int]:
    if not (isinstance(entry, list) and len(entry) == 6):
        raise CodecError("malformed header entry")
    name, kind, dtype, shape, off, nbytes = entry
    if not isinstance(name, str) or not isinstance(kind, str) or kind not in ("t", "n"):
        raise CodecError("malformed header entry")
    if kind == "n" and not allow_numpy:
        raise CodecError(f"tensor {name[:64]!r} is a numpy array; only torch tensors are allowed here")
    table = _TORCH_ITEMSIZE if kind == "t" else _NUMPY_ITEMSIZE
    if not isinstance(dtype, str) or dtype not in table:  # a list or map here is unhashable
        raise CodecError(f"unknown dtype {dtype!r}")
    # type() rather than isinstance(): msgpack booleans are ints to isinstance.
    if not (isinstance(shape, list) and len(shape) <= MAX_NDIM
            and all(type(d) is int and d >= 0 for d in shape)):
        raise CodecError(f"bad shape for {name!r}")
    if not (type(off) is int and type(nbytes) is int and 0 <= off and 0 <= nbytes and off + nbytes <= data_len):
        raise CodecError(f"tensor {name!r} lies outside the data")
    itemsize = table[dtype]
    # Exact integer arithmetic (np.prod wraps around on overflow). Zero-size tensors must
    # still have strides torch and numpy can represent, hence the bound on non-zero dims.
    if math.prod(max(d, 1) for d in shape) * itemsize > _MAX_EXTENT:
        raise CodecError(f"shape of {name!r} is too large")
    if math.prod(shape) * itemsize != nbytes:
        raise CodecError(f"size of {name!r} does not match its shape")
    return name, kind, dtype, tuple(shape), off, nbytes


_Entry = tuple[str, str, str, tuple[int, ...], int, int]


def _checked_entries(buf: memoryview, max_tensors: int, allow_numpy: bool) -> tuple[list[_Entry], int]:
    """Every entry checked, and the layout exact, before any tensor memory is touched."""
    if type(max_tensors) is not int or max_tensors < 0:
        raise ValueError("max_tensors must be a non-negative int")
    entries, start = _read_header(buf, max_tensors)
    data_len = max(0, buf.nbytes - start)
    checked: list[_Entry] = []
    names: set[str] = set()
    expected_off = 0  # where encode_tensors puts the next tensor
    end = 0
    for entry in entries:
        name, kind, dtype, shape, off, nbytes = _check_entry(entry, data_len, allow_numpy)
        if name in names:
            raise CodecError(f"duplicate tensor {name[:64]!r}")
        if off != expected_off:
            # Anything else overlaps, aliases, reorders or leaves a gap.
            raise CodecError(f"tensor {name[:64]!r} at offset {off}, expected {expected_off}")
        names.add(name)
        checked.append((name, kind, dtype, shape, off, nbytes))
        end = off + nbytes
        expected_off = _align(end)
    # The data ends after the last tensor, with at most its alignment padding (which a
    # transport may have trimmed): no trailing bytes that no tensor accounts for.
    if not end <= data_len <= expected_off:
        raise CodecError(f"data section of {data_len} bytes, tensors cover {end}")
    return checked, start


def read_specs(data: bytes | bytearray | memoryview, *, max_tensors: int = DEFAULT_MAX_TENSORS,
               allow_numpy: bool = True) -> dict[str, TensorSpec]:
    """Names, dtypes and shapes only, without touching tensor bytes."""
    entries, _ = _checked_entries(memoryview(data), max_tensors, allow_numpy)
    return {name: TensorSpec(dtype, shape, kind) for name, kind, dtype, shape, _, _ in entries}


def decode_tensors(data: bytes | bytearray | memoryview, *, max_tensors: int = DEFAULT_MAX_TENSORS,
                   allow_numpy: bool = True, copy: bool = True) -> dict[str, Tensor]:
    """Inverse of encode_tensors. Copies the raw data exactly once, or with ``copy=False``
    and a writable buffer not at all: the tensors are then views over ``data`` (the
    caller hands over a buffer nothing else writes, e.g. a blob just read).

    ``max_tensors`` bounds the count (pass the model's own count plus its extras when
    known); ``allow_numpy=False`` refuses numpy-kind entries (message bodies: the model
    is torch). Raises CodecError for anything that is not a well-formed section.
    """
    buf = memoryview(data)
    entries, start = _checked_entries(buf, max_tensors, allow_numpy)
    # Tensors must be writable: views over a writable buffer the caller gave up, or one copy.
    raw = buf[start:] if not copy and not buf.readonly else bytearray(buf[start:])
    out: dict[str, Tensor] = {}
    for name, kind, dtype, shape, off, nbytes in entries:
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
        kind, dtype, shape, _ = _as_bytes_view(value)
        specs[name] = TensorSpec(dtype, shape, kind)
    return specs
