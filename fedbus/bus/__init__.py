"""NATS bus layer: embedded server, connections, subject layout, claim-check blobs."""

from .blobs import BlobIntegrityError, BlobNotFound, BlobRef, BlobStore
from .connection import connect, publish_with_retry
from .credentials import NO_CREDENTIALS, NatsCredentials, inbox_prefix
from .layout import (
    BLOBS_BUCKET,
    JOB_ID_PATTERN,
    JOB_STREAMS_WAIT_S,
    KV_BUCKET,
    MODELS_BUCKET,
    StreamLimits,
    Subjects,
    ensure_job_infrastructure,
    ensure_region_updates,
    wait_for_stream,
    stream_limits,
)
from .server import (
    EmbeddedNatsServer,
    NatsServerError,
    NatsServerNotFound,
    find_nats_server_binary,
    free_port,
    run_foreground,
)

__all__ = [
    "BLOBS_BUCKET",
    "JOB_ID_PATTERN",
    "JOB_STREAMS_WAIT_S",
    "KV_BUCKET",
    "MODELS_BUCKET",
    "NO_CREDENTIALS",
    "NatsCredentials",
    "inbox_prefix",
    "BlobIntegrityError",
    "BlobNotFound",
    "BlobRef",
    "BlobStore",
    "EmbeddedNatsServer",
    "NatsServerError",
    "NatsServerNotFound",
    "StreamLimits",
    "Subjects",
    "connect",
    "ensure_job_infrastructure",
    "ensure_region_updates",
    "wait_for_stream",
    "find_nats_server_binary",
    "free_port",
    "publish_with_retry",
    "run_foreground",
    "stream_limits",
]
