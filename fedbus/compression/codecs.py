"""Delta codecs: one float tensor's delta to its wire parts and back, hostile parts bounded.

A codec turns a flat float32 delta of n elements into named *parts* (``""``: the entry
under the model tensor's own name; any other key: the tensor group the part travels in,
``fedbus.protocol.tensor_groups``) and back. ``decode`` treats every part as hostile: it
knows n from the model, not from the message, and checks each part's dtype and length,
every index, count and scale before it allocates anything sized by a claim. Failures are
``CompressionError`` with a stable rejection reason.

- ``CastCodec``: fp16 / bf16 of the delta (2 bytes an element).
- ``Int8Codec``: unbiased stochastic int8 with one scale per chunk of B elements,

      s_j = max_{i in chunk j} |x_i| / 127
      q_i = clamp(floor(x_i / s_j + u_i), -127, 127),   u_i ~ U[0, 1) independent
      x^_i = q_i * s_j

  For r = x_i / s_j in [-127, 127], floor(r + u) is floor(r) + 1 with probability
  frac(r) and floor(r) otherwise, so E[q_i] = r and E[x^_i] = x_i (unbiased); the clamp
  only acts on rounding noise of x_i / s_j at |r| = 127. Var[x^_i] <= s_j^2 / 4. A chunk of
  zeros has s_j = 0 and sends q = 0. With ``entropy_coding`` the codes are deflated
  (zlib level 1): stochastic codes of a delta cluster near 0 and carry a few bits each.
- ``TopKCodec``: the k = ceil(fraction * n) entries of largest magnitude, as int32 (int64
  above 2**31 elements) indices and float32 values; everything else is 0. Biased on its
  own; the worker's error feedback (``fedbus.transforms.compress``) makes the sum over
  rounds of what is sent track the sum of the true deltas.
"""

from __future__ import annotations

import math
import zlib

import torch

from fedbus.compression.spec import CastCompression, Int8Compression, NoCompression, TopKCompression

Parts = dict[str, torch.Tensor]
INT8_MAX = 127
INT8_SCALE = "int8_scale"  # tensor group of Int8Codec's per-chunk scales
TOPK_INDEX = "topk_idx"  # tensor groups of TopKCodec's indices and values
TOPK_VALUE = "topk_val"
CAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
ZLIB_LEVEL = 1  # fast; higher levels gain a few percent on int8 codes


