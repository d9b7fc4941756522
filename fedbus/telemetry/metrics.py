"""Live metrics of every fedbus process (OpenTelemetry, exported for Prometheus).

Services record through :func:`metrics` at the points where they already log or
commit; nothing here knows about rounds or messages beyond the numbers it is handed.
Until :func:`serve_metrics` runs, the instruments are OpenTelemetry no-ops, so
library code (``fedbus sim``, tests, tools) records for free.

The names below are a contract (alert rules and the Grafana dashboard in
``deploy/prometheus/`` use them; the README lists them). The Prometheus exporter
appends the unit suffix and ``_total`` to counters, so ``fedbus_sent_bytes`` with unit
``By`` is scraped as ``fedbus_sent_bytes_total``. Every series carries ``fedbus_job``.

Label values are bounded by construction: rejection reasons and message types are
names defined in code, regions come from the federation file, never from a message.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

import structlog
from opentelemetry.metrics import Meter, NoOpMeter

log = structlog.get_logger("fedbus.telemetry.metrics")

DEFAULT_METRICS_HOST = "127.0.0.1"

# Seconds: a fast local round takes ~0.1 s, a cross-site one minutes.
DURATION_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
# Model versions an update's base was behind (0 = fresh); FedBuff bounds it by a few tens.
STALENESS_BUCKETS = (0, 1, 2, 3, 4, 5, 8, 13, 21, 34, 55)

# The local metrics a worker exports as gauges, and under which name (others stay in logs).
_LOCAL_METRICS = ("loss", "accuracy")


class FedbusMetrics:
    """The instruments, with one method per thing a service observes."""

    def __init__(self, meter: Meter, job: str = ""):
        self._base: dict[str, str] = {"fedbus_job": job} if job else {}
        m = meter
        # -- coordinator
        self._rounds = m.create_counter(
            "fedbus_rounds_committed", description="sync rounds closed and committed, by status (aggregated|failed)")
        self._versions = m.create_counter(
            "fedbus_versions_committed", description="new global model versions committed (both modes)")
        self._round = m.create_gauge("fedbus_round", description="the latest committed round (sync) or version (async)")
        self._model_version = m.create_gauge("fedbus_model_version", description="the latest committed model version")
        self._last_commit = m.create_gauge(
            "fedbus_last_commit_timestamp_seconds", unit="s",
            description="Unix time of the latest committed round or version (the job's start before the first)")
        self._deadline = m.create_gauge(
            "fedbus_round_deadline_seconds", unit="s", description="the job's round deadline (round_deadline_s)")
        self._duration = m.create_histogram(
            "fedbus_round_duration_seconds", unit="s", explicit_bucket_boundaries_advisory=DURATION_BUCKETS_S,
            description="time from opening a round (async: starting a version) to closing it")
        self._staleness = m.create_histogram(
            "fedbus_update_staleness_versions", explicit_bucket_boundaries_advisory=STALENESS_BUCKETS,
            description="model versions between an update's base and the version it is folded into")
        self._live_workers = m.create_gauge("fedbus_live_workers", description="workers whose heartbeats are current")
        self._epsilon = m.create_gauge("fedbus_privacy_epsilon", description="differential-privacy epsilon spent so far")
        self._epsilon_limit = m.create_gauge(
            "fedbus_privacy_epsilon_limit", description="the job's privacy budget (privacy.max_epsilon)")
        self._model_accuracy = m.create_gauge(
            "fedbus_model_test_accuracy", description="the committed model's accuracy on the server's test data")
        self._model_loss = m.create_gauge(
            "fedbus_model_test_loss", description="the committed model's loss on the server's test data")
        self._partials_in = m.create_counter(
            "fedbus_partials_accepted", description="regional partial aggregates accepted, by region")
        # -- coordinator and aggregators
        self._accepted = m.create_counter("fedbus_updates_accepted", description="worker updates accepted")
        # -- every role
        self._rejections = m.create_counter(
            "fedbus_rejections", description="messages rejected, by kind and named reason (as in summary.json)")
        self._sent = m.create_counter(
            "fedbus_sent_bytes", unit="By", description="signed messages published, envelope plus claim-check blob")
        self._received = m.create_counter(
            "fedbus_received_bytes", unit="By", description="signed messages received, envelope plus claim-check blob")
        # -- aggregators
        self._partials_out = m.create_counter(
            "fedbus_partials_published", description="regional partial aggregates published, by region")
        # -- workers
        self._train_seconds = m.create_histogram(
            "fedbus_worker_training_seconds", unit="s", explicit_bucket_boundaries_advisory=DURATION_BUCKETS_S,
            description="wall time of one local training")
        self._train_gauges = {name: m.create_gauge(f"fedbus_worker_train_{name}",
                                                   description=f"local training {name} of the latest update")
                              for name in _LOCAL_METRICS}
        self._eval_gauges = {name: m.create_gauge(f"fedbus_worker_eval_{name}",
                                                  description=f"{name} of the received model on local held-out data")
                             for name in _LOCAL_METRICS}

    def _attrs(self, **labels: str) -> dict[str, str]:
        return {**self._base, **labels} if labels else self._base

    # ---- every role --------------------------------------------------------------------

    def rejected(self, kind: str, reason: str) -> None:
        self._rejections.add(1, self._attrs(kind=kind, reason=reason))

    def sent(self, message_type: str, nbytes: int) -> None:
        self._sent.add(nbytes, self._attrs(type=message_type))

    def received(self, nbytes: int) -> None:
        # No type label: before verification the type is whatever the sender wrote.
        self._received.add(nbytes, self._base)

    # ---- coordinator -------------------------------------------------------------------

    def job_started(self, deadline_s: float) -> None:
        self._deadline.set(deadline_s, self._base)
        self._last_commit.set(time.time(), self._base)

    def committed(self, *, sync: bool, round_: int, model_version: int, status: str, seconds: float,
                  staleness: list[int], model_metrics: Mapping[str, float]) -> None:
        """A round (sync) or version (async) was committed and announced."""
        if sync:
            self._rounds.add(1, self._attrs(status=status))
        if status == "aggregated":
            self._versions.add(1, self._base)
            for s in staleness:
                self._staleness.record(s, self._base)
        self._round.set(round_, self._base)
        self._model_version.set(model_version, self._base)
        self._last_commit.set(time.time(), self._base)
        self._duration.record(seconds, self._base)
        _set_finite(self._model_accuracy, model_metrics.get("test_accuracy"), self._base)
        _set_finite(self._model_loss, model_metrics.get("test_loss"), self._base)

    def accepted(self, count: int = 1) -> None:
        if count > 0:
            self._accepted.add(count, self._base)

    def partial_accepted(self, region: str) -> None:
        self._partials_in.add(1, self._attrs(region=region))

    def live_workers(self, count: int) -> None:
        self._live_workers.set(count, self._base)

    def privacy(self, epsilon: float, limit: float | None) -> None:
        _set_finite(self._epsilon, epsilon, self._base)
        _set_finite(self._epsilon_limit, limit, self._base)

    # ---- aggregators -------------------------------------------------------------------

    def partial_published(self, region: str) -> None:
        self._partials_out.add(1, self._attrs(region=region))

    # ---- workers -----------------------------------------------------------------------

    def trained(self, seconds: float) -> None:
        self._train_seconds.record(seconds, self._base)

    def local_metrics(self, split: str, values: Mapping[str, float]) -> None:
        """``split``: "train" (an update's training metrics) or "eval" (held-out data)."""
        gauges = self._train_gauges if split == "train" else self._eval_gauges
        for name, gauge in gauges.items():
            _set_finite(gauge, values.get(name), self._base)


def _set_finite(gauge, value, attrs) -> None:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return
    if math.isfinite(v):
        gauge.set(v, attrs)


def count_rejection(kind: str, reason: str) -> None:
    """A RejectionLedger's ``on_count``: the live twin of its ``totals``."""
    _current.rejected(kind, reason)


@dataclass
class MetricsServer:
    host: str
    port: int
    _http: object
    _provider: object

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"


_current = FedbusMetrics(NoOpMeter("fedbus"))
_server: MetricsServer | None = None
_lock = threading.Lock()


def metrics() -> FedbusMetrics:
    """The process's instruments (no-ops unless :func:`serve_metrics` ran)."""
    return _current


def serve_metrics(service_name: str, *, instance: str, job: str, port: int,
                  host: str = DEFAULT_METRICS_HOST) -> MetricsServer:
    """Serve ``/metrics`` on host:port (port 0: any free port) and record for real from now on.

    Replaces an earlier server of this process. Its own Prometheus registry, so a second
    call (tests, in-process demos) never collides with the first one's collectors.
    """
    global _current, _server
    # Imported here: only processes asked to serve metrics pay for prometheus_client.
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.resources import Resource
    from prometheus_client import CollectorRegistry, start_http_server

    with _lock:
        _shutdown_current()
        registry = CollectorRegistry()
        reader = PrometheusMetricReader(registry=registry)
        resource = Resource.create({"service.name": service_name, "service.instance.id": instance})
        provider = MeterProvider(metric_readers=[reader], resource=resource, shutdown_on_exit=False)
        http, _thread = start_http_server(port, addr=host, registry=registry)
        _server = MetricsServer(host, int(http.server_port), http, provider)
        _current = FedbusMetrics(provider.get_meter("fedbus"), job)
    log.info("metrics.serving", url=_server.url, service=service_name)
    return _server


def _shutdown_current() -> None:
    global _current, _server
    server, _server = _server, None
    _current = FedbusMetrics(NoOpMeter("fedbus"))
    if server is not None:
        server._http.shutdown()  # type: ignore[attr-defined]
        server._http.server_close()  # type: ignore[attr-defined]
        server._provider.shutdown()  # type: ignore[attr-defined]


def shutdown_metrics() -> None:
    """Stop serving; instruments become no-ops again. Idempotent."""
    with _lock:
        _shutdown_current()
