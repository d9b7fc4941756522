"""`fedbus status`: a snapshot (off a terminal, or ``--once``) or a live rich screen."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys

from fedbus.crypto.signing import now_ms
from fedbus.status.model import StatusModel
from fedbus.status.reader import StatusReader
from fedbus.status.render import render_plain, render_rich

REFRESH_S = 0.5  # the live screen redraws at least this often (ages and silences move on their own)
MIN_REDRAW_S = 0.1  # and at most ten times a second, however busy the bus
NOTHING_COMMITTED = 1  # exit code of a snapshot that found no committed state of the job


async def snapshot(reader: StatusReader, listen_s: float) -> str:
    """Read for ``listen_s`` seconds (long enough for every live worker's heartbeat), then
    one plain rendering."""
    await reader.start()
    try:
        await asyncio.sleep(listen_s)
    finally:
        await reader.stop()
    return render_plain(reader.model.view(now_ms()))


async def live(reader: StatusReader, *, file=None, exit_when_done: bool = True) -> None:
    """Redraw on every change (and every REFRESH_S) until interrupted, or until the job is done."""
    from rich.console import Console
    from rich.live import Live

    console = Console(file=file or sys.stdout)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    await reader.start()
    try:
        with Live(render_rich(reader.model.view(now_ms())), console=console, auto_refresh=False,
                  transient=False) as screen:
            while not stop.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(reader.changed.wait(), REFRESH_S)
                reader.changed.clear()
                view = reader.model.view(now_ms())
                screen.update(render_rich(view), refresh=True)
                if exit_when_done and view.done_reason is not None:
                    break
                await asyncio.sleep(MIN_REDRAW_S)  # a burst of heartbeats is one redraw, not hundreds
    finally:
        await reader.stop()


def make_model(job_id: str, job_spec) -> StatusModel:
    """The model, told what the job spec says (mode, planned rounds, heartbeat, deadline) when there is one."""
    if job_spec is None:
        return StatusModel(job_id)
    return StatusModel(job_id, mode=job_spec.mode, total=job_spec.rounds, heartbeat_s=job_spec.transport.heartbeat_s,
                       deadline_s=job_spec.round_deadline_s)
