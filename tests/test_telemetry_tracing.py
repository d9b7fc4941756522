import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from fedbus.telemetry import (
    current_traceparent,
    extract_trace_context,
    get_tracer,
    inject_trace_headers,
    read_spans,
    setup_tracing,
    shutdown_tracing,
    trace_context_from_traceparent,
    traces_by_id,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
ENV_VARS = (
    "FEDBUS_SPAN_FILE",
    "OTEL_SDK_DISABLED",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_TRACES_SAMPLER",
)


@pytest.fixture(autouse=True)
def clean_tracing(monkeypatch):
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    shutdown_tracing()
    yield
    shutdown_tracing()


@pytest.fixture
def span_file(tmp_path) -> Path:
    return tmp_path / "spans.jsonl"


def by_name(spans: list[dict]) -> dict[str, dict]:
    return {span["name"]: span for span in spans}


def test_child_from_injected_headers_joins_parent_trace(span_file):
    setup_tracing("fedbus-coordinator", span_file=span_file, instance="coord")
    tracer = get_tracer("test")

    with tracer.start_as_current_span("round") as round_span:
        headers = inject_trace_headers()
        assert set(headers) == {"traceparent"}
        assert current_traceparent() == headers["traceparent"]
    # The child is built only from the headers, as a message consumer would.
    with tracer.start_as_current_span("train", context=extract_trace_context(headers)):
        pass
    shutdown_tracing()

    spans = by_name(read_spans(span_file, strict=True))
    root, child = spans["round"], spans["train"]
    assert root["trace_id"] == child["trace_id"] == format(round_span.get_span_context().trace_id, "032x")
    assert root["parent_span_id"] is None
    assert child["parent_span_id"] == root["span_id"]
    assert len(root["trace_id"]) == 32 and len(root["span_id"]) == 16


def test_span_record_fields(span_file):
    setup_tracing("fedbus-worker", span_file=span_file, instance="w03")
    with get_tracer("test").start_as_current_span("upload", attributes={"round": 3, "shape": (2, 3)}) as span:
        span.add_event("chunk.sent", {"bytes": 1024})
        span.set_attribute("ratio", float("nan"))
        span.set_status(Status(StatusCode.ERROR, "nats timeout"))
    shutdown_tracing()

    (record,) = read_spans(span_file, strict=True)
    assert record["service"] == "fedbus-worker"
    assert record["instance"] == "w03"
    assert record["end_ns"] >= record["start_ns"] > 0
    assert record["duration_ms"] == pytest.approx((record["end_ns"] - record["start_ns"]) / 1e6)
    assert record["attributes"] == {"round": 3, "shape": [2, 3], "ratio": "nan"}
    assert record["status"] == "ERROR" and record["status_message"] == "nats timeout"
    assert [(e["name"], e["attributes"]) for e in record["events"]] == [("chunk.sent", {"bytes": 1024})]


def test_span_is_on_disk_as_soon_as_it_ends(span_file):
    setup_tracing("fedbus-coordinator", span_file=span_file)
    with get_tracer("test").start_as_current_span("round"):
        pass
    assert [s["name"] for s in read_spans(span_file, strict=True)] == ["round"]


def test_header_keys_are_case_insensitive(span_file):
    setup_tracing("fedbus-coordinator", span_file=span_file)
    tracer = get_tracer("test")
    with tracer.start_as_current_span("round") as root:
        traceparent = current_traceparent()

    for headers in ({"TraceParent": traceparent}, {"TRACEPARENT": traceparent, "Nats-Msg-Id": "x"}):
        context = extract_trace_context(headers)
        parent = trace.get_current_span(context).get_span_context()
        assert parent.is_valid and parent.is_remote
        assert parent.trace_id == root.get_span_context().trace_id
        assert parent.span_id == root.get_span_context().span_id

    context = trace_context_from_traceparent(traceparent)
    assert trace.get_current_span(context).get_span_context().span_id == root.get_span_context().span_id


def test_tracestate_is_propagated(span_file):
    setup_tracing("fedbus-coordinator", span_file=span_file)
    incoming = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "tracestate": "vendor=abc"}
    with get_tracer("test").start_as_current_span("handle", context=extract_trace_context(incoming)):
        outgoing = inject_trace_headers()
    assert outgoing["traceparent"].startswith("00-0af7651916cd43dd8448eb211c80319c-")
    assert outgoing["tracestate"] == "vendor=abc"


