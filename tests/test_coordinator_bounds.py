"""Pure pieces that bound what a flood costs: the rejection ledger and the token buckets."""

from __future__ import annotations

from fedbus.rejections import UNLISTED, RejectionLedger
from fedbus.coordinator.ratelimit import TokenBuckets


def test_ledger_counts_every_rejection_and_reports_once_per_key_and_interval():
    ledger = RejectionLedger(1_000, is_listed=lambda s: s in {"w1"})
    firsts = [ledger.record("heartbeat", f"junk{i}", "unknown_sender", "x", now_ms=i) for i in range(100_000)]
    assert sum(firsts) == 1  # one log line for 100k junk senders
    assert ledger.record("update", "w1", "bad_signature", "sig", 10)
    assert not ledger.record("update", "w1", "bad_signature", "sig", 11)
    assert not ledger.due(999) and ledger.due(1_000)
    reports = ledger.flush(1_000)
    assert [(r.kind, r.sender, r.reason, r.count) for r in reports] == [
        ("heartbeat", UNLISTED, "unknown_sender", 100_000), ("update", "w1", "bad_signature", 2)]
    assert ledger.totals == {"unknown_sender": 100_000, "bad_signature": 2}
    assert ledger.flush(2_000) == [] and not ledger.due(5_000)
    # A new interval reports again.
    assert ledger.record("update", "w1", "bad_signature", "sig", 3_000)


def test_token_bucket_spends_only_the_senders_own_budget():
    buckets = TokenBuckets(rate_per_s=2.0, burst=5)
    storm = [buckets.allow("w1", 0) for _ in range(1_000)]
    assert sum(storm) == 5  # the burst, then nothing
    assert buckets.allow("w2", 0)  # another sender is untouched
    assert not buckets.allow("w1", 400) and buckets.allow("w1", 500)  # 2/s refill: one token after 500 ms
    assert sum(buckets.allow("w1", 60_000) for _ in range(10)) == 5  # refills up to the burst, no more
