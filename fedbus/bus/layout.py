"""Subject names, stream names and buckets of one fedbus job, and their idempotent creation."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
import structlog
from nats.js.api import (
    KeyValueConfig,
    ObjectStoreConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

log = structlog.get_logger(__name__)

# Job ids become subject tokens and parts of stream names: no dots, no wildcards,
# no whitespace, short enough to keep names readable.
JOB_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
# Prefix, region and worker ids follow the same rule, for the same reason.
TOKEN_PATTERN = JOB_ID_PATTERN
_TOKEN_RE = re.compile(TOKEN_PATTERN)

KV_BUCKET = "fedbus-jobs"
MODELS_BUCKET = "fedbus-models"
BLOBS_BUCKET = "fedbus-blobs"
# Enough past revisions of a job's state to see how it got there after a bad CAS.
KV_HISTORY = 8

# JetStream API error codes (nats-server's errors.json).
ERR_STREAM_NAME_IN_USE = 10058  # exists with a different configuration
ERR_STREAM_SUBJECT_OVERLAP = 10065


def _check_token(value: object, what: str) -> str:
    if not isinstance(value, str) or not _TOKEN_RE.match(value):
        raise ValueError(
            f"invalid {what} {value!r}: must be 1-64 characters of A-Z a-z 0-9 _ - "
            "(it becomes a NATS subject token; dots, wildcards and spaces are not allowed)"
        )
    return value


def _check_dotted(value: object, what: str) -> str:
    # Control event kinds may have several tokens ("round.open"); each must be valid.
    if not isinstance(value, str) or not value:
        raise ValueError(f"invalid {what} {value!r}: must be a non-empty string")
    for part in value.split("."):
        _check_token(part, f"token {part!r} of {what}")
    return value


@dataclass(frozen=True)
class Subjects:
    """All NATS names of one job. Subject layout is `<prefix>.<job>.<family>...`.

    Stream names are `<PREFIX>_<job>_<FAMILY>`: the prefix is upper-cased (so
    prefixes differing only in case share stream names; don't do that), the job id
    is kept as is so jobs "a" and "A" stay distinct.
    """

    job: str
    prefix: str = "fedbus"

    def __post_init__(self) -> None:
        _check_token(self.job, "job id")
        _check_token(self.prefix, "subject prefix")

    @property
    def _base(self) -> str:
        return f"{self.prefix}.{self.job}"

    # control events: job open, round open/close, model published, job done
    def ctl(self, kind: str) -> str:
        return f"{self._base}.ctl.{_check_dotted(kind, 'control kind')}"

    @property
    def ctl_all(self) -> str:
        return f"{self._base}.ctl.>"

    # worker updates
    def upd(self, region: str, worker: str) -> str:
        return f"{self._base}.upd.{_check_token(region, 'region')}.{_check_token(worker, 'worker id')}"

    def upd_region(self, region: str) -> str:
        return f"{self._base}.upd.{_check_token(region, 'region')}.*"

    @property
    def upd_all(self) -> str:
        return f"{self._base}.upd.>"

    # regional partial aggregates
    def agg(self, region: str) -> str:
        return f"{self._base}.agg.{_check_token(region, 'region')}"

    @property
    def agg_all(self) -> str:
        return f"{self._base}.agg.*"

    # heartbeats: core NATS only, no stream
    def hb(self, worker: str) -> str:
        return f"{self._base}.hb.{_check_token(worker, 'worker id')}"

    @property
    def hb_all(self) -> str:
        return f"{self._base}.hb.*"

    def metrics(self, worker: str) -> str:
        return f"{self._base}.metrics.{_check_token(worker, 'worker id')}"

    @property
    def metrics_all(self) -> str:
        return f"{self._base}.metrics.*"

    @property
    def audit(self) -> str:
        return f"{self._base}.audit"

    def _stream(self, family: str) -> str:
        return f"{self.prefix.upper()}_{self.job}_{family}"

    @property
    def ctl_stream(self) -> str:
        return self._stream("CTL")

    @property
    def upd_stream(self) -> str:
        return self._stream("UPD")

    @property
    def agg_stream(self) -> str:
        return self._stream("AGG")

    @property
    def metrics_stream(self) -> str:
        return self._stream("METRICS")

    @property
    def audit_stream(self) -> str:
        return self._stream("AUDIT")

    def stream_configs(
        self, *, replicas: int = 1, storage: str = "file", duplicate_window: float = 120.0
    ) -> list[StreamConfig]:
        """The job's streams. All use limits retention: several readers (coordinator,
        aggregators, a restarted coordinator, an auditor) replay the same messages."""
        storage_type = StorageType(storage)
        families = [
            (self.ctl_stream, self.ctl_all, "control events"),
            (self.upd_stream, self.upd_all, "worker updates"),
            (self.agg_stream, self.agg_all, "regional partial aggregates"),
            (self.metrics_stream, self.metrics_all, "worker metrics"),
            (self.audit_stream, self.audit, "audit records"),
        ]
        return [
            StreamConfig(
                name=name,
                description=f"fedbus job {self.job}: {what}",
                subjects=[subject],
                retention=RetentionPolicy.LIMITS,
                storage=storage_type,
                num_replicas=replicas,
                duplicate_window=duplicate_window,
            )
            for name, subject, what in families
        ]


# A JetStream API call during a meta-leader election times out or gets no
# responders; the same call succeeds a few seconds later.
_TRANSIENT = (
    asyncio.TimeoutError,
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.js.errors.ServiceUnavailableError,
)


async def _with_retry(call: Any, what: str, attempts: int = 10) -> Any:
    delay = 0.2
    for attempt in range(1, attempts + 1):
        try:
            return await call()
        except _TRANSIENT as err:
            if attempt == attempts:
                raise
            log.warning("bus.layout.retry", what=what, attempt=attempt, error=type(err).__name__)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


async def _ensure_stream(js: Any, config: StreamConfig) -> None:
    try:
        await _with_retry(lambda: js.add_stream(config), f"stream {config.name}")
        return
    except nats.js.errors.BadRequestError as err:
        if err.err_code == ERR_STREAM_SUBJECT_OVERLAP:
            raise RuntimeError(
                f"cannot create stream {config.name}: subjects {config.subjects} overlap "
                f"with another stream ({err.description})"
            ) from err
        if err.err_code != ERR_STREAM_NAME_IN_USE:
            raise
    # It exists with another configuration: an operator's tuning (limits, replicas)
    # or a concurrent creator with other options. Fine as long as it captures the
    # same subjects; we never rewrite someone else's stream.
    info = await _with_retry(lambda: js.stream_info(config.name), f"stream info {config.name}")
    if sorted(info.config.subjects or []) != sorted(config.subjects or []):
        raise RuntimeError(
            f"stream {config.name} exists with subjects {info.config.subjects}, "
            f"expected {config.subjects}"
        )
    log.warning("bus.stream.config_differs", stream=config.name)


async def _ensure_bucket(create: Any, bind: Any, what: str) -> None:
    try:
        await _with_retry(create, what)
    except nats.js.errors.BadRequestError as err:
        if err.err_code != ERR_STREAM_NAME_IN_USE:
            raise
        # Exists with other settings (e.g. history): use it as it is.
        await _with_retry(bind, what)
        log.warning("bus.bucket.config_differs", bucket=what)


async def ensure_job_infrastructure(
    js: Any,
    subjects: Subjects,
    *,
    replicas: int = 1,
    storage: str = "file",
    duplicate_window: float = 120.0,
) -> None:
    """Create the job's streams, the jobs KV bucket and the object stores if missing.

    Safe to call from every process at start-up, concurrently and after restarts:
    creating a stream with an identical config is a no-op on the server, and an
    existing stream with a different config is accepted if it has the same subjects.
    """
    for config in subjects.stream_configs(replicas=replicas, storage=storage, duplicate_window=duplicate_window):
        await _ensure_stream(js, config)

    storage_type = StorageType(storage)
    await _ensure_bucket(
        lambda: js.create_key_value(
            KeyValueConfig(bucket=KV_BUCKET, history=KV_HISTORY, storage=storage_type, replicas=replicas)
        ),
        lambda: js.key_value(KV_BUCKET),
        KV_BUCKET,
    )
    for bucket in (MODELS_BUCKET, BLOBS_BUCKET):
        await _ensure_bucket(
            # Default arguments pin `bucket` per iteration for the lambdas.
            lambda bucket=bucket: js.create_object_store(
                bucket, config=ObjectStoreConfig(storage=storage_type, replicas=replicas)
            ),
            lambda bucket=bucket: js.object_store(bucket),
            bucket,
        )
    log.info("bus.layout.ready", job=subjects.job, prefix=subjects.prefix, replicas=replicas, storage=storage)
