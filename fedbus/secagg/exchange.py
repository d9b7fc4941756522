"""The message exchange of one SecAgg+ round, shared by ``fedbus secure-sum`` and training rounds.

- ``SecAggParticipant`` (sans-I/O): a worker's side. The server's messages and, once it
  has them, the worker's input values go in; the messages to send come out as ``Send``.
  The input may come after the key phases (a training round runs them while it trains)
  or before them (secure-sum knows its values from the start).
- ``ServerExchange``: the server's phases over any transport. The owner publishes with
  the ``publish`` callback and feeds every verified worker message with ``offer``; the
  exchange drives ``SecAggServer`` phase by phase, each closing when no one is awaited or
  its deadline passed, and returns the machine's ``SecAggResult`` (or raises
  ``SecAggFailed``, after which nothing more is asked of anyone).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np
import structlog
import torch

from fedbus.crypto.envelopes import Rejection
from fedbus.protocol.messages import Body, encode_body
from fedbus.protocol.secagg import (
    SecAggAdvertise,
    SecAggBundle,
    SecAggFailure,
    SecAggInput,
    SecAggKeys,
    SecAggReveal,
    SecAggSetup,
    SecAggShares,
    SecAggUnmask,
)
from fedbus.secagg.client import SecAggClient
from fedbus.secagg.errors import FAILURE_REASONS, SecAggFailed, SecAggRejection
from fedbus.secagg.quantize import wire_dtype
from fedbus.secagg.server import SecAggResult, SecAggServer
from fedbus.secagg.spec import RoundParams, quantizer_of

log = structlog.get_logger(__name__)

PHASES = ("advertise", "shares", "input", "unmask")
# Worker -> server message types, by the phase they answer.
WORKER_TYPES = {SecAggAdvertise.TYPE: "advertise", SecAggShares.TYPE: "shares", SecAggInput.TYPE: "input",
                SecAggReveal.TYPE: "unmask"}


@dataclass(frozen=True)
class Send:
    """A message for the server: ``phase`` names the step it answers (crash simulations key on it)."""

    phase: str
    body: Body
    tensors: dict[str, torch.Tensor] | None = None


class SecAggParticipant:
    """One worker in one round: ``start()``, then ``on_message`` for each server message of the
    round and ``provide(values)`` once; each returns what to send now."""

    def __init__(self, me: str, setup: SecAggSetup):
        self.client = SecAggClient(me, setup)  # SecAggAbort on a roster without me or a wrapping modulus
        self.params = setup
        self.quantizer = quantizer_of(setup)
        self._values: np.ndarray | None = None
        self._sent_input = False
        self.done = False  # answered the unmasking, or left out of it

    def start(self) -> list[Send]:
        return [Send("advertise", self.client.advertise())]

    def provide(self, values: np.ndarray) -> list[Send]:
        if values.shape != (self.params.length,):
            raise ValueError(f"the round sums {self.params.length} values, got shape {values.shape}")
        self._values = values
        return self._input()

    def _input(self) -> list[Send]:
        if self._sent_input or self._values is None or self.client.phase != "input":
            return []
        self._sent_input = True
        masked = self.client.masked_input(self.quantizer.quantize(self._values))
        self._values = None  # the plaintext is not kept past its masking
        return [Send("input", SecAggInput(round=self.params.round, group=self.params.group),
                     {SecAggInput.TENSOR: torch.from_numpy(masked)})]

    def on_message(self, body: Body) -> tuple[list[Send], list[SecAggRejection]]:
        """A verified server message of this round; SecAggFailed when the server announces the
        round's failure, SecAggAbort when answering would be unsafe."""
        if self.done:
            return [], []
        if isinstance(body, SecAggFailure):
            if body.reason in FAILURE_REASONS:
                self.done = True
                raise SecAggFailed(body.reason, f"announced by the server: {body.detail}")
            return [], []
        if isinstance(body, SecAggKeys):
            return [Send("shares", self.client.on_keys(body))], []
        if isinstance(body, SecAggBundle):
            if body.holder != self.client.me:
                return [], []
            rejections = self.client.on_shares(body)
            return self._input(), rejections
        if isinstance(body, SecAggUnmask):
            self.done = True
            if not self._sent_input:
                return [], []  # too late: the server counts us as dropped and asks us nothing
            return [Send("unmask", self.client.on_unmask(body))], []
        return [], []


