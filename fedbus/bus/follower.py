"""ControlFollower: follow a subject of the control stream, and pick up at once after a reconnect."""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from nats.js.api import ConsumerConfig, DeliverPolicy

log = structlog.get_logger("fedbus.control")

# Idle heartbeat of the control consumer: a consumer lost without a reconnect (the
# server dropped it) is noticed by nats-py after two missed heartbeats.
CONTROL_IDLE_HEARTBEAT_S = 2.0
# How long to keep trying to recreate the control consumer after a reconnect (JetStream
# may still be recovering its streams when the connection is back).
RESUBSCRIBE_RETRY_S = 0.25
RESUBSCRIBE_GIVE_UP_S = 120.0


class ControlFollower:
    """Follows ``ctl.>`` with an ordered push consumer, and recreates it at once after a reconnect.

    nats-py's ordered consumer notices a lost consumer (a restarted nats-server keeps no
    in-memory ephemeral consumers) only after two missed idle heartbeats, checked on a
    fixed ``2 x idle_heartbeat`` timer: with the default 5 s heartbeat that is 10-20 s
    after the restart, and the worker sees the next round.open that late. Here the
    reconnect itself triggers a new consumer starting after the last stream sequence
    delivered, so nothing is skipped and nothing waits for a timer.
    """

    def __init__(self, js, subject: str, deliver, *, stream: str | None = None, from_start: bool = False,
                 skip: frozenset[str] = frozenset()):
        self.js = js
        self.subject = subject
        # Naming the stream spares a lookup by subject (STREAM.NAMES), an API a secured
        # server need not grant.
        self.stream = stream
        self.deliver = deliver  # async callable(msg)
        # from_start: every message on the subject (key events: each one counts), not only
        # the last one per subject (control events: only the latest round.open matters).
        self.from_start = from_start
        self.skip = skip  # subjects under ``subject`` that someone else follows (ctl.keys)
        self.last_seq: int | None = None
        self.sub = None
        self.resubscribes = 0
        self._task: asyncio.Task | None = None

    async def _on_msg(self, msg) -> None:
        with contextlib.suppress(Exception):
            seq = msg.metadata.sequence.stream
            if self.last_seq is not None and seq <= self.last_seq:
                return  # already delivered by the consumer this one replaced
            self.last_seq = seq
        if msg.subject in self.skip:
            return
        await self.deliver(msg)

    async def _subscribe(self):
        if self.last_seq is None:
            kwargs = {"deliver_policy": DeliverPolicy.ALL if self.from_start else DeliverPolicy.LAST_PER_SUBJECT}
        else:
            kwargs = {"config": ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                                               opt_start_seq=self.last_seq + 1)}
        return await self.js.subscribe(self.subject, stream=self.stream, ordered_consumer=True,
                                       idle_heartbeat=CONTROL_IDLE_HEARTBEAT_S, cb=self._on_msg, **kwargs)

    async def start(self) -> None:
        self.sub = await self._subscribe()

    def on_reconnected(self) -> None:
        """Called from the connection's reconnected callback: replace the consumer in the background."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._task = asyncio.create_task(self._resubscribe())

    async def _resubscribe(self) -> None:
        old, self.sub = self.sub, None
        if old is not None:
            with contextlib.suppress(Exception):
                await old.unsubscribe()
        loop = asyncio.get_running_loop()
        give_up = loop.time() + RESUBSCRIBE_GIVE_UP_S
        while True:
            try:
                self.sub = await self._subscribe()
                self.resubscribes += 1
                log.info("control.resubscribed", after_seq=self.last_seq)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # JetStream not ready yet, or the link dropped again
                if loop.time() > give_up:
                    log.error("control.resubscribe_failed", error=repr(exc))
                    return
                log.debug("control.resubscribe_retry", error=repr(exc))
                await asyncio.sleep(RESUBSCRIBE_RETRY_S)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        if self.sub is not None:
            with contextlib.suppress(Exception):
                await self.sub.unsubscribe()
