"""RejectionLedger: rejections counted exactly, reported in aggregate (pure; every role uses it).

A flood must cost its sender, not the job: one log line and one audit record per
rejected message let 100k junk messages write 100k records. The ledger counts every
rejection by (sender, reason) and hands out one report per key and interval, with the
count. Senders that are not listed in the federation are one key (``<unlisted>``): a
header's sender field is chosen by whoever sent it, so keying on it would let a flood
grow the ledger without bound.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

UNLISTED = "<unlisted>"


@dataclass(frozen=True)
class RejectionReport:
    kind: str  # "update", "heartbeat", "metrics"
    sender: str
    reason: str
    count: int
    first_detail: str
    since_ms: int
    until_ms: int


class RejectionLedger:
    def __init__(self, interval_ms: int, is_listed, on_count=None):
        """``on_count(kind, reason)``: told of every rejection as it is counted (the live
        rejections metric), so that metric and ``totals`` can never disagree."""
        self.interval_ms = interval_ms
        self._is_listed = is_listed
        self._on_count = on_count
        self.totals: Counter[str] = Counter()  # reason -> count, over the whole run
        self._window: dict[tuple[str, str, str], list] = {}  # (kind, sender, reason) -> [count, detail]
        self._window_start = None

    def record(self, kind: str, sender: str | None, reason: str, detail: str, now_ms: int) -> bool:
        """Count a rejection; True when it is the first of its key in this interval
        (worth one immediate log line)."""
        if self._window_start is None:
            self._window_start = now_ms
        key = (kind, sender if sender and self._is_listed(sender) else UNLISTED, reason)
        self.totals[reason] += 1
        if self._on_count is not None:
            self._on_count(kind, reason)
        entry = self._window.get(key)
        if entry is None:
            self._window[key] = [1, detail[:200]]
            return True
        entry[0] += 1
        return False

    def due(self, now_ms: int) -> bool:
        return bool(self._window) and self._window_start is not None and now_ms - self._window_start >= self.interval_ms

    def flush(self, now_ms: int) -> list[RejectionReport]:
        """One report per key seen since the last flush."""
        since = self._window_start if self._window_start is not None else now_ms
        reports = [RejectionReport(kind, sender, reason, count, detail, since, now_ms)
                   for (kind, sender, reason), (count, detail) in sorted(self._window.items())]
        self._window = {}
        self._window_start = None
        return reports
