"""What a run directory holds, read for the report.

A coordinator run directory has ``summary.json`` (totals and one row per closed round or
committed version, see ``fedbus.coordinator.summary``), the job spec (``job-spec.json``,
written by the coordinator at job end; a directory made by ``fedbus demo`` also has the
``job.yaml`` it passed in), the final model's signed manifest as ``model-manifest.json``,
and usually the span file every local process appends to (``spans.jsonl``, see
``fedbus.telemetry.spanfile``). Anything but the summary may be missing or unreadable;
the report then says so instead of failing.

The span file can be long (one line per span, every round), so it is streamed and only
what the report shows is kept: each worker's training times and one round's trace.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SUMMARY_NAME = "summary.json"
JOB_SPEC_NAME = "job-spec.json"
DEMO_JOB_NAME = "job.yaml"
MANIFEST_NAME = "model-manifest.json"
SPANS_NAME = "spans.jsonl"
# The report is built at the end of every run: whatever the run left, reading it stays bounded.
MAX_JSON_BYTES = 64 * 1024 * 1024
MAX_SPAN_LINE_BYTES = 64 * 1024
MAX_SPANS = 500_000
TRACE_ROOTS = ("round", "version")  # the coordinator's root span of a sync round / async version


class ReportInputError(Exception):
    """The run directory has no readable summary.json: there is nothing to report."""


@dataclass(frozen=True)
class Span:
    trace_id: str
    span_id: str
    parent: str | None
    name: str
    service: str
    instance: str
    start_ns: int
    end_ns: int
    round: int | None

    @property
    def ms(self) -> float:
        return max(0, self.end_ns - self.start_ns) / 1e6


@dataclass
class Traces:
    """What the report takes from the span file."""

    path: Path
    spans_read: int = 0
    train_ms: dict[str, list[float]] = field(default_factory=dict)  # worker -> its worker.train durations
    trace: list[Span] = field(default_factory=list)  # the round shown as a waterfall, in start order
    round_traces: int = 0
    truncated: bool = False


@dataclass
class RunData:
    run_dir: Path
    summary: dict
    job: dict | None = None
    manifest: dict | None = None
    traces: Traces | None = None
    notes: list[str] = field(default_factory=list)  # inputs that were missing or unreadable, said in the report

    @property
    def mode(self) -> str:
        mode = (self.job or {}).get("mode")
        if mode in ("sync", "async"):
            return mode
        return "async" if any(r.get("tickets") for r in self.rows) else "sync"

    @property
    def rows(self) -> list[dict]:
        rows = self.summary.get("rounds")
        return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def finite(value: Any) -> float | None:
    """A plottable number, or None (summary.json writes a diverged loss as null)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _read_json(path: Path) -> Any:
    if path.stat().st_size > MAX_JSON_BYTES:
        raise ValueError(f"larger than {MAX_JSON_BYTES} bytes")
    return json.loads(path.read_text(encoding="utf-8"))


def _read_job(run_dir: Path, notes: list[str]) -> dict | None:
    for name in (JOB_SPEC_NAME, DEMO_JOB_NAME):
        path = run_dir / name
        if not path.exists():
            continue
        try:
            if path.stat().st_size > MAX_JSON_BYTES:
                raise ValueError(f"larger than {MAX_JSON_BYTES} bytes")
            doc = json.loads(path.read_text(encoding="utf-8")) if name.endswith(".json") else \
                yaml.safe_load(path.read_text(encoding="utf-8"))
            if isinstance(doc, dict):
                return doc
            raise ValueError("not a mapping")
        except (OSError, ValueError, yaml.YAMLError) as exc:
            notes.append(f"{name} is unreadable: {exc!r:.200}")
    notes.append(f"no job spec in the run directory ({JOB_SPEC_NAME} is written at job end)")
    return None