@pytest.mark.parametrize(
    "headers",
    [
        None,
        {},
        {"traceparent": "garbage"},
        {"traceparent": "00-00000000000000000000000000000000-0000000000000000-01"},
        {"traceparent": 123},
        {b"traceparent": b"\xff\xfe"},
        {"traceparent": b"\xff\xfe"},
        ["not", "a", "mapping"],
        "traceparent",
    ],
)
def test_garbage_headers_give_empty_context(span_file, headers):
    setup_tracing("fedbus-worker", span_file=span_file)
    with get_tracer("test").start_as_current_span("ambient"):
        # Must not inherit the ambient span: an untraced message starts a new trace.
        context = extract_trace_context(headers)
    assert trace.get_current_span(context) is trace.INVALID_SPAN
    assert dict(context) == {}


@pytest.mark.parametrize("traceparent", [None, "", "garbage", 42])
def test_garbage_traceparent_gives_empty_context(traceparent):
    assert trace.get_current_span(trace_context_from_traceparent(traceparent)) is trace.INVALID_SPAN


def test_no_span_means_no_headers():
    assert inject_trace_headers() == {}
    assert current_traceparent() is None


def test_tracer_created_before_setup_follows_reconfiguration(tmp_path):
    tracer = get_tracer("module.level")  # as a module would at import time
    with tracer.start_as_current_span("before.setup") as span:
        assert not span.get_span_context().is_valid

    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    setup_tracing("fedbus-a", span_file=first)
    with tracer.start_as_current_span("one"):
        pass
    setup_tracing("fedbus-b", span_file=second)  # setup twice in one process is allowed
    with tracer.start_as_current_span("two"):
        pass
    shutdown_tracing()

    assert [s["name"] for s in read_spans(first, strict=True)] == ["one"]
    assert [(s["name"], s["service"]) for s in read_spans(second, strict=True)] == [("two", "fedbus-b")]


def test_plain_otel_api_users_follow_reconfiguration(tmp_path):
    setup_tracing("fedbus-a", span_file=tmp_path / "first.jsonl")
    if type(trace.get_tracer_provider()).__module__ != "fedbus.telemetry.tracing":
        pytest.skip("another test installed its own global TracerProvider first")
    third_party = trace.get_tracer("third.party")
    setup_tracing("fedbus-b", span_file=tmp_path / "second.jsonl")
    with third_party.start_as_current_span("three"):
        pass
    shutdown_tracing()
    assert [(s["name"], s["service"]) for s in read_spans(tmp_path / "second.jsonl")] == [("three", "fedbus-b")]


def test_span_file_from_env_and_shutdown_is_idempotent(monkeypatch, span_file):
    monkeypatch.setenv("FEDBUS_SPAN_FILE", str(span_file))
    setup_tracing("fedbus-coordinator")
    with get_tracer("test").start_as_current_span("round"):
        pass
    shutdown_tracing()
    shutdown_tracing()
    assert [s["name"] for s in read_spans(span_file)] == ["round"]


def test_sdk_disabled_does_nothing(monkeypatch, span_file):
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    setup_tracing("fedbus-coordinator", span_file=span_file)
    with get_tracer("test").start_as_current_span("round") as span:
        assert not span.get_span_context().is_valid
    shutdown_tracing()
    assert not span_file.exists()


def test_read_spans_skips_torn_last_line(tmp_path):
    path = tmp_path / "spans.jsonl"
    path.write_bytes(b'{"trace_id":"a","name":"x"}\n{"trace_id":"b","name":"y"}\n{"trace_id":"c","na')
    assert [s["name"] for s in read_spans(path, strict=True)] == ["x", "y"]

    path.write_bytes(b'{"trace_id":"a","name":"x"}\nnot json\n')
    assert [s["name"] for s in read_spans(path)] == ["x"]
    with pytest.raises(ValueError, match="not a JSON span record"):
        read_spans(path, strict=True)


