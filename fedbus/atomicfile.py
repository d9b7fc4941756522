"""Files that are replaced whole or not at all.

A run's outputs (``summary.json``, ``final_model.pt``) and key files must never be left
empty or half-written when the disk fills up or the process dies mid-write: readers see
either the old file or the new one. The recipe: write a temporary file in the target's
directory (same filesystem, so the rename is atomic), fsync it, ``os.replace`` it over
the target, then fsync the directory so the rename itself survives a power cut.
"""

from __future__ import annotations

import errno
import json
import math
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Errors from fsync on a directory that only mean "this filesystem cannot do that".
_DIR_FSYNC_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES}


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_dir(directory: Path) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync on Windows
        return
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as exc:
        if exc.errno in _DIR_FSYNC_UNSUPPORTED:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _DIR_FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes | bytearray | memoryview, *,
                       mode: int = 0o666) -> None:
    """Replace ``path`` with ``data`` atomically.

    ``mode`` is the new file's permission bits, applied at creation (so a 0o600 key file is
    never readable by others, not even for a moment); as with ``open``, the process umask
    applies. On any failure the old file (or its absence) is left as it was and the
    temporary file is removed.
    """
    atomic_write_with(path, lambda fd: _write_all(fd, data), mode=mode)


def atomic_write_with(path: str | os.PathLike[str], write: Callable[[int], None], *, mode: int = 0o666) -> None:
    """``atomic_write_bytes`` with the content written by ``write(fd)`` (a stream, never one buffer)."""
    target = Path(path)
    directory = target.parent
    tmp = directory / f".{target.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), mode)
    try:
        try:
            write(fd)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(directory)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8",
                      mode: int = 0o666) -> None:
    """``atomic_write_bytes`` for text (no newline translation)."""
    atomic_write_bytes(path, text.encode(encoding), mode=mode)


def json_safe(value: Any) -> Any:
    """``value`` with every inf/nan float (at any depth) replaced by None: JSON has no such numbers,
    and Python's default ``NaN`` output is rejected by strict parsers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def atomic_write_json(path: str | os.PathLike[str], value: Any, *, indent: int | None = 2) -> None:
    """Strict JSON (non-finite floats as null) written atomically, with a final newline."""
    atomic_write_text(path, json.dumps(json_safe(value), indent=indent, allow_nan=False) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` that never leaves a truncated file: written to a temporary file, then
    replaced. (Straight to the file: serializing into memory first cost a model's size of
    memory at the end of every job.)"""
    import torch  # imported here: key handling and the CLI's fast paths do not need torch

    def write(fd: int) -> None:
        writer = _FdWriter(fd)
        try:
            torch.save(obj, writer)
        except Exception:
            if writer.error is not None:  # torch's writer reports a failed write as a RuntimeError
                raise writer.error from None
            raise

    atomic_write_with(path, write)


class _FdWriter:
    """A write-only file object over a descriptor (torch.save streams its records into it)."""

    def __init__(self, fd: int):
        self.fd = fd
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            _write_all(self.fd, data)
        except OSError as exc:
            self.error = self.error or exc
            raise
        return memoryview(data).nbytes

    def flush(self) -> None:
        pass
