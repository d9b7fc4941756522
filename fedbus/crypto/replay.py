"""ReplayGuard: remembers every nonce for as long as its timestamp could still pass."""

from __future__ import annotations

from collections import OrderedDict


class ReplayGuard:
    """Rejects a nonce seen before within the freshness window.

    Messages older than the window are rejected by the timestamp check, so a nonce only
    needs remembering until its message could no longer pass that check; memory is
    bounded by the message rate times the window, and by ``max_entries`` in any case: when
    full, new messages are refused (``rate_limited``) rather than old nonces forgotten.
    """

    def __init__(self, window_ms: int, max_entries: int = 1_000_000):
        self.window_ms = window_ms
        self.max_entries = max_entries
        self._seen: OrderedDict[bytes, int] = OrderedDict()  # nonce -> expiry, insertion ordered

    def check_and_remember(self, nonce: bytes, ts_ms: int, now_ms: int) -> bool:
        """True when the nonce is new (and now remembered); False for a replay."""
        self._expire(now_ms)
        if nonce in self._seen:
            return False
        if len(self._seen) >= self.max_entries:
            # Fail closed: evicting a live nonce would let its message be replayed.
            return False
        self._seen[nonce] = max(ts_ms, now_ms) + self.window_ms
        return True

    @property
    def full(self) -> bool:
        return len(self._seen) >= self.max_entries

    def seen(self, nonce: bytes, now_ms: int) -> bool:
        """Look up without remembering (verification remembers only fully valid messages)."""
        self._expire(now_ms)
        return nonce in self._seen

    def _expire(self, now_ms: int) -> None:
        # Insertion order roughly follows expiry; stop at the first live entry.
        while self._seen:
            nonce, expiry = next(iter(self._seen.items()))
            if expiry > now_ms:
                break
            del self._seen[nonce]

    def __len__(self) -> int:
        return len(self._seen)
