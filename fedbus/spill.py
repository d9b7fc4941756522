"""Keep model-sized tensors in a file's page cache instead of the process's anonymous memory.

Buffered (robust) rules keep every contribution of a round until it closes: n × P bytes
of anonymous memory for n updates of a P-byte model, which the kernel can only swap. A
tensor backed by a memory mapping of a file is different: its pages are the file's page
cache. Clean ones (written back) are dropped under memory pressure and read again on the
next access, so the process's anonymous memory (RssAnon) stays what it computes with,
whatever the cohort. What it costs: the data is written once, and pages that were
dropped are read back from disk when the rule passes over the cohort.

* ``spill_state(state)`` writes tensors into one new file in the spill directory and
  returns new tensors (same names, shapes, dtypes; contiguous, detached) backed by a
  copy-on-write mapping of it (``MAP_PRIVATE``). Copy-on-write, not read-only: a mistaken
  in-place write copies the page it touches into anonymous memory instead of crashing the
  process with SIGSEGV, and the file never changes after it is written.
* ``SpillWriter(layout)`` builds such a state piece by piece (``os.pwrite`` at each
  piece's place), for results computed chunk by chunk that should never be whole in
  memory (a pre-aggregation's mixed inputs, ``fedbus/aggregation/preaggregation.py``).
* ``page_out_(state)`` does the same in place: each tensor object is rebound
  (``Tensor.set_``) to the mapping, so every holder of it sees the file-backed storage,
  and the old storage is freed once no other tensor references it. Storages are written,
  not tensors, so views, strides and aliasing (tied weights, views into one decoded
  buffer) are kept. The mapping is ``MAP_PRIVATE`` here too: reads stay file-backed, and a
  page written in place becomes ordinary anonymous memory again (page it out again
  afterwards). ``MAP_SHARED`` would keep writes in the page cache too, but writing back a
  shared mapping can fail late (a full disk or a copy-on-write filesystem under ENOSPC,
  SIGBUS on a hole) where the program cannot handle it; a private mapping never writes.

The file is unlinked right after it is mapped: Linux keeps its blocks while the mapping
exists, nothing is left behind if the process dies, and the space returns when the last
tensor on it is garbage-collected. (A crash between creating and mapping the file leaves
it behind; such files are named ``fedbus-spill-*``, and ``remove_leftovers`` deletes them:
the coordinator does at start, in its run directory's ``spill``, which no other process
shares; a shared directory such as ``$TMPDIR`` is left alone.) A directory on tmpfs or ramfs gains
nothing (its pages are shared memory, not reclaimable file pages): ``configure_spill``
warns about it.

The process-wide policy (``configure_spill``: a directory and a threshold in bytes) is
off unless a service configures it (``fedbus coordinator|aggregator --spill-above``):
whether spilling pays depends on the disk behind the directory, which only the operator
knows. ``UpdateBuffer`` (``fedbus/aggregation/cohort.py``) reads it when a round begins.
Writing goes through ``write``/``pwrite``, never through a mapping, so a full disk is an
OSError the caller handles (the buffer keeps the round in memory), not a SIGBUS.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import structlog
import torch

log = structlog.get_logger(__name__)

K = TypeVar("K", bound=Hashable)

PREFIX = "fedbus-spill-"
# Every tensor (or storage span) starts at a multiple of this in the file: any dtype's
# element size divides it, and it is a cache line.
ALIGN = 64
WRITE_PIECE = 64 * 1024 * 1024  # bytes per write() call, well below Linux's 2 GiB cap
IN_MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})
SPILLED = "_fedbus_spilled"  # attribute set on the tensors spill_state and SpillWriter make


@dataclass(frozen=True)
class SpillPolicy:
    """Where buffered contributions spill, and how many bytes a buffer keeps in memory first."""

    directory: Path
    threshold: int


_policy: SpillPolicy | None = None


def configure_spill(directory: str | Path, threshold: int) -> SpillPolicy:
    """Turn spilling on for this process: creates ``directory`` and checks a file can be made in it.

    Raises ValueError for a negative threshold and OSError for a directory that cannot be used.
    """
    global _policy
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0:
        raise ValueError(f"spill threshold must be an integer number of bytes >= 0, got {threshold!r}")
    path = Path(directory).resolve()
    path.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=PREFIX, dir=path)
    os.close(fd)
    os.unlink(probe)
    fstype = filesystem_type(path)
    if fstype in IN_MEMORY_FILESYSTEMS:
        log.warning("spill.in_memory_filesystem", directory=str(path), fstype=fstype,
                    detail="spilled tensors would stay in memory; choose a directory on a disk")
    _policy = SpillPolicy(path, threshold)
    log.info("spill.configured", directory=str(path), threshold=threshold)
    return _policy


def remove_leftovers(directory: str | Path) -> int:
    """Delete the spill files a killed process left in ``directory`` (a kill between creating
    a file and mapping it, after which it is unlinked); how many. Only names this module
    makes, only in that directory. Call before this process spills there."""
    removed = 0
    try:
        entries = list(Path(directory).iterdir())
    except FileNotFoundError:
        return 0
    for path in entries:
        if path.name.startswith(PREFIX) and path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed += 1
    if removed:
        log.info("spill.leftovers_removed", directory=str(directory), files=removed)
    return removed


def disable_spill() -> None:
    global _policy
    _policy = None


def spill_policy() -> SpillPolicy | None:
    return _policy


def filesystem_type(path: Path) -> str | None:
    """The type of the filesystem holding ``path`` (Linux's /proc/self/mounts), or None."""
    best, fstype = "", None
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                fields = line.split()
                if len(fields) < 3:
                    continue
                # Spaces and the like are octal escapes in the mount table.
                mount = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
                inside = str(path) == mount or str(path).startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):
                    best, fstype = mount, fields[2]
    except OSError:
        return None
    return fstype