def _read_manifest(run_dir: Path, notes: list[str]) -> dict | None:
    path = run_dir / MANIFEST_NAME
    if not path.exists():
        notes.append(f"no {MANIFEST_NAME}: the final model's manifest was not available at job end")
        return None
    try:
        doc = _read_json(path)
        if not isinstance(doc, dict):
            raise ValueError("not a mapping")
        return doc
    except (OSError, ValueError) as exc:
        notes.append(f"{MANIFEST_NAME} is unreadable: {exc!r:.200}")
        return None


def _span(record: Any) -> Span | None:
    if not isinstance(record, dict):
        return None
    try:
        attributes = record.get("attributes") if isinstance(record.get("attributes"), dict) else {}
        round_ = attributes.get("fedbus.round")
        instance = attributes.get("fedbus.worker") or record.get("instance") or "?"
        return Span(trace_id=str(record["trace_id"]), span_id=str(record["span_id"]),
                    parent=None if record.get("parent_span_id") is None else str(record["parent_span_id"]),
                    name=str(record["name"])[:128], service=str(record.get("service") or "?")[:128],
                    instance=str(instance)[:128], start_ns=int(record["start_ns"]), end_ns=int(record["end_ns"]),
                    round=round_ if isinstance(round_, int) and not isinstance(round_, bool) else None)
    except (KeyError, TypeError, ValueError):
        return None


def read_traces(path: Path) -> Traces:
    """Each worker's training times and the most complete round trace (the latest of them)
    from a span file; lines that are torn, too long or not span records are skipped."""
    out = Traces(path=path)
    by_trace: dict[str, list[Span]] = defaultdict(list)
    with open(path, "rb") as fh:
        for line in fh:
            if not line.endswith(b"\n"):
                break  # a write still in progress (see spanfile.read_spans)
            if len(line) > MAX_SPAN_LINE_BYTES:
                continue
            try:
                span = _span(json.loads(line))
            except ValueError:
                continue
            if span is None:
                continue
            if out.spans_read >= MAX_SPANS:
                out.truncated = True
                break
            out.spans_read += 1
            if span.name == "worker.train":
                out.train_ms.setdefault(span.instance, []).append(span.ms)
            by_trace[span.trace_id].append(span)
    best: tuple[int, int] | None = None
    for spans in by_trace.values():
        root = next((s for s in spans if s.parent is None and s.name in TRACE_ROOTS), None)
        if root is None:
            continue
        out.round_traces += 1
        # The round with the most participants in it (a round with a straggler's spans over
        # one without); of those, the latest.
        key = (len({(s.service, s.instance) for s in spans}), root.start_ns)
        if best is None or key > best:
            best = key
            out.trace = sorted(spans, key=lambda s: (s.start_ns, s.end_ns))
    return out


def load_run(run_dir: str | Path, *, span_file: str | Path | None = None) -> RunData:
    """Everything the report shows of ``run_dir``; ReportInputError without a summary."""
    run_dir = Path(run_dir)
    try:
        summary = _read_json(run_dir / SUMMARY_NAME)
    except (OSError, ValueError) as exc:
        raise ReportInputError(f"{run_dir / SUMMARY_NAME}: {exc!r:.300}") from None
    if not isinstance(summary, dict):
        raise ReportInputError(f"{run_dir / SUMMARY_NAME}: not a JSON object")
    data = RunData(run_dir=run_dir, summary=summary)
    data.job = _read_job(run_dir, data.notes)
    data.manifest = _read_manifest(run_dir, data.notes)
    if data.manifest is not None and data.manifest.get("run") != summary.get("run"):
        data.notes.append(f"{MANIFEST_NAME} belongs to run {str(data.manifest.get('run'))[:80]!r}, not to this one: "
                          "not shown")
        data.manifest = None
    spans = Path(span_file) if span_file is not None else run_dir / SPANS_NAME
    try:
        data.traces = read_traces(spans)
        if data.traces.truncated:
            data.notes.append(f"{spans} holds more than {MAX_SPANS} spans: only the first {MAX_SPANS} were read")
    except OSError as exc:
        data.notes.append(f"no span file ({spans}: {exc.strerror or exc!r:.100}): set FEDBUS_SPAN_FILE or "
                          "--span-file for every process of the run to see the round waterfall and training times")
    return data
