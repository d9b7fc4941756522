"""A JSONL span file shared by all processes of a local run.

Each process appends one JSON object per finished span.  The file is opened
with O_APPEND and every line goes out in a single ``os.write()``: on a local
filesystem the kernel positions and writes an O_APPEND write under the inode
lock, so lines from concurrent processes never interleave.  (Not guaranteed on
NFS; the span file is meant for runs on one machine.)
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult


def _json_safe(value: Any) -> Any:
    """OTel attribute values (scalars and homogeneous sequences) as strict JSON values."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # NaN/inf are not valid JSON
    if isinstance(value, (str, bool, int, float)) or value is None:
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return str(value)


def _attributes(attributes: Any) -> dict[str, Any]:
    return {str(key): _json_safe(value) for key, value in (attributes or {}).items()}


def span_to_record(span: ReadableSpan) -> dict[str, Any]:
    """One span file line (as a dict)."""
    context = span.context
    resource_attributes = span.resource.attributes if span.resource else {}
    start_ns = span.start_time or 0
    end_ns = span.end_time or start_ns
    return {
        "trace_id": format(context.trace_id, "032x"),
        "span_id": format(context.span_id, "016x"),
        "parent_span_id": format(span.parent.span_id, "016x") if span.parent else None,
        "name": span.name,
        "kind": span.kind.name,
        "service": resource_attributes.get("service.name"),
        "instance": resource_attributes.get("service.instance.id"),
        "start_ns": start_ns,
        "end_ns": end_ns,
        "duration_ms": (end_ns - start_ns) / 1e6,
        "attributes": _attributes(span.attributes),
        "status": span.status.status_code.name,
        "status_message": span.status.description,
        "events": [
            {"name": event.name, "time_ns": event.timestamp, "attributes": _attributes(event.attributes)}
            for event in span.events
        ],
    }


def encode_line(record: dict[str, Any]) -> bytes:
    # Compact and ASCII-only: one physical line per span, whatever the attribute contents.
    return (json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n").encode("ascii")


class JsonlSpanExporter(SpanExporter):
    """Appends finished spans to ``path`` as JSON lines (use with SimpleSpanProcessor)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        # Guards the fd against a concurrent shutdown closing (and the OS reusing) it mid-write.
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = [encode_line(span_to_record(span)) for span in spans]
        with self._lock:
            if self._fd is None:
                return SpanExportResult.FAILURE
            for line in lines:
                self._write_line(line)
        return SpanExportResult.SUCCESS

    def _write_line(self, line: bytes) -> None:
        written = os.write(self._fd, line)
        # A regular file only takes a short write when the disk is full; finish the
        # line anyway (read_spans skips what it cannot parse) rather than drop it.
        while written < len(line):
            written += os.write(self._fd, line[written:])

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True  # nothing is buffered: every export() already reached the kernel

    def shutdown(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def read_spans(path: str | os.PathLike[str], *, strict: bool = False) -> list[dict[str, Any]]:
    """Parse a span file.

    A last line without its newline is a write still in progress (or torn by a
    crash) and is always skipped.  Any other line that is not a JSON object is
    skipped too, or raises ValueError when ``strict`` (tests use that).
    """
    data = Path(path).read_bytes()
    lines = data.split(b"\n")
    lines.pop()  # whatever follows the last newline: b"" or an unfinished line
    spans = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            if strict:
                raise ValueError(f"{path}:{number}: not a JSON span record: {line[:80]!r}")
            continue
        spans.append(record)
    return spans


def traces_by_id(spans: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Group span records by trace_id, each trace's spans in start order."""
    traces: dict[str, list[dict[str, Any]]] = {}
    for span in spans:
        traces.setdefault(span["trace_id"], []).append(span)
    for trace_spans in traces.values():
        trace_spans.sort(key=lambda span: span.get("start_ns") or 0)
    return traces