def _directory(directory: str | Path | None) -> Path:
    if directory is not None:
        return Path(directory)
    return _policy.directory if _policy is not None else Path(tempfile.gettempdir())


def _check(t: torch.Tensor, name: object) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name!r}: expected a tensor, got {type(t).__name__}")
    if t.device.type != "cpu" or t.layout != torch.strided:
        raise ValueError(f"{name!r}: only dense CPU tensors can be spilled, got {t.device} {t.layout}")


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.empty(0, dtype=dtype).real.dtype if dtype.is_complex else dtype


def is_spilled(t: torch.Tensor) -> bool:
    """Whether ``t`` was made by ``spill_state`` or a ``SpillWriter`` (its storage maps a spill file)."""
    return getattr(t, SPILLED, False)


class SpillWriter:
    """A spilled state written piece by piece, in any order, then mapped as ``spill_state``'s.

    ``layout`` gives each tensor's shape and dtype; ``write_values`` and ``write_bytes`` fill
    parts of them (``os.pwrite`` at their place in the file), ``finish()`` maps the file and
    returns the tensors, ``abort()`` drops it. A part never written reads as zeros. What a
    writer holds in memory is only the piece in hand.
    """

    def __init__(self, layout: Mapping[K, tuple[tuple[int, ...] | torch.Size, torch.dtype]],
                 directory: str | Path | None = None):
        self._layout = {k: (torch.Size(shape), dtype) for k, (shape, dtype) in layout.items()}
        self._offsets: dict[K, int] = {}
        end = 0
        for k, (shape, dtype) in self._layout.items():
            self._offsets[k] = end
            end = _aligned(end + shape.numel() * dtype.itemsize)
        self.size = end
        self._fd: int | None = None
        self._path: str | None = None
        if end:
            self._fd, self._path = tempfile.mkstemp(prefix=PREFIX, dir=_directory(directory))
            try:
                os.ftruncate(self._fd, end)
            except OSError:
                self.abort()
                raise

    @property
    def keys(self) -> list[K]:
        return list(self._layout)

    def write_bytes(self, key: K, byte_start: int, data: torch.Tensor) -> None:
        """1-D uint8 ``data`` at byte ``byte_start`` of ``key``'s tensor."""
        shape, dtype = self._layout[key]
        nbytes = shape.numel() * dtype.itemsize
        if data.dtype != torch.uint8 or data.dim() != 1 or not 0 <= byte_start <= nbytes - data.numel():
            raise ValueError(f"{key!r}: {data.numel()} bytes at {byte_start} do not fit its {nbytes}")
        if not data.numel():
            return
        view = memoryview(data.contiguous().numpy())
        at = self._offsets[key] + byte_start
        while view:
            n = os.pwrite(self._fd, view[:WRITE_PIECE], at)  # a write may be short
            view, at = view[n:], at + n

    def write_values(self, key: K, start: int, values: torch.Tensor) -> None:
        """``values`` converted to ``key``'s dtype at its flat elements ``start``, ... (a complex
        tensor counts real and imaginary parts as elements, as ``view_as_real`` does)."""
        real = _real_dtype(self._layout[key][1])
        data = values.detach().reshape(-1).to(real).contiguous().view(torch.uint8)
        self.write_bytes(key, start * real.itemsize, data)

    def finish_storage(self) -> tuple[torch.UntypedStorage | None, dict[K, int]]:
        """The file mapped copy-on-write (None for an empty layout) and each tensor's byte offset in it."""
        if self._fd is None:
            return None, dict(self._offsets)
        os.close(self._fd)
        self._fd = None
        try:
            # shared=False: MAP_PRIVATE, PROT_READ|PROT_WRITE over a read-only descriptor.
            storage = torch.from_file(self._path, shared=False, size=self.size, dtype=torch.uint8).untyped_storage()
        finally:
            os.unlink(self._path)
            self._path = None
        return storage, dict(self._offsets)

    def finish(self) -> dict[K, torch.Tensor]:
        storage, offsets = self.finish_storage()
        out = {}
        for k, (shape, dtype) in self._layout.items():
            if storage is None or not shape.numel():
                out[k] = torch.empty(shape, dtype=dtype)
                continue
            t = torch.empty(0, dtype=dtype)
            t.set_(storage, offsets[k] // t.element_size(), shape, _contiguous_strides(shape))
            setattr(t, SPILLED, True)
            out[k] = t
        return out

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._path is not None:
            os.unlink(self._path)
            self._path = None


def _raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """t's values as contiguous 1-D uint8 (a view when t is already contiguous)."""
    # resolve_conj/resolve_neg: a lazily conjugated or negated view's memory is not its value.
    return t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)


