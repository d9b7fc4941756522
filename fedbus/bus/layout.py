"""Subject names, stream names and buckets of one fedbus job, and their idempotent creation."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, replace
from collections.abc import Iterable
from typing import Any

import nats.errors
import nats.js.errors
import structlog
from nats.js.api import (
    DiscardPolicy,
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
# Signed model manifests and tags, per job (fedbus.registry).
REGISTRY_BUCKET = "fedbus-registry"
# Enough past revisions of a job's state to see how it got there after a bad CAS.
KV_HISTORY = 8

# ---- stream limits ----------------------------------------------------------------------
#
# Every job stream has explicit limits chosen for its role, so that no publisher (a
# client with no key flooding junk, or one listed worker in a loop) can grow a stream
# without bound, and so that a flood on one subject cannot push out other subjects'
# messages. M is the largest message a participant publishes inline
# (`max_message_bytes`: the job's inline limit when the caller passes it, else the
# server's max_payload, which no message can exceed anyway); bigger bodies travel as
# claim checks in the Object Store.
#
# | stream  | per subject | max_msgs | max_bytes | max_age | max_msg_size | discard |
# |---------|-------------|----------|-----------|---------|--------------|---------|
# | CTL     | 32          | 10,000   | 64 MiB    | 7 days  | M + 16 KiB   | old     |
# | UPD     | 64          | 1,000,000| 512 MiB   | 1 day   | M + 16 KiB   | old     |
# | AGG     | 64          | 100,000  | 256 MiB   | 1 day   | M + 16 KiB   | old     |
# | METRICS | 64          | 1,000,000| 64 MiB    | 1 day   | 64 KiB       | old     |
# | AUDIT   | (unlimited) | 1,000,000| 256 MiB   | 90 days | 64 KiB       | new     |
#
# All: limits retention, duplicate_window 120 s.
#
# Why:
# - Per-subject caps always evict that subject's *own* oldest messages (nats-server
#   applies max_msgs_per_subject per subject, whatever the stream's discard policy), so
#   one worker's subject (a storm signed with its key, or junk sent on its subject) holds
#   at most cap x M bytes and never displaces another worker's update. 64 is many rounds
#   of one worker's updates; the coordinator acks them long before.
# - `discard_new_per_subject` is deliberately NOT used: with limits retention acked
#   updates stay in the stream, so refusing new messages on a full subject would lock an
#   honest worker out after 64 rounds, and junk on its subject would lock it out at once.
# - Stream-wide discard OLD on CTL/UPD/AGG/METRICS: a flood spread over many subjects
#   (random worker ids) that fills the stream evicts the oldest messages, which the
#   consumers have long read, instead of refusing every honest publish (discard NEW would
#   turn a full stream into a denial of service for all workers). The sizes are large
#   enough that filling them takes far longer than a round.
# - CTL keeps only the last 32 events per kind: workers read the last one per subject
#   (DeliverPolicy.LAST_PER_SUBJECT); the cap bounds a long job whose round.open carries
#   the model inline. 7 days: late or restarted participants still see `job.done`.
# - UPD/AGG max_age 1 day: how long a coordinator may be down and still find held updates
#   (freshness on redelivery is judged by the stream's timestamp, so they are accepted).
# - max_msg_size: the stream refuses anything bigger than an inline message plus
#   envelope/NATS header room, so junk cannot be larger than honest traffic. Eval reports
#   and audit records are small JSON/msgpack maps: 64 KiB.
# - AUDIT discards NEW: evicting old records would silently cut the hash chain; refusing a
#   record when full is loud (the writer logs `audit.publish_failed`). Rejections are
#   audited in aggregate, so 256 MiB (~800k records) outlasts a healthy job; 90 days.
# - The byte limits are reserved by the server against its max_file_store (~1.1 GiB
#   per job in total), so a 20 GB store (deploy/nats/single.conf) holds ~17 live jobs.
# - duplicate_window 120 s covers `publish_with_retry`'s retries across a leader
#   election; it costs the server one id per message for 2 minutes, which bounded junk
#   (published without ids) does not use at all.
# These limits are not a substitute for NATS permissions (deploy/nats): a client allowed
# to publish on a worker's subject can still evict that worker's unread messages.

MiB = 1024 * 1024
DAY_S = 24 * 3600.0
# The inline limit assumed when a caller does not pass one: the server's default max_payload.
DEFAULT_MAX_MESSAGE_BYTES = 1 * MiB
# Envelope header, signature, blob pointer and NATS headers (msg id, type, traceparent).
HEADER_ROOM_BYTES = 16 * 1024
SMALL_MESSAGE_BYTES = 64 * 1024
DUPLICATE_WINDOW_S = 120.0


@dataclass(frozen=True)
class StreamLimits:
    """The limits of one stream (see the table above); -1 means none."""

    max_msgs_per_subject: int
    max_msgs: int
    max_bytes: int
    max_age_s: float
    max_msg_size: int
    discard: DiscardPolicy


# The families whose max_age / max_bytes a job's retention settings may lower (see
# fedbus.registry.retention.stream_retention). CTL holds the job's key events (ctl.keys),
# which every process replays from the start, and AUDIT a hash chain: neither is cut by a job.
JOB_LIMITED_FAMILIES = ("UPD", "AGG", "METRICS")


def stream_limits(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, *, max_age_s: float | None = None,
                  max_bytes: int | None = None) -> dict[str, StreamLimits]:
    """Limits per stream family ("CTL", "UPD", "AGG", "METRICS", "AUDIT"); ``max_age_s`` and
    ``max_bytes`` (from the job's retention settings) replace those of JOB_LIMITED_FAMILIES."""
    if max_message_bytes <= 0:
        raise ValueError(f"max_message_bytes must be positive, got {max_message_bytes}")
    big = max_message_bytes + HEADER_ROOM_BYTES
    old, new = DiscardPolicy.OLD, DiscardPolicy.NEW
    table = {
        "CTL": StreamLimits(32, 10_000, 64 * MiB, 7 * DAY_S, big, old),
        "UPD": StreamLimits(64, 1_000_000, 512 * MiB, DAY_S, big, old),
        "AGG": StreamLimits(64, 100_000, 256 * MiB, DAY_S, big, old),
        "METRICS": StreamLimits(64, 1_000_000, 64 * MiB, DAY_S, SMALL_MESSAGE_BYTES, old),
        "AUDIT": StreamLimits(-1, 1_000_000, 256 * MiB, 90 * DAY_S, SMALL_MESSAGE_BYTES, new),
    }
    for family in JOB_LIMITED_FAMILIES:
        if max_age_s is not None:
            table[family] = replace(table[family], max_age_s=float(max_age_s))
        if max_bytes is not None:
            table[family] = replace(table[family], max_bytes=int(max_bytes))
    return table


# JetStream API error codes (nats-server's errors.json).
ERR_STREAM_NAME_IN_USE = 10058  # exists with a different configuration
ERR_STREAM_SUBJECT_OVERLAP = 10065
ERR_INSUFFICIENT_RESOURCES = 10047  # max_bytes cannot be reserved against the server's store


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

    def upd_listed(self, members: Iterable[tuple[str, str]]) -> list[str]:
        """The update subjects of exactly these (region, worker) pairs.

        As a consumer's `filter_subjects` (nats-server >= 2.10), the server never
        delivers what was published on any other worker's subject: junk under random
        worker ids costs the consumer nothing, and honest updates do not queue behind it.
        Create the consumer with `js.add_consumer(stream, ConsumerConfig(filter_subjects=
        ...))` and bind with `js.pull_subscribe_bind(durable, stream)`: `pull_subscribe`
        would add its own `filter_subject`, which the server refuses next to
        `filter_subjects`.
        """
        return sorted({self.upd(region, worker) for region, worker in members})

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

    # audit records: each writer (coordinator, aggregator, worker) keeps its own chain
    def audit_of(self, writer: str) -> str:
        return f"{self._base}.audit.{_check_token(writer, 'writer id')}"

    @property
    def audit_all(self) -> str:
        return f"{self._base}.audit.>"

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

    def region_upd_stream(self, region: str) -> str:
        """topology: regional: the stream of one region's updates (in that region's JetStream
        domain when the region runs its own leaf node)."""
        return self._stream(f"UPD_{_check_token(region, 'region')}")

    @property
    def metrics_stream(self) -> str:
        return self._stream("METRICS")

    @property
    def audit_stream(self) -> str:
        return self._stream("AUDIT")

    def stream_configs(
        self,
        *,
        replicas: int = 1,
        storage: str = "file",
        duplicate_window: float = DUPLICATE_WINDOW_S,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        regional: bool = False,
        region: str | None = None,
        max_age_s: float | None = None,
        max_bytes: int | None = None,
    ) -> list[StreamConfig]:
        """The job's streams, with the limits of `stream_limits`. All use limits
        retention: several readers (coordinator, aggregators, a restarted coordinator,
        an auditor) replay the same messages.

        ``regional``: no stream over every update subject (updates stay in their region's
        stream: two streams capturing one subject, even in different JetStream domains,
        would store each update twice and carry it across the leaf link). ``region``: only
        that region's update stream."""
        storage_type = StorageType(storage)
        limits = stream_limits(max_message_bytes, max_age_s=max_age_s, max_bytes=max_bytes)
        if region is not None:
            families = [("UPD", self.region_upd_stream(region), self.upd_region(region), f"updates of region {region}")]
        else:
            families = [
                ("CTL", self.ctl_stream, self.ctl_all, "control events"),
                *([] if regional else [("UPD", self.upd_stream, self.upd_all, "worker updates")]),
                ("AGG", self.agg_stream, self.agg_all, "regional partial aggregates"),
                ("METRICS", self.metrics_stream, self.metrics_all, "worker metrics"),
                ("AUDIT", self.audit_stream, self.audit_all, "audit records"),
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
                max_msgs_per_subject=limits[family].max_msgs_per_subject,
                max_msgs=limits[family].max_msgs,
                max_bytes=limits[family].max_bytes,
                max_age=limits[family].max_age_s,
                max_msg_size=limits[family].max_msg_size,
                discard=limits[family].discard,
            )
            for family, name, subject, what in families
        ]