class CompressionError(ValueError):
    """A compressed part failed its checks; ``reason`` is a rejection reason."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _expect(t: torch.Tensor | None, what: str, dtypes: tuple[torch.dtype, ...],
            numel: int | None = None) -> torch.Tensor:
    """A 1-D tensor of one of ``dtypes`` (of ``numel`` elements, when given); else tensor_mismatch."""
    if not isinstance(t, torch.Tensor) or t.dtype not in dtypes or t.dim() != 1:
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise CompressionError("tensor_mismatch", f"{what}: {got}, want 1-D {[str(d) for d in dtypes]}")
    if numel is not None and t.numel() != numel:
        raise CompressionError("tensor_mismatch", f"{what}: {t.numel()} elements, want {numel}")
    return t


def _finite(t: torch.Tensor, reason: str, what: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise CompressionError(reason, f"{what} has non-finite values")


class DeltaCodec:
    """``parts``: the part keys this codec writes, and the only ones its decode accepts."""

    parts: tuple[str, ...] = ()

    def encode(self, delta: torch.Tensor, generator: torch.Generator | None = None) -> Parts:
        raise NotImplementedError

    def decode(self, parts: Parts, numel: int, what: str) -> torch.Tensor:
        """The flat float32 delta of ``numel`` elements from hostile ``parts``."""
        raise NotImplementedError


class CastCodec(DeltaCodec):
    parts = ("",)

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def encode(self, delta, generator=None) -> Parts:
        return {"": delta.to(self.dtype)}

    def decode(self, parts, numel, what) -> torch.Tensor:
        t = _expect(parts.get(""), what, (self.dtype,), numel)
        _finite(t, "non_finite", what)
        return t.to(torch.float32)


def _from_bytes(data: bytes, dtype: torch.dtype) -> torch.Tensor:
    """A writable tensor over a copy of ``data`` (torch.frombuffer refuses an empty buffer)."""
    return torch.frombuffer(bytearray(data), dtype=dtype) if data else torch.zeros(0, dtype=dtype)


def stochastic_round(r: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """floor(r + u) clamped to [-127, 127] as int8 (u in [0, 1): unbiased rounding of r)."""
    return torch.floor(r + u).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)


class Int8Codec(DeltaCodec):
    parts = ("", INT8_SCALE)

    def __init__(self, chunk_size: int, entropy_coding: bool):
        self.chunk = int(chunk_size)
        self.entropy_coding = entropy_coding

    def chunks(self, numel: int) -> int:
        return -(-numel // self.chunk)

    def scales(self, delta: torch.Tensor) -> torch.Tensor:
        """s_j = max|x| / 127 per chunk (the last chunk may be short)."""
        n = delta.numel()
        padded = torch.zeros(self.chunks(n) * self.chunk, dtype=torch.float32)
        padded[:n] = delta.abs()
        return padded.view(-1, self.chunk).amax(dim=1) / INT8_MAX

    def encode(self, delta, generator=None) -> Parts:
        s = self.scales(delta)
        per_elem = s.repeat_interleave(self.chunk)[: delta.numel()]
        r = torch.where(per_elem > 0, delta / torch.where(per_elem > 0, per_elem, 1.0), 0.0)
        q = stochastic_round(r, torch.rand(r.shape, generator=generator))
        codes = q
        if self.entropy_coding:
            packed = zlib.compress(q.numpy().tobytes(), ZLIB_LEVEL)
            codes = _from_bytes(packed, torch.uint8)
        return {"": codes, INT8_SCALE: s}

    def decode(self, parts, numel, what) -> torch.Tensor:
        s = _expect(parts.get(INT8_SCALE), f"{what} scales", (torch.float32,), self.chunks(numel))
        if not bool((torch.isfinite(s) & (s >= 0)).all()):
            raise CompressionError("bad_scale", f"{what}: a scale is negative or not finite")
        if self.entropy_coding:
            q = self._inflate(_expect(parts.get(""), what, (torch.uint8,)), numel, what)
        else:
            q = _expect(parts.get(""), what, (torch.int8,), numel)
        per_elem = s.repeat_interleave(self.chunk)[:numel]
        return q.to(torch.float32).mul_(per_elem)

    @staticmethod
    def _inflate(packed: torch.Tensor, numel: int, what: str) -> torch.Tensor:
        """Exactly ``numel`` int8 codes from a deflate stream, never more (no decompression bomb)."""
        inflater = zlib.decompressobj()
        try:
            # max_length 0 would mean "no limit": an empty tensor still caps the output at 1 byte.
            raw = inflater.decompress(packed.numpy().tobytes(), max(1, numel))
            complete = inflater.eof and not inflater.unconsumed_tail and not inflater.unused_data
        except zlib.error as exc:
            raise CompressionError("malformed_body", f"{what}: codes are not a deflate stream ({exc})") from None
        if len(raw) != numel or not complete:
            raise CompressionError("tensor_mismatch", f"{what}: codes do not inflate to exactly {numel} bytes")
        return _from_bytes(raw, torch.int8)


class TopKCodec(DeltaCodec):
    parts = (TOPK_INDEX, TOPK_VALUE)

    def __init__(self, fraction: float):
        self.fraction = float(fraction)

    def k(self, numel: int) -> int:
        """Entries sent (and the most a receiver accepts) for a tensor of ``numel`` elements:
        ceil(fraction * n), at least 1 for a non-empty tensor."""
        return max(min(numel, 1), min(numel, math.ceil(self.fraction * numel - 1e-9)))

    def encode(self, delta, generator=None) -> Parts:
        n = delta.numel()
        idx = torch.topk(delta.abs(), self.k(n), sorted=False).indices.sort().values
        return {TOPK_INDEX: idx.to(torch.int32 if n < 2**31 else torch.int64), TOPK_VALUE: delta[idx].clone()}

    def decode(self, parts, numel, what) -> torch.Tensor:
        idx = _expect(parts.get(TOPK_INDEX), f"{what} indices", (torch.int32, torch.int64))
        k = idx.numel()
        if k > self.k(numel):
            raise CompressionError("excessive_k", f"{what}: {k} entries, at most {self.k(numel)} of {numel}")
        values = _expect(parts.get(TOPK_VALUE), f"{what} values", (torch.float32,), k)
        _finite(values, "non_finite", what)
        if k and (int(idx.min()) < 0 or int(idx.max()) >= numel):
            raise CompressionError("index_out_of_range", f"{what}: an index outside [0, {numel})")
        order = idx.to(torch.int64).sort().values
        if k > 1 and not bool((order[1:] != order[:-1]).all()):
            raise CompressionError("duplicate_indices", f"{what}: an index is sent twice")
        out = torch.zeros(numel, dtype=torch.float32)
        out[idx.to(torch.int64)] = values
        return out


# The one spec -> codec mapping.
CODECS = {
    CastCompression: lambda s: CastCodec(CAST_DTYPES[s.method]),
    Int8Compression: lambda s: Int8Codec(s.chunk_size, s.entropy_coding),
    TopKCompression: lambda s: TopKCodec(s.fraction),
}


def codec_for(spec) -> DeltaCodec | None:
    """The codec of a compression spec; None for ``method: none``."""
    if isinstance(spec, NoCompression):
        return None
    return CODECS[type(spec)](spec)