def _written(layout: Mapping[K, tuple], bytes_of: Callable[[K], torch.Tensor], directory) -> SpillWriter:
    """A writer with every tensor of ``layout`` written whole, from ``bytes_of(key)`` (one at a time)."""
    writer = SpillWriter(layout, directory)
    try:
        for k in layout:
            writer.write_bytes(k, 0, bytes_of(k))
    except BaseException:
        writer.abort()
        raise
    return writer


def spill_state(state: Mapping[K, torch.Tensor], directory: str | Path | None = None) -> dict[K, torch.Tensor]:
    """The tensors of ``state`` written to one new file and read back through a copy-on-write mapping.

    Same keys, shapes and dtypes; values identical bit for bit; contiguous and detached.
    ``directory`` defaults to the configured spill directory (else the temporary directory).
    A non-contiguous tensor is copied once (one tensor at a time) on its way to the file.
    """
    for name, t in state.items():
        _check(t, name)
    layout = {k: (t.shape, t.dtype) for k, t in state.items()}
    return _written(layout, lambda k: _raw_bytes(state[k]), directory).finish()


def page_out_(state: Mapping[object, torch.Tensor], directory: str | Path | None = None) -> None:
    """Rebind every tensor of ``state`` in place to a copy-on-write file mapping of its own values.

    Each storage the tensors use is written once (the span they cover), and every tensor is
    set to the same offset, shape and strides in the mapped copy, so views and aliasing are
    kept. The anonymous memory is freed once no tensor outside ``state`` shares the storage
    (a module's parameters do, for its ``state_dict()``: page out the parameters themselves).
    Writing a paged-out tensor in place works; the pages written become anonymous again.
    """
    prepare_page_out(state, directory)()


def prepare_page_out(state: Mapping[object, torch.Tensor], directory: str | Path | None = None
                     ) -> Callable[[], None]:
    """``page_out_`` in two steps: this one writes and maps the file (it only reads the
    tensors, so it may run in a worker thread while nothing writes them) and returns the
    rebinding, which the thread that owns the tensors calls (``Tensor.set_`` swaps a
    storage under whoever might be reading it on another thread)."""
    tensors: list[torch.Tensor] = []
    seen: set[int] = set()
    for name, t in state.items():
        _check(t, name)
        if id(t) not in seen:
            seen.add(id(t))
            tensors.append(t)
    # Byte span [start, end) each storage's tensors cover, keyed by the storage's address.
    spans: dict[int, list] = {}
    live = []
    for t in tensors:
        if t.numel() == 0:
            continue
        extent = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
        start = t.storage_offset() * t.element_size()
        end = start + extent * t.element_size()
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in spans:
            spans[key][1] = min(spans[key][1], start)
            spans[key][2] = max(spans[key][2], end)
        else:
            spans[key] = [storage, start, end]
        live.append((t, key, start))
    pieces = {}
    for key, span in spans.items():
        storage, start, end = span
        span[1] = start = start - start % ALIGN  # keeps every tensor's offset a multiple of its element size
        pieces[key] = torch.empty(0, dtype=torch.uint8).set_(storage, start, (end - start,), (1,))
    mapped, file_offset = _written({k: ((p.numel(),), torch.uint8) for k, p in pieces.items()}, pieces.__getitem__,
                                   directory).finish_storage()
    del pieces
    starts = {key: span[1] for key, span in spans.items()}
    del spans  # (they hold the old storages)

    def rebind() -> None:
        with torch.no_grad():  # set_ on a leaf that requires grad (a Parameter) is no autograd operation
            for t, key, start in live:
                at = file_offset[key] + start - starts[key]
                t.set_(mapped, at // t.element_size(), t.shape, t.stride())
            for t in tensors:
                if t.numel() == 0:  # hold no reference to whatever storage it viewed
                    t.set_(torch.empty(0, dtype=t.dtype).untyped_storage(), 0, t.shape, t.stride())
        live.clear()
        tensors.clear()

    return rebind


def state_bytes(state: Mapping[object, torch.Tensor]) -> int:
    """The bytes of the values of ``state`` (what spilling it moves out of memory)."""
    return sum(t.numel() * t.element_size() for t in state.values())


__all__ = ["SpillPolicy", "SpillWriter", "configure_spill", "disable_spill", "filesystem_type", "is_spilled",
           "page_out_", "prepare_page_out", "remove_leftovers", "spill_policy", "spill_state", "state_bytes"]