# The fields ensure_job_infrastructure owns on an existing stream; everything else
# (placement, replicas, an operator's metadata) is left as the operator set it.
MANAGED_FIELDS = ("description", "max_msgs_per_subject", "max_msgs", "max_bytes", "max_age", "max_msg_size",
                  "discard", "duplicate_window")


def _same(field: str, ours: Any, theirs: Any) -> bool:
    if field in ("max_age", "duplicate_window"):  # seconds <-> nanoseconds round trip
        return abs(float(ours or 0) - float(theirs or 0)) < 1e-3
    return ours == theirs


def config_drift(existing: StreamConfig, wanted: StreamConfig) -> dict[str, tuple[Any, Any]]:
    """Managed fields whose existing value differs from the wanted one: {field: (has, wants)}."""
    return {
        f: (getattr(existing, f), getattr(wanted, f))
        for f in MANAGED_FIELDS
        if not _same(f, getattr(wanted, f), getattr(existing, f))
    }


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
    except nats.js.errors.APIError as err:
        if err.err_code == ERR_INSUFFICIENT_RESOURCES:
            raise RuntimeError(
                f"cannot create stream {config.name}: the server cannot reserve its max_bytes "
                f"({config.max_bytes} bytes) in its JetStream store ({err.description}). Each job's "
                "streams reserve ~1.1 GiB (fedbus/bus/layout.py); raise max_file_store or delete "
                "the streams of finished jobs."
            ) from err
        if not isinstance(err, nats.js.errors.BadRequestError):
            raise
        if err.err_code == ERR_STREAM_SUBJECT_OVERLAP:
            raise RuntimeError(
                f"cannot create stream {config.name}: subjects {config.subjects} overlap "
                f"with another stream ({err.description})"
            ) from err
        if err.err_code != ERR_STREAM_NAME_IN_USE:
            raise
    # It exists with another configuration: created by an older fedbus without limits,
    # tuned by an operator, or by a participant with other options. It must capture the
    # same subjects; its limits are brought to ours (the limits follow from the job spec,
    # so every participant of a job wants the same ones and this converges).
    info = await _with_retry(lambda: js.stream_info(config.name), f"stream info {config.name}")
    if sorted(info.config.subjects or []) != sorted(config.subjects or []):
        raise RuntimeError(
            f"stream {config.name} exists with subjects {info.config.subjects}, "
            f"expected {config.subjects}"
        )
    drift = config_drift(info.config, config)
    if not drift:
        return  # e.g. only replicas or placement differ: the operator's call
    updated = replace(info.config, **{f: getattr(config, f) for f in MANAGED_FIELDS})
    try:
        await _with_retry(lambda: js.update_stream(updated), f"update stream {config.name}")
    except nats.js.errors.BadRequestError as err:
        # A change the server refuses (e.g. one a newer server would allow): keep the
        # stream as it is, loudly, rather than refuse to run the job.
        log.warning("bus.stream.update_refused", stream=config.name, error=err.description,
                    fields=sorted(drift))
        return
    log.info("bus.stream.updated", stream=config.name,
             changes={f: [str(a), str(b)] for f, (a, b) in drift.items()})


