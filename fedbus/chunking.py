"""Consecutive buffers regrouped into fixed-size chunks (no dependencies: the bus and the
crypto layer both stream a body this way)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator


def regroup(pieces: Iterable[bytes | bytearray | memoryview], step: int) -> Iterator[bytes]:
    """The bytes of ``pieces``, in order, as chunks of ``step`` bytes (the last one shorter,
    none when there are no bytes). Each chunk is a new bytes object, so nothing refers to
    the pieces once it is consumed."""
    pending: list[memoryview] = []
    have = 0
    for piece in pieces:
        view = memoryview(piece).cast("B")
        pos = 0
        while pos < view.nbytes:
            take = min(step - have, view.nbytes - pos)
            pending.append(view[pos:pos + take])
            have += take
            pos += take
            if have == step:
                yield pending[0].tobytes() if len(pending) == 1 else b"".join(pending)
                pending, have = [], 0
    if have:
        yield b"".join(pending)
