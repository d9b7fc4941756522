"""Who is whose neighbour and share holder in a round: derived alike by every party."""

from __future__ import annotations

from collections.abc import Set

import numpy as np

from fedbus.secagg.graph import neighbours
from fedbus.secagg.prg import expand
from fedbus.secagg.spec import RoundParams


class Topology:
    def __init__(self, params: RoundParams):
        self.params = params
        self.neighbours = neighbours(params.roster, params.degree, params.seed)
        self.x = {w: i + 1 for i, w in enumerate(params.roster)}  # Shamir points, never 0

    def holders(self, worker: str, alive: Set[str]) -> frozenset[str]:
        """Who holds shares of ``worker``'s secrets: its live neighbours and itself."""
        return frozenset(self.neighbours[worker] & alive) | {worker}


def add_mask(acc: np.ndarray, seed: bytes, bits: int, sign: int) -> None:
    """acc += sign · PRG(seed), modulo 2^64 (reduced modulo 2^bits by the caller)."""
    mask = expand(seed, len(acc), bits)
    if sign > 0:
        acc += mask
    else:
        acc -= mask


def pair_sign(me: str, other: str) -> int:
    """The lower id of a pair adds the pairwise mask, the higher subtracts it, so the two cancel."""
    return 1 if me < other else -1
