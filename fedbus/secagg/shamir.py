"""Shamir secret sharing over the prime field GF(2^521 - 1), on Python ints.

Secrets are 32-byte strings (a self-mask seed, an X25519 secret key), read as
little-endian integers < 2^256, so they fit the field with room to spare and no
chunking is needed. A share is (x, y): x is the holder's 1-based position in the
round's roster (unique, never 0), y = f(x) for a random polynomial f of degree t-1
with f(0) = secret. Any t shares determine f; fewer reveal nothing about f(0).

Reconstruction here is always *verified*: the caller passes a predicate that
recognises the right secret (X25519 public key, hash commitment). A dealer can hand
out shares that lie on no single polynomial; interpolating a bad subset then gives a
wrong value, and a wrong secret would silently corrupt the sum. So a result is
returned only when it verifies, and every share that is off the verified polynomial
is named (the dealer's fault: shares are bound by the dealer's signed commitments
before they get here).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from fedbus.protocol.secagg import Y_BYTES

PRIME = (1 << 521) - 1  # Mersenne prime M521
SECRET_BYTES = 32
assert Y_BYTES == (PRIME.bit_length() + 7) // 8  # a field element on the wire
MAX_SHARES = 1 << 16  # holders per secret; x must stay a small positive int
# Subsets tried when the first t shares do not verify (a cheating dealer); bounded work.
MAX_RECONSTRUCT_ATTEMPTS = 64


class ShamirError(ValueError):
    pass


def split(secret: bytes, xs: Sequence[int], t: int, random_bytes: Callable[[int], bytes]) -> dict[int, int]:
    """Shares of ``secret`` for holders at ``xs`` (distinct, 1..MAX_SHARES); any ``t`` reconstruct."""
    if len(secret) != SECRET_BYTES:
        raise ShamirError(f"secret must be {SECRET_BYTES} bytes")
    if len(set(xs)) != len(xs) or not all(0 < x <= MAX_SHARES for x in xs):
        raise ShamirError("share points must be distinct and in 1..MAX_SHARES")
    if not 1 <= t <= len(xs):
        raise ShamirError(f"threshold {t} outside 1..{len(xs)}")
    # Coefficients uniform in the field: 80 random bytes reduced mod p have statistical
    # distance < 2^-119 from uniform.
    coeffs = [int.from_bytes(secret, "little")] + [
        int.from_bytes(random_bytes(80), "little") % PRIME for _ in range(t - 1)]
    return {x: _evaluate(coeffs, x) for x in xs}


def _evaluate(coeffs: Sequence[int], x: int) -> int:
    y = 0
    for c in reversed(coeffs):  # Horner
        y = (y * x + c) % PRIME
    return y


def interpolate_at(points: Mapping[int, int], at: int) -> int:
    """The value at ``at`` of the unique polynomial of degree < len(points) through ``points``."""
    total = 0
    for xi, yi in points.items():
        num, den = 1, 1
        for xj in points:
            if xj != xi:
                num = num * (at - xj) % PRIME
                den = den * (xi - xj) % PRIME
        total = (total + yi * num * pow(den, -1, PRIME)) % PRIME
    return total


def y_to_bytes(y: int) -> bytes:
    return y.to_bytes(Y_BYTES, "little")


def y_from_bytes(raw: bytes) -> int:
    """A field element from the wire; raises ShamirError when it is not < p."""
    if len(raw) != Y_BYTES:
        raise ShamirError(f"share value must be {Y_BYTES} bytes")
    y = int.from_bytes(raw, "little")
    if y >= PRIME:
        raise ShamirError("share value not in the field")
    return y


def secret_to_bytes(value: int) -> bytes | None:
    """The 32-byte secret for a field element, or None when it cannot be one."""
    if value >= 1 << (8 * SECRET_BYTES):
        return None
    return value.to_bytes(SECRET_BYTES, "little")


@dataclass(frozen=True)
class Reconstruction:
    secret: bytes | None  # None: no subset of t shares gave a value that verifies
    off_polynomial: tuple[int, ...]  # xs of shares that disagree with the verified polynomial


def reconstruct(shares: Mapping[int, int], t: int, verify: Callable[[bytes], bool]) -> Reconstruction:
    """The secret behind ``shares``, checked by ``verify``; needs at least t shares.

    The first t shares (by x) are tried first; when their value does not verify, at
    most MAX_RECONSTRUCT_ATTEMPTS other t-subsets are. Every share is then checked
    against the polynomial through the verified subset.
    """
    if len(shares) < t:
        raise ShamirError(f"{len(shares)} shares, threshold {t}")
    xs = sorted(shares)
    for subset in itertools.islice(itertools.combinations(xs, t), MAX_RECONSTRUCT_ATTEMPTS):
        base = {x: shares[x] for x in subset}
        secret = secret_to_bytes(interpolate_at(base, 0))
        if secret is not None and verify(secret):
            off = tuple(x for x in xs if x not in base and interpolate_at(base, x) != shares[x])
            return Reconstruction(secret, off)
    return Reconstruction(None, ())
