"""Run ids: every coordinator run of a job has one, and every control message names it.

A run id is ``r<start ms>-<8 hex>``: unique, and ordered by when the run started, so a
participant that has seen messages of a newer run can refuse a replayed message of an
older one (a ``job.done`` captured from last week's run must not end today's). A
coordinator resumed with ``--resume`` continues the same run; a fresh start makes a new one.
"""

from __future__ import annotations

import os
import re

RUN_PATTERN = r"^r[0-9]{1,15}-[0-9a-f]{8}$"
_RUN_RE = re.compile(RUN_PATTERN)


def new_run_id(now_ms: int) -> str:
    return f"r{now_ms}-{os.urandom(4).hex()}"


def is_run_id(value: object) -> bool:
    return isinstance(value, str) and bool(_RUN_RE.match(value))


def run_started_ms(run: str) -> int:
    """When the run started (ms since the epoch): the order of runs of one job."""
    if not is_run_id(run):
        raise ValueError(f"not a run id: {run!r}")
    return int(run[1:].split("-", 1)[0])


def run_order(run: str) -> tuple[int, str]:
    """The sort key of runs: start time, then id (two runs started in the same ms still order)."""
    return run_started_ms(run), run