@dataclass
class ServerExchange:
    """The server's four phases; ``input_deadline`` (monotonic seconds) bounds the masked-input
    phase, ``phase_timeout_s`` the others and ``join_timeout_s`` the first."""

    params: RoundParams
    publish: Callable[[str, Body], Awaitable[None]]  # (ctl subject suffix, body)
    rejected: Callable[[str, str, str | None], None]  # (reason, detail, sender)
    phase_timeout_s: float
    join_timeout_s: float
    input_deadline: float | None = None
    min_survivors: int = 0  # the job's quorum: fewer masked inputs are never unmasked
    machine: SecAggServer = field(init=False)
    phase_seconds: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        self.machine = SecAggServer(self.params)
        self.queue: asyncio.Queue[tuple[str, str, object]] = asyncio.Queue()
        p = self.params
        self.max_input_bytes = len(encode_body(SecAggInput(round=p.round, group=p.group), {
            SecAggInput.TENSOR: torch.from_numpy(np.zeros(p.length, dtype=wire_dtype(p.bits)))}))
        self._handlers = {SecAggAdvertise.TYPE: self.machine.on_advertise,
                          SecAggShares.TYPE: self.machine.on_share_keys,
                          SecAggInput.TYPE: self._on_input,
                          SecAggReveal.TYPE: self.machine.on_unmask}

    def check_header(self, header) -> None:
        """Before a body is fetched: a masked input no larger than the round's length makes it."""
        if header.type == SecAggInput.TYPE and header.length > self.max_input_bytes:
            raise Rejection("oversize", f"masked input of {header.length} bytes, at most {self.max_input_bytes}",
                            header)

    def offer(self, sender: str, msg_type: str, fields: Body, tensors) -> None:
        """A verified worker message of this round (its envelope's round and group checked)."""
        self.queue.put_nowait((sender, msg_type, tensors if msg_type == SecAggInput.TYPE else fields))

    def _on_input(self, sender: str, tensors) -> None:
        masked = (tensors or {}).get(SecAggInput.TENSOR)
        if masked is None or len(tensors) != 1:
            raise SecAggRejection("wrong_length", "expected one tensor named masked", sender)
        self.machine.on_masked_input(sender, masked.numpy())

    async def run(self) -> SecAggResult:
        p, m = self.params, self.machine
        await self.publish("secagg.setup", p)
        log.info("secagg.setup", round=p.round, group=p.group, workers=len(p.roster), degree=p.degree,
                 threshold=p.threshold, bits=p.bits, length=p.length)
        await self._collect("advertise", time.monotonic() + self.join_timeout_s)
        await self.publish("secagg.keys", m.close_advertise())
        await self._collect("shares", time.monotonic() + self.phase_timeout_s)
        for holder, bundle in m.close_share_keys().items():
            await self.publish(f"secagg.bundle.{holder}", bundle)
        await self._collect("input", self.input_deadline or time.monotonic() + self.phase_timeout_s)
        request = m.close_masked_input()
        if len(request.survivors) < self.min_survivors:
            m.phase = "failed"
            raise SecAggFailed("below_quorum", f"{len(request.survivors)} masked inputs, quorum {self.min_survivors}")
        log.info("secagg.unmasking", round=p.round, survivors=len(request.survivors), dropped=request.dropped)
        await self.publish("secagg.unmask", request)
        await self._collect("unmask", time.monotonic() + self.phase_timeout_s)
        result = m.finish()
        for flagged in result.flagged:
            self.rejected(flagged.reason, flagged.detail, flagged.worker)
        return result

    async def fail(self, exc: SecAggFailed) -> None:
        """Tell every worker the round ended without a sum, and why (they stop answering)."""
        log.error("secagg.failed", round=self.params.round, reason=exc.reason, detail=exc.detail[:200],
                  worker=exc.worker)
        await self.publish("secagg.failed", SecAggFailure(round=self.params.round, group=self.params.group,
                                                          reason=exc.reason, detail=exc.detail[:256]))

    async def _collect(self, phase: str, deadline: float) -> None:
        """Feed verified messages to the machine until no one is awaited or the deadline passes."""
        start = time.monotonic()
        while self.machine.awaiting:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.warning("secagg.phase_timeout", phase=phase, missing=sorted(self.machine.awaiting)[:20])
                break
            try:
                sender, msg_type, payload = await asyncio.wait_for(self.queue.get(), remaining)
            except (TimeoutError, asyncio.TimeoutError):
                continue
            try:
                for bad in self._handlers[msg_type](sender, payload) or ():
                    self.rejected(bad.reason, bad.detail, bad.worker)
            except SecAggRejection as rej:
                self.rejected(rej.reason, rej.detail, sender)
        self.phase_seconds[phase] = round(time.monotonic() - start, 4)
