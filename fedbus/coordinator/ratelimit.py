"""Per-sender token buckets (pure: time comes in with every call).

A listed worker that storms heartbeats or updates spends its own budget: past the burst,
its messages are refused as ``rate_limited`` before any signature is checked, and nobody
else's budget moves. The key is the sender named by the subject; NATS subject
permissions (deploy/nats/) stop anyone else from publishing on that subject.
"""

from __future__ import annotations


class TokenBuckets:
    def __init__(self, rate_per_s: float, burst: int, max_keys: int = 100_000):
        self.rate_per_ms = rate_per_s / 1000.0
        self.burst = float(burst)
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, int]] = {}  # key -> (tokens, last refill ms)

    def allow(self, key: str, now_ms: int) -> bool:
        tokens, last = self._buckets.get(key, (self.burst, now_ms))
        tokens = min(self.burst, tokens + (now_ms - last) * self.rate_per_ms)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now_ms)
            return False
        if key not in self._buckets and len(self._buckets) >= self.max_keys:
            return False  # keys are listed senders; this only guards against misuse
        self._buckets[key] = (tokens - 1.0, now_ms)
        return True
