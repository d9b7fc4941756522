"""The round's communication graph: a random k-regular graph every party derives alike.

SecAgg+ (Bell et al. 2020) replaces SecAgg's complete graph with a random k-regular
one: a worker agrees pairwise masks with, and shares its secrets among, only its k
neighbours, so its work is O(k + L) instead of O(n + L) and the server's O(n·k + n·L).

Construction: the roster is put in a random order (a Fisher-Yates shuffle driven by
BLAKE2b in counter mode over the coordinator's announced public seed), and each worker
is joined to the k/2 nearest positions on either side of a ring (a Harary graph on a
random permutation). k is even; k >= n - 1 gives the complete graph. The seed is
announced after the cohort is fixed, so no one chose their neighbours.

Default degree (``default_degree``): k = min(n - 1, 2·ceil(1.5·log2 n)), about 3·log2 n:
n = 10 -> complete (9), 50 -> 18, 100 -> 20, 1000 -> 30. Bell et al. show that
k = O(log n) keeps both guarantees with high probability for a constant fraction of
corrupt workers and dropouts. The trade-off: a larger k tolerates more dropouts per
neighbourhood (each secret needs t of its k + 1 holders alive) and leaves a dropped
worker's survivors more masks to hide behind, at O(k) more key agreements, PRG
expansions and shares per worker; a smaller k is cheaper but a cluster of dropouts in
one neighbourhood fails the round sooner.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence


def default_degree(n: int) -> int:
    if n < 2:
        return 0
    return min(n - 1, 2 * math.ceil(1.5 * math.log2(n)))


def _uniform_below(seed: bytes, counter: int, bound: int) -> int:
    # 128 bits reduced modulo bound (bound <= roster size): bias below 2^-100.
    block = hashlib.blake2b(counter.to_bytes(8, "little"), digest_size=16, key=seed, person=b"fedbus-sa-graph").digest()
    return int.from_bytes(block, "little") % bound


def neighbours(roster: Sequence[str], degree: int, seed: bytes) -> dict[str, frozenset[str]]:
    """Each worker's neighbours (itself excluded) in the round's graph."""
    n = len(roster)
    if degree >= n - 1:
        everyone = frozenset(roster)
        return {w: everyone - {w} for w in roster}
    if degree < 2 or degree % 2:
        raise ValueError(f"degree must be even and >= 2 below n - 1, got {degree} for n = {n}")
    order = list(roster)
    for i in range(n - 1, 0, -1):  # Fisher-Yates
        j = _uniform_below(seed, i, i + 1)
        order[i], order[j] = order[j], order[i]
    half = degree // 2
    out = {}
    for pos, w in enumerate(order):
        out[w] = frozenset(order[(pos + d) % n] for d in range(-half, half + 1) if d)
    return out
