"""Tracing for fedbus processes (OpenTelemetry).

One trace per round: the coordinator's round span is the parent, and the W3C
trace context travels with each message (NATS headers, and the traceparent
inside the signed envelope) so worker and aggregator spans join that trace.

The provider lives in this module rather than only in OTel's global slot,
because OTel lets the global be set once per process while fedbus (tests,
in-process demos) may call :func:`setup_tracing` several times.  The global
slot gets a small delegating provider once, so code using plain
``opentelemetry.trace.get_tracer`` follows re-configuration too.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

try:
    # What OTel's own ProxyTracer uses: a context manager that also works as a decorator
    # on async functions, re-entered per call (so late binding holds for decorators too).
    from opentelemetry.util._decorator import _agnosticcontextmanager
except ImportError:  # private API; plain contextmanager keeps `with` usage working
    from contextlib import contextmanager as _agnosticcontextmanager

from fedbus.telemetry.spanfile import JsonlSpanExporter

SPAN_FILE_ENV = "FEDBUS_SPAN_FILE"
_OTLP_ENDPOINT_ENVS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")

_log = logging.getLogger(__name__)

# Always W3C trace context, independent of whatever global propagator is configured:
# the wire format between fedbus processes must not depend on each process's env.
_PROPAGATOR = TraceContextTextMapPropagator()

_provider: TracerProvider | None = None
_setup_lock = threading.Lock()


class _LateBoundTracer(trace.Tracer):
    """A tracer that looks up the current provider when a span starts.

    Modules create tracers at import time, before setup_tracing runs (and tests
    re-run setup_tracing); binding late keeps those tracers pointed at the
    provider that is current when the span is made.
    """

    def __init__(self, name: str, version: str | None = None, schema_url: str | None = None, attributes: Any = None):
        self._args = (name, version, schema_url, attributes)
        self._bound: tuple[Any, trace.Tracer] | None = None

    def _tracer(self) -> trace.Tracer:
        provider = _provider if _provider is not None else _fallback_provider()
        bound = self._bound
        if bound is None or bound[0] is not provider:
            bound = (provider, provider.get_tracer(*self._args))
            self._bound = bound
        return bound[1]

    def start_span(self, *args: Any, **kwargs: Any) -> trace.Span:  # type: ignore[override]
        return self._tracer().start_span(*args, **kwargs)

    @_agnosticcontextmanager  # type: ignore[override]
    def start_as_current_span(self, *args: Any, **kwargs: Any) -> Iterator[trace.Span]:
        with self._tracer().start_as_current_span(*args, **kwargs) as span:
            yield span


class _DelegatingTracerProvider(trace.TracerProvider):
    """What fedbus installs as OTel's global provider (once per process)."""

    def get_tracer(self, instrumenting_module_name: str, instrumenting_library_version: str | None = None,
                   schema_url: str | None = None, attributes: Any = None) -> trace.Tracer:
        return _LateBoundTracer(instrumenting_module_name, instrumenting_library_version, schema_url, attributes)


_GLOBAL_PROVIDER = _DelegatingTracerProvider()
_NOOP_PROVIDER = trace.NoOpTracerProvider()


def _fallback_provider() -> trace.TracerProvider:
    """Used while fedbus tracing is not set up: someone else's global provider, or no-op."""
    global_provider = trace.get_tracer_provider()
    if global_provider is _GLOBAL_PROVIDER:
        return _NOOP_PROVIDER
    return global_provider


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() == "true"


def _default_instance() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _install_global_provider() -> None:
    if trace.get_tracer_provider() is not _GLOBAL_PROVIDER:
        # OTel refuses (with a warning) if another provider was installed first; fedbus's
        # own tracers do not depend on the global, so that is only a loss for third parties.
        trace.set_tracer_provider(_GLOBAL_PROVIDER)


def setup_tracing(
    service_name: str,
    *,
    span_file: str | os.PathLike[str] | None = None,
    instance: str | None = None,
) -> TracerProvider:
    """Configure tracing for this process, replacing any earlier configuration.

    Exporters: the JSONL ``span_file`` (or FEDBUS_SPAN_FILE), written synchronously
    so every span is on disk as soon as it ends; and OTLP/HTTP, batched, when
    OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set.
    With OTEL_SDK_DISABLED=true nothing is exported and tracers are no-ops.
    ``instance`` defaults to "<hostname>-<pid>".
    """
    global _provider
    with _setup_lock:
        _shutdown_current()
        if _env_true("OTEL_SDK_DISABLED"):
            # An SDK provider built under OTEL_SDK_DISABLED hands out no-op tracers.
            return TracerProvider(shutdown_on_exit=False)

        resource = Resource.create({
            "service.name": service_name,
            "service.instance.id": instance or _default_instance(),
        })
        # shutdown_on_exit: flushes the OTLP batch at interpreter exit if nobody called shutdown_tracing.
        provider = TracerProvider(resource=resource, shutdown_on_exit=True)

        span_path = span_file if span_file is not None else os.environ.get(SPAN_FILE_ENV) or None
        if span_path is not None:
            provider.add_span_processor(SimpleSpanProcessor(JsonlSpanExporter(Path(span_path))))
        if any(os.environ.get(name) for name in _OTLP_ENDPOINT_ENVS):
            # Imported lazily: pulls in requests/protobuf, which most runs never need.
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))

        _provider = provider
        _install_global_provider()
        return provider


def _shutdown_current() -> None:
    global _provider
    provider, _provider = _provider, None
    if provider is not None:
        provider.shutdown()  # flushes batch processors, closes the span file


def shutdown_tracing() -> None:
    """Flush and shut down the exporters; idempotent."""
    with _setup_lock:
        _shutdown_current()


def get_tracer(name: str) -> trace.Tracer:
    """A tracer that always uses the provider configured at span-creation time."""
    return _LateBoundTracer(name)


def inject_trace_headers(context: Context | None = None) -> dict[str, str]:
    """W3C ``traceparent`` (and ``tracestate`` if any) for ``context`` or the current one.

    Empty when there is no valid span, so callers can merge it into headers unconditionally.
    """
    headers: dict[str, str] = {}
    _PROPAGATOR.inject(headers, context=context)
    return headers


def _lowercase_headers(headers: Any) -> dict[str, str]:
    normalised: dict[str, str] = {}
    for key, value in headers.items():
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        if isinstance(key, str) and isinstance(value, str):
            normalised[key.lower()] = value
    return normalised


def extract_trace_context(headers: Mapping[str, str] | None) -> Context:
    """The trace context carried by message headers; empty Context if none or invalid.

    Keys are matched case-insensitively (nats-py hands headers over as a plain,
    case-sensitive dict).  The result never inherits from the current context, so a
    message without trace headers starts a new trace instead of joining whatever
    span happens to be current in the receiving task.
    """
    if not headers:
        return Context()
    try:
        return _PROPAGATOR.extract(_lowercase_headers(headers), context=Context())
    except Exception:  # headers come off the network: never let them break message handling
        _log.debug("ignoring undecodable trace headers", exc_info=True)
        return Context()


def trace_context_from_traceparent(traceparent: str | None) -> Context:
    """Like :func:`extract_trace_context`, from a bare traceparent string."""
    if not isinstance(traceparent, str):
        return Context()
    return extract_trace_context({"traceparent": traceparent})


def current_traceparent() -> str | None:
    """The traceparent of the current span, or None outside any (valid) span."""
    return inject_trace_headers().get("traceparent")
