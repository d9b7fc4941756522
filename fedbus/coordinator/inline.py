"""Run a machine's heavy work and commits inline: for simulation and tests.

The NATS service runs ``Aggregate`` in a thread and ``Commit`` against JetStream; the
simulator has no storage and a virtual clock, so it settles both at once and keeps the
announcements. Same machine, same transitions.
"""

from __future__ import annotations

from fedbus.coordinator.rounds import (AGGREGATION_ERRORS, AckThrough, Aggregate, AggregationFailed, Aggregated,
                                       Commit, Committed, Deferred)
from fedbus.coordinator.versions import AckUpdates


def settle(machine, actions: list, now_ms: int, *, keep_acks: bool = False) -> list:
    """``actions`` with every Aggregate computed and every Commit acknowledged at once,
    replaced by what the machine announces in return."""
    out = []
    queue = list(actions)
    while queue:
        action = queue.pop(0)
        if isinstance(action, Aggregate):
            try:
                state = action.compute()
            except AGGREGATION_ERRORS as exc:
                queue[:0] = machine.handle(AggregationFailed(action.round, str(exc), now_ms))
                continue
            queue[:0] = machine.handle(Aggregated(action.round, state, now_ms))
        elif isinstance(action, Commit):
            queue[:0] = machine.handle(Committed(action.seq, now_ms))
        elif isinstance(action, (AckThrough, AckUpdates, Deferred)) and not keep_acks:
            continue
        else:
            out.append(action)
    return out


def drive(machine, event) -> list:
    """``machine.handle(event)``, settled (events carry their own time)."""
    return settle(machine, machine.handle(event), getattr(event, "now_ms", 0))
