"""A worker's secure-aggregation rounds (privacy.secure_aggregation), without I/O.

The coordinator's ``secagg.*`` control messages and the worker's own trained delta come
in; the messages to publish on the worker's update subject go out (``Send``). The key
phases run while the round trains (the service hands these messages to this object on
their own task, not behind training); the masked input goes as soon as both the bundle of
shares and the delta are there. Only the run the worker follows counts, and only rounds
whose roster names this worker.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from fedbus.protocol.messages import Body
from fedbus.protocol.runs import run_order
from fedbus.protocol.secagg import SecAggSetup
from fedbus.secagg.errors import SecAggRejection
from fedbus.secagg.exchange import PHASES, SecAggParticipant, Send

KEEP_ROUNDS = 4  # rounds remembered (participants, or deltas that came before their setup)


@dataclass(frozen=True)
class SimulatedDropout:
    """Testing only: where a worker drops out of secure aggregation (``PHASE@ROUND[:silent]``)."""

    phase: str
    round: int
    silent: bool = False  # go quiet for the rest of the round instead of crashing

    @classmethod
    def parse(cls, text: str) -> SimulatedDropout:
        where, _, mode = text.partition(":")
        phase, _, round_ = where.partition("@")
        if phase not in PHASES or not round_.isdigit() or mode not in ("", "silent"):
            raise ValueError(f"{text!r}: expected PHASE@ROUND[:silent], PHASE one of {', '.join(PHASES)}")
        return cls(phase, int(round_), mode == "silent")


class WorkerSecureRounds:
    def __init__(self, me: str, job_id: str):
        self.me = me
        self.job_id = job_id
        self.run: str | None = None
        self.rounds: OrderedDict[int, SecAggParticipant] = OrderedDict()
        self._early: OrderedDict[int, np.ndarray] = OrderedDict()  # deltas whose setup has not come yet

    def _follow(self, run: str | None) -> bool:
        """Adopt ``run`` if it is the newest seen (as the worker core does); False for an older one."""
        if run is None or (self.run is not None and run_order(run) < run_order(self.run)):
            return False
        if run != self.run:
            self.run, self.rounds, self._early = run, OrderedDict(), OrderedDict()
        return True

    @staticmethod
    def _bounded(d: OrderedDict) -> None:
        while len(d) > KEEP_ROUNDS:
            d.popitem(last=False)

    def on_message(self, run: str | None, round_: int, body: Body) -> tuple[list[Send], list[SecAggRejection]]:
        """A verified coordinator message; SecAggAbort / SecAggFailed end this worker's round."""
        if not self._follow(run) or body.group != "":
            return [], []  # another run (the worker follows the newest round.open's), or a region's round
        if isinstance(body, SecAggSetup):
            if round_ in self.rounds or self.me not in body.roster or body.job != self.job_id:
                return [], []
            participant = self.rounds[round_] = SecAggParticipant(self.me, body)
            self._bounded(self.rounds)
            sends = participant.start()
            if round_ in self._early:
                sends += participant.provide(self._early.pop(round_))
            return sends, []
        participant = self.rounds.get(round_)
        if participant is None:
            return [], []
        return participant.on_message(body)

    def provide(self, run: str | None, round_: int, delta: np.ndarray) -> list[Send]:
        """This worker's clipped (noised) delta of ``round_``, flattened."""
        if not self._follow(run):
            return []
        participant = self.rounds.get(round_)
        if participant is None:
            self._early[round_] = delta
            self._bounded(self._early)
            return []
        return participant.provide(delta)
