"""The worker's side of SecAgg+ as a state machine: messages in, messages out, no I/O.

    SecAggClient(me, secagg.setup)
    advertise() -> secagg.advertise
    on_keys(secagg.keys) -> secagg.shares
    on_shares(secagg.bundle) -> [SecAggRejection]     (dealers whose shares are bad)
    masked_input(quantized residues) -> masked residues (the tensor of secagg.input)
    on_unmask(secagg.unmask) -> secagg.reveal

A call out of order, or a message that would make answering unsafe, raises
``SecAggAbort`` with a named reason; the worker then stays silent for the round.
Keys are fresh per round: the pairwise key is revealed when the worker drops, and
must not unmask any other round.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from nacl.bindings import crypto_scalarmult_base

from fedbus.protocol.secagg import (
    SALT_BYTES,
    SecAggAdvertise,
    SecAggBundle,
    SecAggKeys,
    SecAggReveal,
    SecAggShares,
    SecAggUnmask,
)
from fedbus.secagg import shamir
from fedbus.secagg.errors import SecAggAbort, SecAggRejection
from fedbus.secagg.prg import digest, pair_seed, usable_public_key
from fedbus.secagg.quantize import wire_dtype
from fedbus.secagg.shares import HeldShares, open_sealed, seal, self_commitment
from fedbus.secagg.spec import RoundParams, quantizer_of
from fedbus.secagg.topology import Topology, add_mask, pair_sign


def request_digest(params: RoundParams, request: SecAggUnmask) -> bytes:
    return digest(b"fedbus-sa-unmask", params.job, params.round, params.group, request.survivors, request.dropped)


class Keys(NamedTuple):
    """A worker's advertised keys, as the directory lists them."""

    enc_pk: bytes
    mask_pk: bytes
    self_commit: bytes

    @classmethod
    def of(cls, msg: SecAggAdvertise) -> Keys:
        return cls(msg.enc_pk, msg.mask_pk, msg.self_commit)


class SecAggClient:
    def __init__(self, me: str, params: RoundParams, random_bytes: Callable[[int], bytes] = os.urandom):
        if me not in params.roster:
            raise SecAggAbort("excluded", f"{me} is not in the roster")
        try:
            quantizer_of(params)
        except ValueError as exc:
            raise SecAggAbort("malformed_setup", str(exc)) from None
        self.me = me
        self.params = params
        self.topology = Topology(params)
        self._random = random_bytes
        self.phase = "advertise"
        self._enc_sk = random_bytes(32)
        self._mask_sk = random_bytes(32)
        self._self_seed = random_bytes(32)
        self.keys = SecAggAdvertise(round=params.round, group=params.group,
                                    enc_pk=crypto_scalarmult_base(self._enc_sk),
                                    mask_pk=crypto_scalarmult_base(self._mask_sk),
                                    self_commit=self_commitment(params, me, self._self_seed))
        self._directory: dict[str, Keys] = {}
        self._held: dict[str, HeldShares] = {}  # dealer -> my shares of its secrets
        self._partners: list[str] = []  # neighbours whose pairwise masks I add

    def _expect(self, phase: str) -> None:
        if self.phase != phase:
            raise SecAggAbort("unexpected_message", f"in phase {self.phase}, expected {phase}")

    def advertise(self) -> SecAggAdvertise:
        self._expect("advertise")
        self.phase = "keys"
        return self.keys

    def on_keys(self, directory: SecAggKeys) -> SecAggShares:
        self._expect("keys")
        entries = {}
        for w, enc_pk, mask_pk, commit in zip(directory.workers, directory.enc_pks, directory.mask_pks,
                                              directory.self_commits):
            if w not in self.topology.x or w in entries:
                raise SecAggAbort("malformed_directory", f"unknown or repeated worker {w[:64]!r}")
            if w in self.topology.neighbours[self.me] and not (usable_public_key(enc_pk) and usable_public_key(mask_pk)):
                raise SecAggAbort("malformed_directory", f"unusable keys of {w[:64]!r}")
            entries[w] = Keys(enc_pk, mask_pk, commit)
        if entries.get(self.me) != Keys.of(self.keys):
            raise SecAggAbort("malformed_directory", "my own keys are missing or changed")
        holders = sorted(self.topology.holders(self.me, entries.keys()))
        t = self.params.threshold
        if len(holders) < t:
            raise SecAggAbort("below_threshold", f"{len(holders)} live holders, threshold {t}")
        self._directory = entries
        xs = [self.topology.x[h] for h in holders]
        pair = self._split(self._mask_sk, xs, t)
        own = self._split(self._self_seed, xs, t)
        pair_commits, self_commits, ciphertexts = [], [], []
        for h in holders:
            x = self.topology.x[h]
            held = HeldShares(x, shamir.y_to_bytes(pair[x]), shamir.y_to_bytes(own[x]), self._random(SALT_BYTES))
            pair_c, self_c = held.commitments(self.params, self.me, h)
            pair_commits.append(pair_c)
            self_commits.append(self_c)
            ciphertexts.append(seal(self.params, self.me, h, held, self._enc_sk, entries[h].enc_pk))
        self.phase = "shares"
        return SecAggShares(round=self.params.round, group=self.params.group, peers=holders,
                            pair_commits=pair_commits, self_commits=self_commits, ciphertexts=ciphertexts)

    def _split(self, secret: bytes, xs: list[int], t: int) -> dict[int, int]:
        return shamir.split(secret, xs, t, self._random)

    def on_shares(self, bundle: SecAggBundle) -> list[SecAggRejection]:
        """Keep my shares of each dealer's secrets; the dealers delivered are the ones I mask with."""
        self._expect("shares")
        if bundle.holder != self.me:
            raise SecAggAbort("unexpected_message", f"a bundle for {bundle.holder[:64]!r}")
        allowed = self.topology.holders(self.me, self._directory.keys())  # dealers I may hold shares of
        rejections, partners, seen = [], [], set()
        for dealer, pair_c, self_c, ciphertext in zip(bundle.peers, bundle.pair_commits, bundle.self_commits,
                                                      bundle.ciphertexts):
            if dealer not in allowed or dealer in seen:
                rejections.append(SecAggRejection("unexpected_message", "share from a non-neighbour or twice", dealer))
                continue
            seen.add(dealer)
            if dealer != self.me:
                # The server counts this dealer in the round, so it expects our pairwise mask in my
                # input whether or not its shares turn out to be good.
                partners.append(dealer)
            held = open_sealed(self.params, dealer, self.me, ciphertext, self._enc_sk, self._directory[dealer].enc_pk)
            if held is None or held.x != self.topology.x[self.me] or \
                    held.commitments(self.params, dealer, self.me) != (pair_c, self_c):
                rejections.append(SecAggRejection("bad_share", "does not decrypt or open its commitments", dealer))
                continue
            self._held[dealer] = held
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

    def on_unmask(self, request: SecAggUnmask) -> SecAggReveal:
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
        dealers, kinds, ys, salts = [], [], [], []
        for dealer, held in sorted(self._held.items()):
            kind = "self" if dealer in survivors else "pair" if dealer in dropped else None
            if kind is not None:
                dealers.append(dealer)
                kinds.append(kind)
                ys.append(held.y(kind))
                salts.append(held.salt)
        return SecAggReveal(round=self.params.round, group=self.params.group,
                            request_digest=request_digest(self.params, request),
                            dealers=dealers, kinds=kinds, ys=ys, salts=salts)
