"""The metrics module: names as documented, values as recorded, served on 127.0.0.1; the
ledger's live counter equals its totals; log lines carry the current span's ids."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import structlog
from opentelemetry.sdk.trace import TracerProvider

from fedbus.rejections import RejectionLedger
from fedbus.telemetry import configure_logging
from fedbus.telemetry.metrics import count_rejection, metrics, serve_metrics, shutdown_metrics
from tests.metrics_support import by_label, scrape, total

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture
def served():
    server = serve_metrics("fedbus-test", instance="t1", job="jobA", port=0)
    yield server
    shutdown_metrics()


def test_recorded_values_are_scraped_under_their_documented_names(served):
    assert served.host == "127.0.0.1" and served.port > 0
    m = metrics()
    m.job_started(deadline_s=30.0)
    m.committed(sync=True, round_=1, model_version=1, status="aggregated", seconds=0.4, staleness=[0, 0, 2],
                model_metrics={"test_accuracy": 0.75, "test_loss": float("nan")})
    m.committed(sync=True, round_=2, model_version=1, status="failed", seconds=30.0, staleness=[],
                model_metrics={})
    m.accepted(3)
    m.accepted(0)
    m.live_workers(4)
    m.privacy(1.5, 8.0)
    m.sent("update", 1000)
    m.received(250)
    m.trained(0.2)
    m.local_metrics("train", {"loss": 0.5, "accuracy": 0.9, "other": 7.0})
    m.partial_accepted("eu")
    m.partial_published("eu")

    s = scrape(served.url)
    assert total(s, "fedbus_rounds_committed_total", status="aggregated") == 1
    assert total(s, "fedbus_rounds_committed_total", status="failed") == 1
    assert total(s, "fedbus_versions_committed_total") == 1
    assert total(s, "fedbus_round") == 2 and total(s, "fedbus_model_version") == 1
    assert total(s, "fedbus_round_deadline_seconds") == 30.0
    assert total(s, "fedbus_last_commit_timestamp_seconds") > 1.7e9
    assert total(s, "fedbus_round_duration_seconds_count") == 2
    assert total(s, "fedbus_round_duration_seconds_sum") == pytest.approx(30.4)
    assert total(s, "fedbus_update_staleness_versions_count") == 3
    assert total(s, "fedbus_update_staleness_versions_bucket", le="0") == 2
    assert total(s, "fedbus_updates_accepted_total") == 3
    assert total(s, "fedbus_live_workers") == 4
    assert (total(s, "fedbus_privacy_epsilon"), total(s, "fedbus_privacy_epsilon_limit")) == (1.5, 8.0)
    assert total(s, "fedbus_sent_bytes_total", type="update") == 1000
    assert total(s, "fedbus_received_bytes_total") == 250
    assert total(s, "fedbus_worker_training_seconds_count") == 1
    assert (total(s, "fedbus_worker_train_loss"), total(s, "fedbus_worker_train_accuracy")) == (0.5, 0.9)
    assert total(s, "fedbus_model_test_accuracy") == 0.75
    assert "fedbus_model_test_loss" not in s  # NaN is never exported
    assert total(s, "fedbus_partials_accepted_total", region="eu") == 1
    assert total(s, "fedbus_partials_published_total", region="eu") == 1
    # Every fedbus series carries the job.
    fedbus = [lab for name, rows in s.items() if name.startswith("fedbus_") for lab, _ in rows]
    assert fedbus and all(lab.get("fedbus_job") == "jobA" for lab in fedbus)


def test_the_ledgers_live_counter_equals_its_totals(served):
    ledger = RejectionLedger(60_000, lambda sender: sender == "w01", on_count=count_rejection)
    for i in range(7):
        ledger.record("update", "w01", "bad_signature", "x", i)
    for i in range(3):
        ledger.record("heartbeat", f"junk{i}", "unknown_sender", "y", i)
    ledger.record("update", None, "unknown_sender", "z", 9)
    s = scrape(served.url)
    assert by_label(s, "fedbus_rejections_total", "reason") == {k: float(v) for k, v in ledger.totals.items()}
    assert total(s, "fedbus_rejections_total", kind="heartbeat") == 3


def test_unserved_metrics_are_no_ops_and_a_second_server_replaces_the_first():
    metrics().rejected("update", "bad_signature")  # nothing serving: silently nothing
    first = serve_metrics("a", instance="a", job="j", port=0)
    metrics().accepted(5)
    second = serve_metrics("b", instance="b", job="j", port=0)
    try:
        assert total(scrape(second.url), "fedbus_updates_accepted_total") == 0  # a fresh registry
        with pytest.raises(OSError):
            scrape(first.url, timeout=2)
    finally:
        shutdown_metrics()


def test_every_exported_name_is_documented_in_the_readme():
    text = README.read_text()
    names = set(re.findall(r'"(fedbus_[a-z_]+)"', (README.parent / "fedbus" / "telemetry" / "metrics.py").read_text()))
    names |= {f"fedbus_worker_{split}_{m}" for split in ("train", "eval") for m in ("loss", "accuracy")}
    undocumented = [n for n in sorted(names) if n not in text]
    assert not undocumented, undocumented


def test_log_lines_carry_the_current_spans_ids():
    out = io.StringIO()
    configure_logging(process="coordinator", json=True, stream=out)
    tracer = TracerProvider().get_tracer("t")
    try:
        structlog.get_logger().info("outside")
        with tracer.start_as_current_span("round") as span:
            structlog.get_logger().info("inside")
            ctx = span.get_span_context()
    finally:
        structlog.reset_defaults()
    outside, inside = (json.loads(line) for line in out.getvalue().splitlines())
    assert "trace_id" not in outside and "span_id" not in outside
    assert inside["trace_id"] == format(ctx.trace_id, "032x")
    assert inside["span_id"] == format(ctx.span_id, "016x")
