"""Connect to NATS the way every fedbus process should, and publish to JetStream safely."""

from __future__ import annotations

import asyncio
import random
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client
from nats.js.api import PubAck

from .credentials import NatsCredentials, inbox_prefix

log = structlog.get_logger(__name__)

# Participants come and go and servers restart (leader elections, rolling upgrades):
# a client that gives up reconnecting turns a blip into a dead worker.
RECONNECT_TIME_WAIT = 0.5
# nats-py buffers outgoing data up to this size before a flush and while
# reconnecting; the 2 MiB default is too tight for 1 MiB object-store chunks
# queued back to back and raises OutboundBufferLimitError.
PENDING_SIZE = 16 * 1024 * 1024
# Detect a dead TCP peer in ~1 min rather than the default ~4 min.
PING_INTERVAL = 20
MAX_OUTSTANDING_PINGS = 3

MSG_ID_HEADER = "Nats-Msg-Id"

# Errors after which the same publish can succeed: the request timed out, nobody
# answered (stream leader being elected), JetStream said "try later" (503), or the
# client buffer is full during a reconnect.
RETRYABLE_PUBLISH_ERRORS: tuple[type[BaseException], ...] = (
    asyncio.TimeoutError,
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError,
)

_Callback = Callable[[], Awaitable[None]]


def _server(nc: Client) -> str | None:
    return nc.connected_url.netloc if nc.connected_url else None


def _chain(ours: _Callback, theirs: _Callback | None) -> _Callback:
    if theirs is None:
        return ours

    async def both() -> None:
        await ours()
        await theirs()

    return both


async def connect(
    servers: str | list[str],
    name: str,
    *,
    first_connect_timeout: float | None = None,
    credentials: NatsCredentials | None = None,
    participant: str | None = None,
    **overrides: Any,
) -> Client:
    """Connect with fedbus defaults: reconnect forever, log every state change.

    `servers` is one URL, a comma-separated list of URLs (the nodes of a cluster), or
    a list of URLs.

    `overrides` go straight to `nats.connect` and win over the defaults, except the
    four lifecycle callbacks: a caller's callback runs after the logging one, so the
    structured events are never lost.

    With `max_reconnect_attempts=-1` nats-py also retries the *first* connection
    forever. `first_connect_timeout` bounds that (raises TimeoutError); None waits,
    which is what a worker started before its server wants.

    `credentials`: TLS CA, client certificate, nkey seed or .creds file (paths; see
    `NatsCredentials`). Only which mechanisms and files are logged, never their contents.
    `participant`: the federation id this connection acts for; its replies then arrive
    under `inbox_prefix(participant)`, the only inbox a secured server lets it read.
    """
    nc = Client()
    # "nats://a:4222,nats://b:4222" (what one --nats flag or FEDBUS_NATS_URL can carry)
    # is a list of cluster nodes: a client that knows them all fails over between them.
    server_list = ([s.strip() for s in servers.split(",") if s.strip()] if isinstance(servers, str)
                   else list(servers))
    if not server_list:
        raise ValueError("no NATS server URL given")
    bound = log.bind(client=name)
    user_error_cb = overrides.pop("error_cb", None)

    async def on_error(err: Exception) -> None:
        # Slow consumers and permission violations only surface here.
        bound.warning("nats.error", error=repr(err), error_type=type(err).__name__, server=_server(nc))
        if user_error_cb is not None:
            await user_error_cb(err)

    async def on_disconnected() -> None:
        # nats-py also calls this on a deliberate close(); only a lost link is a warning.
        emit = bound.info if nc.is_closed else bound.warning
        last_error = repr(nc.last_error) if nc.last_error else None
        emit("nats.disconnected", last_error=last_error, closing=nc.is_closed)

    async def on_reconnected() -> None:
        bound.info("nats.reconnected", server=_server(nc))

    async def on_closed() -> None:
        bound.info("nats.closed")

    options: dict[str, Any] = {
        "servers": server_list,
        "name": name,
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": RECONNECT_TIME_WAIT,
        "pending_size": PENDING_SIZE,
        "ping_interval": PING_INTERVAL,
        "max_outstanding_pings": MAX_OUTSTANDING_PINGS,
    }
    if credentials is not None:
        options.update(credentials.connect_options())
    if participant is not None:
        options["inbox_prefix"] = inbox_prefix(participant)
    options.update(overrides)
    options["error_cb"] = on_error
    options["disconnected_cb"] = _chain(on_disconnected, overrides.get("disconnected_cb"))
    options["reconnected_cb"] = _chain(on_reconnected, overrides.get("reconnected_cb"))
    options["closed_cb"] = _chain(on_closed, overrides.get("closed_cb"))

    try:
        await asyncio.wait_for(nc.connect(**options), first_connect_timeout)
    except asyncio.TimeoutError:
        await nc.close()
        raise TimeoutError(f"could not connect to {server_list} within {first_connect_timeout}s") from None
    bound.info("nats.connected", server=_server(nc), max_payload=nc.max_payload,
               auth=credentials.describe() if credentials is not None else {})
    return nc


def new_msg_id() -> str:
    return secrets.token_hex(16)


async def publish_with_retry(
    js: Any,
    subject: str,
    payload: bytes,
    *,
    headers: dict[str, str] | None = None,
    msg_id: str | None = None,
    attempts: int = 20,
    timeout: float = 5.0,
    backoff: float = 0.1,
    max_backoff: float = 2.0,
) -> PubAck:
    """JetStream publish, retried with the same Nats-Msg-Id until acknowledged.

    A stream leader election stops writes for seconds, and an ack can be lost even
    though the message was stored; the fixed msg id lets the server drop the
    duplicate (within its duplicate_window), so retrying is safe. Without a msg_id
    one is generated, for the same reason. Non-retryable errors (bad subject, wrong
    stream, permissions) raise immediately; the last retryable error is re-raised
    after `attempts`.
    """
    if attempts < 1:
        raise ValueError("attempts must be >= 1")
    hdrs = dict(headers or {})
    # Callers' header dicts may spell it differently; the server matches exactly.
    for key in [k for k in hdrs if k.lower() == MSG_ID_HEADER.lower()]:
        found = hdrs.pop(key)
        msg_id = msg_id or found
    hdrs[MSG_ID_HEADER] = msg_id or new_msg_id()

    bound = log.bind(subject=subject, msg_id=hdrs[MSG_ID_HEADER])
    delay = backoff
    for attempt in range(1, attempts + 1):
        try:
            ack = await js.publish(subject, payload, timeout=timeout, headers=hdrs)
        except RETRYABLE_PUBLISH_ERRORS as err:
            if attempt == attempts:
                bound.error("nats.publish.gave_up", attempts=attempts, error=repr(err))
                raise
            bound.warning("nats.publish.retry", attempt=attempt, error=type(err).__name__)
            # Jitter keeps many workers from hammering a freshly elected leader in step.
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, max_backoff)
            continue
        if attempt > 1:
            bound.info("nats.publish.recovered", attempt=attempt, duplicate=ack.duplicate)
        return ack
    raise AssertionError("unreachable")
