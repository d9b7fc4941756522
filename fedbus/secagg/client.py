"""The worker's side of SecAgg+ as a state machine: messages in, messages out, no I/O.

    advertise() -> AdvertiseKeys
    on_keys(KeyDirectory) -> ShareKeys
    on_shares(ShareBundle) -> [SecAggRejection]       (dealers whose shares are bad)
    masked_input(quantized residues) -> masked residues
    on_unmask(UnmaskRequest) -> UnmaskResponse

A call out of order, or a message that would make answering unsafe, raises
``SecAggAbort`` with a named reason; the worker then stays silent for the round.
Keys are fresh per round: the pairwise key is revealed when the worker drops, and
must not unmask any other round.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
from nacl.bindings import crypto_scalarmult_base

from fedbus.secagg import shamir
from fedbus.secagg.errors import SecAggAbort, SecAggRejection
from fedbus.secagg.messages import (
    SALT_BYTES,
    AdvertiseKeys,
    EncryptedShare,
    KeyDirectory,
    RevealedShare,
    ShareBundle,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from fedbus.secagg.prg import digest, pair_seed
from fedbus.secagg.quantize import wire_dtype
from fedbus.secagg.shares import HeldShares, open_sealed, seal, self_commitment
from fedbus.secagg.spec import RoundParams
from fedbus.secagg.topology import Topology, add_mask, pair_sign


def request_digest(params: RoundParams, request: UnmaskRequest) -> bytes:
    return digest(b"fedbus-sa-unmask", params.job, params.round, request.survivors, request.dropped)


class SecAggClient:
    def __init__(self, me: str, params: RoundParams, random_bytes: Callable[[int], bytes] = os.urandom):
        if me not in params.roster:
            raise SecAggAbort("excluded", f"{me} is not in the roster")
        self.me = me
        self.params = params
        self.topology = Topology(params)
        self._random = random_bytes
        self.phase = "advertise"
        self._enc_sk = random_bytes(32)
        self._mask_sk = random_bytes(32)
        self._self_seed = random_bytes(32)
        self.keys = AdvertiseKeys(enc_pk=crypto_scalarmult_base(self._enc_sk),
                                  mask_pk=crypto_scalarmult_base(self._mask_sk),
                                  self_commit=self_commitment(params, me, self._self_seed))
        self._directory: dict[str, AdvertiseKeys] = {}
        self._held: dict[str, HeldShares] = {}  # dealer -> my shares of its secrets
        self._partners: list[str] = []  # neighbours whose pairwise masks I add

    def _expect(self, phase: str) -> None:
        if self.phase != phase:
            raise SecAggAbort("unexpected_message", f"in phase {self.phase}, expected {phase}")

    def advertise(self) -> AdvertiseKeys:
        self._expect("advertise")
        self.phase = "keys"
        return self.keys

    def on_keys(self, directory: KeyDirectory) -> ShareKeys:
        self._expect("keys")
        entries = {}
        for e in directory.entries:
            if e.worker not in self.topology.x or e.worker in entries:
                raise SecAggAbort("malformed_directory", f"unknown or repeated worker {e.worker[:64]!r}")
            entries[e.worker] = AdvertiseKeys(enc_pk=e.enc_pk, mask_pk=e.mask_pk, self_commit=e.self_commit)
        if entries.get(self.me) != self.keys:
            raise SecAggAbort("malformed_directory", "my own keys are missing or changed")
        holders = sorted(self.topology.holders(self.me, entries.keys()))
        t = self.params.threshold
        if len(holders) < t:
            raise SecAggAbort("below_threshold", f"{len(holders)} live holders, threshold {t}")
        self._directory = entries
        xs = [self.topology.x[h] for h in holders]
        pair = self._split(self._mask_sk, xs, t)
        own = self._split(self._self_seed, xs, t)
        out = []
        for h in holders:
            x = self.topology.x[h]
            held = HeldShares(x, shamir.y_to_bytes(pair[x]), shamir.y_to_bytes(own[x]), self._random(SALT_BYTES))
            pair_c, self_c = held.commitments(self.params, self.me, h)
            out.append(EncryptedShare(peer=h, pair_commit=pair_c, self_commit=self_c,
                                      ciphertext=seal(self.params, self.me, h, held, self._enc_sk, entries[h].enc_pk)))
        self.phase = "shares"
        return ShareKeys(shares=out)

    def _split(self, secret: bytes, xs: list[int], t: int) -> dict[int, int]:
        return shamir.split(secret, xs, t, self._random)

    def on_shares(self, bundle: ShareBundle) -> list[SecAggRejection]:
        """Keep my shares of each dealer's secrets; the dealers delivered are the ones I mask with."""
        self._expect("shares")
        allowed = self.topology.holders(self.me, self._directory.keys())  # dealers I may hold shares of
        rejections, partners, seen = [], [], set()
        for s in bundle.shares:
            if s.peer not in allowed or s.peer in seen:
                rejections.append(SecAggRejection("unexpected_message", "share from a non-neighbour or twice", s.peer))
                continue
            seen.add(s.peer)
            if s.peer != self.me:
                # The server counts this dealer in the round, so it expects our pairwise mask in my
                # input whether or not its shares turn out to be good.
                partners.append(s.peer)
            held = open_sealed(self.params, s.peer, self.me, s.ciphertext, self._enc_sk, self._directory[s.peer].enc_pk)
            if held is None or held.x != self.topology.x[self.me] or \
                    held.commitments(self.params, s.peer, self.me) != (s.pair_commit, s.self_commit):
                rejections.append(SecAggRejection("bad_share", "does not decrypt or open its commitments", s.peer))
                continue
            self._held[s.peer] = held
        if self.me not in seen:
            raise SecAggAbort("excluded", "the server did not return my own share: I am not in the round")
        self._partners = partners
        self.phase = "input"
        return rejections

    def masked_input(self, quantized: np.ndarray) -> np.ndarray:
        """y = x + PRG(self seed) + Σ ±PRG(pair seed) mod 2^bits, as the round's wire dtype."""
        self._expect("input")
        p = self.params
        x = np.asarray(quantized)
        if x.shape != (p.length,) or x.dtype != np.uint64 or (x >> np.uint64(p.bits)).any():
            raise ValueError(f"quantized input must be {p.length} uint64 residues below 2^{p.bits}")
        acc = x.copy()
        add_mask(acc, self._self_seed, p.bits, 1)
        for v in self._partners:
            seed = pair_seed(self._mask_sk, self._directory[v].mask_pk, job=p.job, round=p.round, a=self.me, b=v)
            add_mask(acc, seed, p.bits, pair_sign(self.me, v))
        acc &= np.uint64((1 << p.bits) - 1)
        self.phase = "unmask"
        return acc.astype(wire_dtype(p.bits))

    def on_unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Self-seed shares of survivors, pairwise-key shares of the dropped: never both for one
        worker, and only once per round."""
        self._expect("unmask")
        self.phase = "done"  # whatever happens next, no second answer
        survivors, dropped = set(request.survivors), set(request.dropped)
        if len(survivors) != len(request.survivors) or len(dropped) != len(request.dropped) \
                or survivors & dropped or self.me not in survivors \
                or not (survivors | dropped) <= self.topology.x.keys():
            raise SecAggAbort("inconsistent_request", "overlapping, repeated or unknown workers, or me as dropped")
        t = self.params.threshold
        live = self.topology.holders(self.me, survivors)
        if len(live) < t:
            raise SecAggAbort("below_threshold", f"{len(live)} of my holders survive, threshold {t}")
        shares = []
        for dealer, held in sorted(self._held.items()):
            kind = "self" if dealer in survivors else "pair" if dealer in dropped else None
            if kind is not None:
                shares.append(RevealedShare(dealer=dealer, kind=kind, y=held.y(kind), salt=held.salt))
        return UnmaskResponse(request_digest=request_digest(self.params, request), shares=shares)