def _server_max_payload(js: Any) -> int:
    # nats-py keeps the connection on the JetStream context; the server announced its
    # max_payload on connect.
    payload = getattr(getattr(js, "_nc", None), "max_payload", None)
    return int(payload) if isinstance(payload, int) and payload > 0 else DEFAULT_MAX_MESSAGE_BYTES


async def _ensure_bucket(create: Any, bind: Any, what: str) -> None:
    try:
        await _with_retry(create, what)
    except nats.js.errors.BadRequestError as err:
        if err.err_code != ERR_STREAM_NAME_IN_USE:
            raise
        # Exists with other settings (e.g. history): use it as it is.
        await _with_retry(bind, what)
        log.warning("bus.bucket.config_differs", bucket=what)


# How long a worker or aggregator waits for the streams others create (the coordinator the
# job's, an aggregator its region's): sites may start well before the analyst does.
JOB_STREAMS_WAIT_S = 600.0
_WAIT_POLL_S = (0.25, 1.0)  # first and longest pause between two looks


async def wait_for_stream(js: Any, name: str, timeout_s: float) -> None:
    """Wait (bounded) until ``name`` exists in ``js``'s domain. Only the coordinator creates
    the job's streams (and an aggregator its region's): a worker may not on a secured
    server, and a participant on a leaf node would create them in the wrong domain."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout_s
    pause, logged = _WAIT_POLL_S[0], False
    while True:
        try:
            await js.stream_info(name)
            return
        except Exception as exc:
            if loop.time() > give_up:
                raise TimeoutError(f"stream {name} did not appear within {timeout_s:.0f} s: {exc!r}") from None
            if not logged:
                log.info("bus.stream.waiting", stream=name, timeout_s=timeout_s, error=type(exc).__name__)
                logged = True
            await asyncio.sleep(pause)
            pause = min(pause * 1.5, _WAIT_POLL_S[1])


async def purge_stream_except(js: Any, stream: str, *, keep: str) -> None:
    """Purge every subject of ``stream`` but ``keep`` (a subject, not a wildcard)."""
    info = await _with_retry(lambda: js.stream_info(stream, subjects_filter=">"), f"stream info {stream}")
    for subject in sorted((info.state.subjects or {}).keys()):
        if subject != keep:
            await _with_retry(lambda subject=subject: js.purge_stream(stream, subject=subject), f"purge {subject}")


async def ensure_region_updates(js: Any, subjects: Subjects, region: str, *, replicas: int = 1,
                                storage: str = "file", max_message_bytes: int | None = None,
                                max_age_s: float | None = None, max_bytes: int | None = None) -> str:
    """Create one region's update stream in ``js``'s JetStream domain (its leaf node's, or
    the only one); returns its name."""
    if max_message_bytes is None:
        max_message_bytes = _server_max_payload(js)
    (config,) = subjects.stream_configs(replicas=replicas, storage=storage, max_message_bytes=max_message_bytes,
                                        region=region, max_age_s=max_age_s, max_bytes=max_bytes)
    await _ensure_stream(js, config)
    return config.name


async def ensure_job_infrastructure(
    js: Any,
    subjects: Subjects,
    *,
    replicas: int = 1,
    storage: str = "file",
    duplicate_window: float = DUPLICATE_WINDOW_S,
    max_message_bytes: int | None = None,
    regional: bool = False,
    max_age_s: float | None = None,
    max_bytes: int | None = None,
) -> None:
    """Create the job's streams, the jobs KV bucket and the object stores if missing
    (``regional``: without the all-updates stream, see ``Subjects.stream_configs``).

    `max_message_bytes` is the largest message published inline (the job's
    `transport.inline_max_bytes`); it sets the streams' max_msg_size, so every
    participant of a job should pass the same value. Without it, the server's
    max_payload is used: nothing larger can be published anyway, so callers that do not
    know the job's limit never have their messages refused.

    Safe to call from every process at start-up, concurrently and after restarts:
    creating a stream with an identical config is a no-op on the server, and an
    existing stream with the same subjects but other limits is updated to these.
    """
    if max_message_bytes is None:
        max_message_bytes = _server_max_payload(js)
    configs = subjects.stream_configs(replicas=replicas, storage=storage, duplicate_window=duplicate_window,
                                      max_message_bytes=max_message_bytes, regional=regional,
                                      max_age_s=max_age_s, max_bytes=max_bytes)
    for config in configs:
        await _ensure_stream(js, config)

    storage_type = StorageType(storage)
    await _ensure_bucket(
        lambda: js.create_key_value(
            KeyValueConfig(bucket=KV_BUCKET, history=KV_HISTORY, storage=storage_type, replicas=replicas)
        ),
        lambda: js.key_value(KV_BUCKET),
        KV_BUCKET,
    )
    await _ensure_bucket(
        lambda: js.create_key_value(
            KeyValueConfig(bucket=REGISTRY_BUCKET, history=1, storage=storage_type, replicas=replicas)
        ),
        lambda: js.key_value(REGISTRY_BUCKET),
        REGISTRY_BUCKET,
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
