"""Where a process is waiting: every asyncio task's and thread's innermost frames.

Logged when a service is told to stop (``service.interrupted``), so a stop that follows
a hang says what hung: the await a task sits in, or the call a worker thread is in.
"""

from __future__ import annotations

import asyncio
import sys
import threading

FRAMES = 4  # innermost frames shown per task or thread
MAX_ENTRIES = 40


def _where(frames) -> str:
    return " < ".join(f"{f.f_code.co_name}:{f.f_lineno}" for f in frames)


def _innermost(frame, limit: int) -> list:
    out = []
    while frame is not None and len(out) < limit:
        out.append(frame)
        frame = frame.f_back
    return out


def _await_chain(coro) -> list:
    """The frames of a suspended coroutine and of everything it awaits, outermost first
    (a task's own get_stack() shows only the outermost one)."""
    frames = []
    while coro is not None and len(frames) < 32:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is None:
            break
        frames.append(frame)
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return frames


def waiting_on() -> list[str]:
    """One line per pending task and per other thread (bounded), innermost frame first."""
    lines: list[str] = []
    try:
        tasks = asyncio.all_tasks()
    except RuntimeError:  # no running loop
        tasks = set()
    for task in sorted(tasks, key=lambda t: t.get_name()):
        chain = _await_chain(task.get_coro())
        lines.append(f"task {task.get_name()}: {_where(list(reversed(chain))[:FRAMES])}")
    names = {t.ident: t.name for t in threading.enumerate()}
    me = threading.get_ident()
    for ident, frame in sys._current_frames().items():
        if ident != me:
            lines.append(f"thread {names.get(ident, ident)}: {_where(_innermost(frame, FRAMES))}")
    return lines[:MAX_ENTRIES]


async def stop_tasks(tasks, timeout_s: float = 5.0) -> None:
    """Cancel a service's tasks and wait for them, bounded: a task inside a client library
    that swallows the cancellation (nats-py's fetch can) must not keep the process from
    exiting; what is still running after ``timeout_s`` is named in the log."""
    for t in tasks:
        t.cancel()
    _, pending = await asyncio.wait(tasks, timeout=timeout_s)
    if pending:
        import structlog

        structlog.get_logger("fedbus.shutdown").warning(
            "shutdown.tasks_still_running", tasks=[t.get_name() for t in pending][:20])