def test_traces_by_id_groups_in_start_order():
    spans = [
        {"trace_id": "t1", "name": "late", "start_ns": 20},
        {"trace_id": "t2", "name": "other", "start_ns": 5},
        {"trace_id": "t1", "name": "early", "start_ns": 10},
    ]
    traces = traces_by_id(spans)
    assert [s["name"] for s in traces["t1"]] == ["early", "late"]
    assert [s["name"] for s in traces["t2"]] == ["other"]


# Each child process joins the trace from a traceparent on argv and writes 20 spans.
# The big attribute makes lines larger than PIPE_BUF/a page, so interleaving would show.
CHILD_PROCESS_CODE = """
import sys, time
from fedbus.telemetry import get_tracer, setup_tracing, shutdown_tracing, trace_context_from_traceparent

span_file, traceparent, worker, start_at = sys.argv[1:5]
setup_tracing("fedbus-worker", span_file=span_file, instance=worker)
tracer = get_tracer("fedbus.test.worker")
parent = trace_context_from_traceparent(traceparent)
time.sleep(max(0.0, float(start_at) - time.time()))  # start together so the writes overlap
for step in range(20):
    with tracer.start_as_current_span("train.step", context=parent, attributes={"worker": worker, "step": step}) as span:
        span.set_attribute("padding", worker * 3000)
shutdown_tracing()
"""


def test_spans_from_concurrent_processes_share_one_trace(span_file):
    setup_tracing("fedbus-coordinator", span_file=span_file, instance="coord")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    workers = ["w01", "w02", "w03"]

    with get_tracer("test").start_as_current_span("round") as root:
        traceparent = current_traceparent()
        start_at = str(time.time() + 2.0)  # after all three interpreters have started
        children = [
            subprocess.Popen(
                [sys.executable, "-c", CHILD_PROCESS_CODE, str(span_file), traceparent, worker, start_at], env=env
            )
            for worker in workers
        ]
        try:
            return_codes = [child.wait(timeout=60) for child in children]
        finally:
            for child in children:
                if child.poll() is None:
                    child.kill()
    shutdown_tracing()
    assert return_codes == [0, 0, 0]

    raw = span_file.read_bytes()
    assert raw.endswith(b"\n")
    assert len(raw.splitlines()) == 61
    spans = read_spans(span_file, strict=True)
    assert len(spans) == 61

    traces = traces_by_id(spans)
    assert list(traces) == [format(root.get_span_context().trace_id, "032x")]
    root_record = by_name(spans)["round"]
    steps = [s for s in spans if s["name"] == "train.step"]
    assert len(steps) == 60
    assert all(s["parent_span_id"] == root_record["span_id"] for s in steps)
    assert len({s["span_id"] for s in spans}) == 61
    for worker in workers:
        mine = [s for s in steps if s["instance"] == worker]
        assert sorted(s["attributes"]["step"] for s in mine) == list(range(20))
        assert all(s["attributes"]["padding"] == worker * 3000 for s in mine)


class OtlpRecorder(BaseHTTPRequestHandler):
    requests: list[tuple[str, str, str, int]] = []
    received = threading.Event()

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).requests.append(("POST", self.path, self.headers.get("Content-Type", ""), len(body)))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()
        type(self).received.set()

    def log_message(self, format, *args):  # keep test output quiet
        pass


@pytest.fixture
def otlp_server():
    OtlpRecorder.requests = []
    OtlpRecorder.received = threading.Event()
    server = ThreadingHTTPServer(("127.0.0.1", 0), OtlpRecorder)
    server.timeout = 5
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_otlp_exporter_posts_spans_when_endpoint_is_set(monkeypatch, otlp_server):
    host, port = otlp_server.server_address[:2]
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://{host}:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "5")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")

    setup_tracing("fedbus-coordinator", instance="coord")
    with get_tracer("test").start_as_current_span("round"):
        pass
    shutdown_tracing()  # flushes the batch processor

    assert OtlpRecorder.received.wait(timeout=10)
    method, path, content_type, size = OtlpRecorder.requests[0]
    assert (method, path, content_type) == ("POST", "/v1/traces", "application/x-protobuf")
    assert size > 0
