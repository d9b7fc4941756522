"""The coordinator's half of secure aggregation in training rounds (privacy.secure_aggregation).

For each round the machine opens, ``SecureRounds.open`` runs one SecAgg+ server exchange
for the round's cohort (``fedbus.secagg.exchange.ServerExchange``) and feeds the machine
its outcome: ``SecureSumReceived`` (the survivors' unmasked Σ Δ_i as a partial aggregate)
or ``SecureAggregationFailed`` (by name; nothing was revealed). The service routes the
workers' ``secagg.*`` messages, verified like any update, to ``check_header``/``offer``.
What is summed and why each worker weighs 1: ``fedbus.secagg.rounds``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable

import structlog

from fedbus.coordinator.rounds import OpenRound, SecureAggregationFailed, SecureSumReceived
from fedbus.crypto.envelopes import Rejection, now_ms
from fedbus.jobspec import JobSpec
from fedbus.secagg.errors import SecAggFailed
from fedbus.secagg.exchange import WORKER_TYPES, ServerExchange
from fedbus.secagg.rounds import secure_sum_partial, training_round_params, unmask_grace_ms
from fedbus.secagg.spec import quantizer_of

log = structlog.get_logger("fedbus.coordinator")


class SecureRounds:
    def __init__(self, job: JobSpec, rule, quorum: Callable[[int], int],
                 publish: Callable[[str, object, int], Awaitable[None]],
                 rejected: Callable[[str, str, str | None, int], None], feed: Callable[[object], object]):
        self.job = job
        self.spec = job.privacy.secure_aggregation
        self.rule = rule
        self.quorum = quorum
        self._publish = publish  # (ctl subject suffix, body, round)
        self._rejected = rejected  # (reason, detail, sender, round)
        self._feed = feed
        self.exchange: ServerExchange | None = None
        self._task: asyncio.Task | None = None
        self.rounds: list[dict] = []  # per round: phases, survivors, dropped (summary.json)

    def accepts(self, header) -> bool:
        """A worker's secagg message: for the round being aggregated, and within its size."""
        if self.exchange is None or header.round != self.exchange.params.round:
            return False
        self.exchange.check_header(header)
        return True

    def offer(self, got) -> None:
        if got.header.type not in WORKER_TYPES:
            raise Rejection("unknown_type", f"{got.header.type} in a secure-aggregation round", got.header)
        if self.exchange is not None:
            self.exchange.offer(got.header.sender, got.header.type, got.fields, got.tensors)

    def open(self, a: OpenRound) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()  # a round reopened (resume) supersedes the exchange of the old one
        self._task = asyncio.create_task(self._run(a))

    async def close(self) -> None:
        """Stop an exchange still running (the job ended under it); nothing more is sent."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self, a: OpenRound) -> None:
        row = {"round": a.round, "cohort": len(a.cohort)}
        try:
            params = training_round_params(self.job, round=a.round, cohort=list(a.cohort), seed=os.urandom(32),
                                           base=a.state)
        except ValueError as exc:  # e.g. a cohort smaller than a secure sum allows
            log.error("secagg.setup_failed", round=a.round, error=str(exc)[:200])
            self._feed(SecureAggregationFailed(a.round, "setup_failed", str(exc)[:200], now_ms()))
            return
        input_s = (a.deadline_ms - unmask_grace_ms(self.job) - now_ms()) / 1000.0
        self.exchange = exchange = ServerExchange(
            params, lambda suffix, body: self._publish(suffix, body, a.round),
            lambda reason, detail, sender: self._rejected(reason, detail, sender, a.round),
            phase_timeout_s=self.spec.phase_timeout_s, join_timeout_s=self.spec.phase_timeout_s,
            input_deadline=time.monotonic() + max(input_s, 0.0), min_survivors=self.quorum(len(a.cohort)))
        row |= {"degree": params.degree, "threshold": params.threshold, "bits": params.bits,
                "length": params.length, "sum_error_bound": quantizer_of(params).sum_error_bound}
        try:
            result = await exchange.run()
        except SecAggFailed as exc:
            await exchange.fail(exc)
            self.rounds.append(row | {"status": "failed", "reason": exc.reason,
                                      "phase_seconds": exchange.phase_seconds})
            self._feed(SecureAggregationFailed(a.round, exc.reason, exc.detail[:200], now_ms()))
            return
        finally:
            self.exchange = None
        total = quantizer_of(params).dequantize_sum(result.total)
        partial = await asyncio.to_thread(secure_sum_partial, self.rule, a.state, a.model_version, total,
                                          result.survivors)
        self.rounds.append(row | {"status": "aggregated", "survivors": result.survivors, "dropped": result.dropped,
                                  "phase_seconds": exchange.phase_seconds})
        log.info("secagg.summed", round=a.round, survivors=len(result.survivors), dropped=result.dropped,
                 phase_seconds=exchange.phase_seconds)
        self._feed(SecureSumReceived(a.round, partial, tuple(result.survivors), now_ms()))
