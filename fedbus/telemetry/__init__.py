"""Observability for fedbus: structured logs (structlog) and traces (OpenTelemetry).

Typical process start-up::

    configure_logging(process="worker:w03")
    setup_tracing("fedbus-worker", instance="w03")   # span file from FEDBUS_SPAN_FILE
    ...
    shutdown_tracing()
"""

from fedbus.telemetry.logging import configure_logging
from fedbus.telemetry.spanfile import JsonlSpanExporter, read_spans, traces_by_id
from fedbus.telemetry.tracing import (
    current_traceparent,
    extract_trace_context,
    get_tracer,
    inject_trace_headers,
    setup_tracing,
    shutdown_tracing,
    trace_context_from_traceparent,
)

__all__ = [
    "JsonlSpanExporter",
    "configure_logging",
    "current_traceparent",
    "extract_trace_context",
    "get_tracer",
    "inject_trace_headers",
    "read_spans",
    "setup_tracing",
    "shutdown_tracing",
    "trace_context_from_traceparent",
    "traces_by_id",
]
