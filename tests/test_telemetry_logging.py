import io
import json
import re

import pytest
import structlog

from fedbus.telemetry import configure_logging


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def clean_logging(monkeypatch):
    monkeypatch.delenv("FEDBUS_LOG_LEVEL", raising=False)
    monkeypatch.delenv("FEDBUS_LOG_JSON", raising=False)
    yield
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()


def strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def json_lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_output_is_one_object_per_line_with_standard_fields():
    out = io.StringIO()
    configure_logging(process="worker:w03", json=True, stream=out)
    log = structlog.get_logger()

    log.info("round.closed", round=3, seconds=0.12)
    log.warning("update.rejected", reason="bad_signature")

    first, second = json_lines(out)
    assert first["event"] == "round.closed"
    assert first["level"] == "info"
    assert first["proc"] == "worker:w03"
    assert first["timestamp"].endswith("Z") and "T" in first["timestamp"]
    assert (first["round"], first["seconds"]) == (3, 0.12)
    assert (second["event"], second["level"], second["reason"]) == ("update.rejected", "warning", "bad_signature")


def test_non_tty_stream_defaults_to_json_and_tty_to_console():
    plain = io.StringIO()
    configure_logging(process="coordinator", stream=plain)
    structlog.get_logger().info("run.started")
    assert json_lines(plain)[0]["event"] == "run.started"

    tty = FakeTTY()
    configure_logging(process="coordinator", stream=tty)
    structlog.get_logger().info("run.started", workers=4)
    text = strip_ansi(tty.getvalue())
    assert "run.started" in text and "workers=4" in text and "proc=coordinator" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_console_mode_renders_fields_and_exceptions():
    out = io.StringIO()
    configure_logging(process="coordinator", json=False, stream=out)
    log = structlog.get_logger()
    try:
        raise RuntimeError("aggregation failed")
    except RuntimeError:
        log.exception("round.failed", round=7)

    text = out.getvalue()
    assert "round.failed" in text and "round=7" in text and "error" in text
    assert "RuntimeError: aggregation failed" in text
    assert "\x1b[" not in text  # no colour codes into a non-terminal


def test_json_mode_formats_exceptions_as_a_field():
    out = io.StringIO()
    configure_logging(process="coordinator", json=True, stream=out)
    try:
        raise ValueError("bad update")
    except ValueError:
        structlog.get_logger().exception("update.failed")

    (record,) = json_lines(out)
    assert "ValueError: bad update" in record["exception"]


def test_contextvars_are_merged():
    out = io.StringIO()
    configure_logging(process="coordinator", json=True, stream=out)
    structlog.contextvars.bind_contextvars(round=5)
    structlog.get_logger().info("round.opened")
    assert json_lines(out)[0]["round"] == 5


def test_level_filters_and_env_overrides_default(monkeypatch):
    out = io.StringIO()
    configure_logging(process="coordinator", json=True, stream=out)
    structlog.get_logger().debug("hidden")
    assert out.getvalue() == ""

    monkeypatch.setenv("FEDBUS_LOG_LEVEL", "DEBUG")
    configure_logging(process="coordinator", json=True, stream=out)
    structlog.get_logger().debug("shown")
    assert json_lines(out)[0]["event"] == "shown"

    monkeypatch.setenv("FEDBUS_LOG_LEVEL", "error")
    out = io.StringIO()
    configure_logging(process="coordinator", json=True, stream=out)
    structlog.get_logger().warning("hidden")
    assert out.getvalue() == ""


def test_explicit_level_beats_env(monkeypatch):
    monkeypatch.setenv("FEDBUS_LOG_LEVEL", "error")
    out = io.StringIO()
    configure_logging(process="coordinator", level="info", json=True, stream=out)
    structlog.get_logger().info("shown")
    assert json_lines(out)[0]["event"] == "shown"


def test_env_json_overrides_tty_detection(monkeypatch):
    monkeypatch.setenv("FEDBUS_LOG_JSON", "1")
    tty = FakeTTY()
    configure_logging(process="coordinator", stream=tty)
    structlog.get_logger().info("as.json")
    assert json_lines(tty)[0]["event"] == "as.json"

    monkeypatch.setenv("FEDBUS_LOG_JSON", "false")
    plain = io.StringIO()
    configure_logging(process="coordinator", stream=plain)
    structlog.get_logger().info("as.console")
    assert not plain.getvalue().startswith("{")
    assert "as.console" in plain.getvalue()


def test_invalid_settings_are_rejected(monkeypatch):
    with pytest.raises(ValueError, match="log level"):
        configure_logging(process="coordinator", level="loud")
    monkeypatch.setenv("FEDBUS_LOG_JSON", "maybe")
    with pytest.raises(ValueError, match="FEDBUS_LOG_JSON"):
        configure_logging(process="coordinator")


def test_configure_twice_is_idempotent_and_updates_existing_loggers():
    module_logger = structlog.get_logger()  # as created at import time, before configuration
    out = io.StringIO()
    configure_logging(process="coordinator", json=True, stream=out)
    configure_logging(process="coordinator", json=True, stream=out)
    module_logger.info("once")
    assert len(json_lines(out)) == 1

    renamed = io.StringIO()
    configure_logging(process="worker:w01", json=True, stream=renamed)
    module_logger.info("moved")
    assert json_lines(renamed) and json_lines(renamed)[0]["proc"] == "worker:w01"
    assert len(json_lines(out)) == 1


def test_logs_default_to_stderr(capsys):
    configure_logging(process="coordinator", json=True)
    structlog.get_logger().info("to.stderr")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert json.loads(captured.err)["event"] == "to.stderr"
