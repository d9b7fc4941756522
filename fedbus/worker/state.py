"""A worker's per-job state on disk, so a restarted worker continues where it was.

Layout under the state directory (``fedbus worker --state-dir``, default
``.fedbus-state/<job>/<worker>`` relative to the working directory)::

    runs/<run>/strategy.tensors     the pipeline's state (SCAFFOLD's c_i) after the last round
    runs/<run>/update-<round>.body  the last updates sent in that run, as encoded Update bodies
    runs/norun/...                  the same for a coordinator that names no run

``<run>`` is the coordinator's run id (``r<ms>-<hex>``, safe as a file name). Every file
is replaced atomically (temporary file in the same directory, fsync, ``os.replace``), so
a crash leaves the old version or the new one, never half a file. Only the newest
``KEEP_SENT`` updates of a run are kept; runs other than the newest few are removed.
The service writes both after the update's publish was acknowledged, c_i first, since
the coordinator may already hold the update (and with it Δc_i = c_i+ - c_i). A crash
before either write leaves the previous c_i and no stored update: a reopened round is
trained again, and the coordinator keeps the first update it holds. A crash between the
two leaves c_i+ without the stored update: the same, but the worker's c_i already
agrees with the Δc_i the coordinator has.

Files are read back with the wire codecs (no pickle), and a file that does not decode
is ignored with a warning (the round is then trained again).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

import structlog
import torch

from fedbus.protocol.codec import decode_tensors, encode_tensors
from fedbus.protocol.messages import Update, body_pieces, decode_body
from fedbus.protocol.runs import is_run_id, run_started_ms
from fedbus.worker.core import KEEP_SENT, RunKey, SentUpdate

log = structlog.get_logger("fedbus.worker.state")

NO_RUN = "norun"
KEEP_RUNS = 2
_UPDATE_RE = re.compile(r"^update-([0-9]{1,12})\.body$")


def default_state_dir(job_id: str, worker_id: str) -> Path:
    return Path(".fedbus-state") / job_id / worker_id


def _atomic_write(path: Path, data: bytes | Iterable[bytes | memoryview]) -> None:
    """Replace ``path`` with ``data``, one buffer or consecutive pieces (an update's
    tensors as views: the body is never built in memory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for piece in ([data] if isinstance(data, (bytes, bytearray, memoryview)) else data):
            view = memoryview(piece).cast("B")
            while view:
                view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _run_dir_name(run: str | None) -> str:
    if run is None:
        return NO_RUN
    if not is_run_id(run):
        raise ValueError(f"not a run id: {run!r}")
    return run


class WorkerStateStore:
    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)

    def _run_dir(self, run: str | None) -> Path:
        return self.root / "runs" / _run_dir_name(run)

    # -- sent updates ---------------------------------------------------------------------------

    def save_update(self, run: str | None, round_: int, fields: Update, tensors: Mapping) -> None:
        directory = self._run_dir(run)
        _atomic_write(directory / f"update-{int(round_)}.body", body_pieces(fields, tensors))
        rounds = sorted(int(m.group(1)) for p in directory.iterdir() if (m := _UPDATE_RE.match(p.name)))
        for old in rounds[:-KEEP_SENT]:
            (directory / f"update-{old}.body").unlink(missing_ok=True)
        self._prune_runs(keep=run)

    def load_updates(self) -> dict[RunKey, SentUpdate]:
        out: dict[RunKey, SentUpdate] = {}
        runs_dir = self.root / "runs"
        if not runs_dir.is_dir():
            return out
        for directory in runs_dir.iterdir():
            run = None if directory.name == NO_RUN else directory.name
            if run is not None and not is_run_id(run):
                continue
            for path in directory.iterdir():
                m = _UPDATE_RE.match(path.name)
                if not m:
                    continue
                try:
                    fields, tensors = decode_body(Update, path.read_bytes())
                except Exception as exc:  # a damaged file costs a retrain, not the worker
                    log.warning("state.unreadable", path=str(path), error=repr(exc))
                    continue
                if fields.round != int(m.group(1)):
                    log.warning("state.unreadable", path=str(path), error="round does not match the file name")
                    continue
                out[(run, fields.round)] = SentUpdate(fields, dict(tensors or {}))
        return out

    # -- strategy state (SCAFFOLD's c_i) --------------------------------------------------------

    def save_strategy(self, run: str | None, state: Mapping[str, Mapping[str, Mapping[str, torch.Tensor]]]) -> None:
        flat = {f"{t}/{key}/{name}": v for t, part in state.items() for key, group in part.items()
                for name, v in group.items()}
        _atomic_write(self._run_dir(run) / "strategy.tensors", encode_tensors(flat))

    def load_strategy(self, run: str | None) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
        path = self._run_dir(run) / "strategy.tensors"
        if not path.exists():
            return {}
        try:
            flat = decode_tensors(path.read_bytes())
        except Exception as exc:
            log.warning("state.unreadable", path=str(path), error=repr(exc))
            return {}
        out: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
        for full, value in flat.items():
            t, key, name = full.split("/", 2)
            out.setdefault(t, {}).setdefault(key, {})[name] = value
        return out

    def _prune_runs(self, keep: str | None) -> None:
        runs_dir = self.root / "runs"
        runs = [p for p in runs_dir.iterdir() if p.is_dir() and is_run_id(p.name)]
        runs.sort(key=lambda p: (run_started_ms(p.name), p.name))
        for old in runs[:-KEEP_RUNS]:
            if old.name != keep:
                shutil.rmtree(old, ignore_errors=True)
