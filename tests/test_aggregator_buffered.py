"""AsyncAggregatorCore: per-base-version partials, flush size, duplicates, acks after publish."""

from __future__ import annotations

import torch

from fedbus.aggregation.base import ClientUpdate
from fedbus.aggregation.fedavg import FedAvg
from fedbus.aggregator.buffered import AckKeys, AsyncAggregatorCore
from fedbus.aggregator.core import PartialPublished, PublishPartial, RoundOpened
from fedbus.coordinator.rounds import DuplicateIgnored, RejectUpdate, RoundPolicy, Tick, UpdateReceived

RUN = "r1700000000000-aaaaaaaa"


def model(x: float) -> dict:
    return {"w": torch.tensor([x, 2 * x], dtype=torch.float32)}


def core(buffer_size=3) -> AsyncAggregatorCore:
    return AsyncAggregatorCore("eu", ["a", "b", "c"], RoundPolicy(rounds=5), FedAvg(), model(0.0),
                               buffer_size=buffer_size, max_staleness=2, flush_after_ms=1000)


def assign(c, ticket, version, workers, state):
    return c.handle(RoundOpened(RUN, ticket, version, tuple(workers), 10_000, state, 1, None, (100,) * len(workers)))


def update(c, worker, ticket, version, y, now=10, digest=None):
    return c.handle(UpdateReceived(worker, ticket, ClientUpdate(worker, 10, model(y)), now,
                                   digest=digest or f"{worker}{ticket}".encode(), base_version=version,
                                   proof=b"proof-" + worker.encode()))


def test_one_partial_per_base_version_every_buffer_size_updates_and_acks_after_all_are_published():
    c = core(buffer_size=3)
    assign(c, 1, 0, ["a", "b"], model(0.0))
    assign(c, 2, 1, ["c"], model(1.0))
    assert update(c, "a", 1, 0, 2.0) == [] and update(c, "b", 1, 0, 4.0) == []
    out = update(c, "c", 2, 1, 3.0)  # the third: flush
    partials = [a for a in out if isinstance(a, PublishPartial)]
    assert sorted(p.partial.base_version for p in partials) == [0, 1]
    v0 = next(p for p in partials if p.partial.base_version == 0)
    assert [x[0] for x in v0.contributors] == ["a", "b"] and v0.partial.total_weight == 20.0
    # sums of w·Δ against each update's own base: 10·2 + 10·4 = 60 (first coordinate)
    assert torch.allclose(v0.partial.sums["w"], torch.tensor([60.0, 120.0], dtype=torch.float64))
    v1 = next(p for p in partials if p.partial.base_version == 1)
    assert torch.allclose(v1.partial.sums["w"], torch.tensor([20.0, 40.0], dtype=torch.float64))  # 10·(3−1)
    assert all(p.round == partials[0].round for p in partials)  # one flush
    assert c.handle(PartialPublished(RUN, partials[0].round, 20)) == []  # one of two published: no ack yet
    (ack,) = c.handle(PartialPublished(RUN, partials[0].round, 21))
    assert isinstance(ack, AckKeys) and sorted(ack.keys) == [(1, "a"), (1, "b"), (2, "c")]


def test_a_lone_update_is_forwarded_after_the_flush_delay():
    c = core(buffer_size=5)
    assign(c, 1, 0, ["a"], model(0.0))
    assert update(c, "a", 1, 0, 2.0, now=10) == []
    assert c.handle(Tick(500)) == []
    out = c.handle(Tick(1011))
    assert [type(a) for a in out] == [PublishPartial]


def test_unassigned_wrong_base_foreign_and_duplicate_updates_are_refused_or_ignored():
    c = core(buffer_size=1)
    assign(c, 1, 0, ["a"], model(0.0))
    reasons = lambda out: [a.reason for a in out if isinstance(a, RejectUpdate)]  # noqa: E731
    assert reasons(update(c, "b", 1, 0, 1.0)) == ["not_in_cohort"]
    assert reasons(update(c, "a", 1, 3, 1.0)) == ["wrong_round"]
    assert reasons(c.handle(UpdateReceived("zed", 1, ClientUpdate("zed", 10, model(1.0)), 10, digest=b"z",
                                           base_version=0))) == ["wrong_region"]
    update(c, "a", 1, 0, 1.0, digest=b"x")  # forwarded (buffer of 1)
    assert [type(a) for a in update(c, "a", 1, 0, 1.0, digest=b"x")] == [DuplicateIgnored]  # a redelivery
    assert reasons(update(c, "a", 1, 0, 9.0, digest=b"y")) == ["duplicate_update"]
    # Learned from the stream after a restart: the same answer.
    fresh = core(buffer_size=1)
    assign(fresh, 1, 0, ["a"], model(0.0))
    fresh.recent[("a", 1)] = b"x"
    assert [type(a) for a in update(fresh, "a", 1, 0, 1.0, digest=b"x")] == [DuplicateIgnored]


def test_updates_of_a_ticket_not_seen_yet_are_kept_waiting_not_refused():
    c = core()
    assign(c, 3, 0, ["a"], model(0.0))
    assert c.opens_soon(RUN, 4) and not c.opens_soon(RUN, 3) and not c.opens_soon(RUN, 10_000)
    assert c.accepts(RUN, 3) and not c.accepts(RUN, 4)
