"""Structured logging for every fedbus process (structlog).

Call :func:`configure_logging` once at process start (calling it again simply
reconfigures).  Modules then log with stable dotted event names::

    log = structlog.get_logger()
    log.info("round.closed", round=3, seconds=0.12)
    log.warning("update.rejected", reason="bad_signature")

Logs go to stderr by default because CLIs use stdout for user-facing output.
"""

from __future__ import annotations

import os
import sys
from typing import Any, TextIO

import structlog
from opentelemetry import trace
from structlog.typing import EventDict, Processor, WrappedLogger

LOG_LEVEL_ENV = "FEDBUS_LOG_LEVEL"
LOG_JSON_ENV = "FEDBUS_LOG_JSON"

DEFAULT_LEVEL = "info"
_LEVEL_NAMES = ("debug", "info", "warning", "error", "critical")
_TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
_FALSE_WORDS = frozenset({"0", "false", "no", "off"})


class AddProcessName:
    """Processor that stamps every event with ``proc`` (e.g. "worker:w03").

    A processor rather than ``bind()`` so that loggers created anywhere with
    ``structlog.get_logger()`` carry it without each module knowing who it runs in.
    An explicit ``proc=`` on a call still wins.
    """

    def __init__(self, process: str) -> None:
        self.process = process

    def __call__(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
        event_dict.setdefault("proc", self.process)
        return event_dict


def add_trace_ids(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """Processor: ``trace_id`` and ``span_id`` of the current OpenTelemetry span, if any.

    The same hex ids as the span file and any OTLP backend, so a log line leads to its
    round's trace (and from there to the metrics of that time). Explicit values win.
    """
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event_dict.setdefault("trace_id", format(context.trace_id, "032x"))
        event_dict.setdefault("span_id", format(context.span_id, "016x"))
    return event_dict


def resolve_level(level: str | None) -> str:
    """Explicit argument, else FEDBUS_LOG_LEVEL, else "info"; validated."""
    source = "level argument"
    if level is None:
        level = os.environ.get(LOG_LEVEL_ENV) or DEFAULT_LEVEL
        source = LOG_LEVEL_ENV
    name = level.strip().lower()
    if name == "warn":
        name = "warning"
    if name not in _LEVEL_NAMES:
        raise ValueError(f"{source}: unknown log level {level!r}; expected one of {', '.join(_LEVEL_NAMES)}")
    return name


def resolve_json(json: bool | None, stream: TextIO) -> bool:
    """Explicit argument, else FEDBUS_LOG_JSON, else JSON unless the stream is a TTY."""
    if json is not None:
        return json
    env_value = os.environ.get(LOG_JSON_ENV, "").strip().lower()
    if env_value in _TRUE_WORDS:
        return True
    if env_value in _FALSE_WORDS:
        return False
    if env_value:
        raise ValueError(f"{LOG_JSON_ENV}: expected true/false, got {env_value!r}")
    return not _is_tty(stream)


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # closed or non-file streams
        return False


def build_processors(process: str, *, json: bool, colors: bool = False) -> list[Processor]:
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        AddProcessName(process),
        add_trace_ids,
        structlog.processors.StackInfoRenderer(),
    ]
    if json:
        # JSON consumers want the traceback as one string field, not a rendered block.
        return [*shared, structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    # ConsoleRenderer formats exc_info itself (and warns if format_exc_info ran first).
    return [*shared, structlog.dev.ConsoleRenderer(colors=colors)]


def configure_logging(
    *,
    process: str,
    level: str | None = None,
    json: bool | None = None,
    stream: TextIO | None = None,
) -> None:
    """Configure structlog for this process; safe to call more than once.

    ``level=None`` means FEDBUS_LOG_LEVEL or "info"; ``json=None`` means
    FEDBUS_LOG_JSON, else console rendering on a TTY and JSON otherwise.
    Explicit arguments beat the environment.
    """
    out = stream if stream is not None else sys.stderr
    level_name = resolve_level(level)
    use_json = resolve_json(json, out)
    structlog.configure(
        # Colours only when the destination really is a terminal.
        processors=build_processors(process, json=use_json, colors=_is_tty(out)),
        wrapper_class=structlog.make_filtering_bound_logger(level_name),
        context_class=dict,
        logger_factory=structlog.PrintLoggerFactory(file=out),
        # Not cached: modules create loggers at import time, before configure_logging
        # runs, and a cached logger would keep the old configuration forever.
        cache_logger_on_first_use=False,
    )
