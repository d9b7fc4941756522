"""The aggregating side of SecAgg+ (coordinator, or a region's aggregator): no I/O, no clocks.

    SecAggServer(secagg.setup)
    on_advertise(w, secagg.advertise)*   close_advertise()     -> secagg.keys               (U1)
    on_share_keys(w, secagg.shares)*     close_share_keys()    -> {holder: secagg.bundle}   (U2)
    on_masked_input(w, residues)*        close_masked_input()  -> secagg.unmask             (U3, U2 - U3)
    on_unmask(w, secagg.reveal)*         finish()              -> SecAggResult

The service closes a phase when ``awaiting`` is empty or its deadline passed. ``on_*``
raise ``SecAggRejection`` (the message is ignored, the round goes on); ``close_*`` and
``finish`` raise ``SecAggFailed`` when the round cannot end with a correct sum, after
which the machine answers nothing more.

Masked inputs are folded as they arrive (memory O(length), not O(n·length)).

Dropouts: a worker of U2 that sent no masked input has its pairwise masks removed from
its live neighbours' inputs with its pairwise key, rebuilt from shares; every worker of
U3 (including one that dies after sending) has its self-mask removed with its self seed,
rebuilt from shares. A worker is either in U3 or in U2 - U3, and shares are accepted
only of the kind its list asks for, so the server never holds both secrets of a worker.
Before asking for any share, the server checks that every secret it will need has at
least t live holders; otherwise the round fails (below_threshold) having revealed nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from nacl.bindings import crypto_scalarmult_base

from fedbus.protocol.secagg import (
    MIN_ROSTER,
    SecAggAdvertise,
    SecAggBundle,
    SecAggKeys,
    SecAggReveal,
    SecAggShares,
    SecAggUnmask,
)
from fedbus.secagg import shamir
from fedbus.secagg.client import Keys, request_digest
from fedbus.secagg.errors import SecAggFailed, SecAggRejection
from fedbus.secagg.prg import pair_seed, usable_public_key
from fedbus.secagg.quantize import wire_dtype
from fedbus.secagg.shares import SealedShare, self_commitment, share_commitment
from fedbus.secagg.spec import RoundParams, quantizer_of
from fedbus.secagg.topology import Topology, add_mask, pair_sign


@dataclass
class SecAggResult:
    total: np.ndarray  # uint64 residues: Σ over survivors of their quantized inputs, modulo 2^bits
    survivors: list[str]  # whose inputs the total contains (U3)
    dropped: list[str]  # who shared keys but sent no input (U2 - U3)
    flagged: list[SecAggRejection] = field(default_factory=list)  # shares refused while finishing


class SecAggServer:
    def __init__(self, params: RoundParams):
        quantizer_of(params)  # the server announces these parameters: refuse any that could wrap
        self.params = params
        self.topology = Topology(params)
        self.phase = "advertise"
        self.keys: dict[str, Keys] = {}
        self._public_keys: set[bytes] = set()
        self.u1: frozenset[str] = frozenset()
        self.sent_shares: dict[str, dict[str, SealedShare]] = {}  # dealer -> holder -> share
        self.u2: frozenset[str] = frozenset()
        self._sum = np.zeros(params.length, dtype=np.uint64)
        self.u3: set[str] = set()
        self.request: SecAggUnmask | None = None
        self._responded: set[str] = set()
        self._revealed: dict[tuple[str, str], dict[int, int]] = {}  # (dealer, kind) -> x -> y

    # -- bookkeeping ------------------------------------------------------------------

    @property
    def awaiting(self) -> frozenset[str]:
        """Who may still send in the current phase (empty: the phase can close now)."""
        expected = {"advertise": frozenset(self.params.roster), "shares": self.u1, "input": self.u2,
                    "unmask": frozenset(self.u3)}.get(self.phase, frozenset())
        done = {"advertise": self.keys.keys(), "shares": self.sent_shares.keys(), "input": self.u3,
                "unmask": self._responded}.get(self.phase, set())
        return frozenset(expected - done)

    def _accept(self, phase: str, sender: str, expected: frozenset[str] | set[str], done) -> None:
        if self.phase != phase or sender not in expected:
            raise SecAggRejection("unexpected_message", f"{phase} message in phase {self.phase}", sender)
        if sender in done:
            raise SecAggRejection("duplicate_message", phase, sender)

    def _fail(self, reason: str, detail: str, worker: str | None = None) -> SecAggFailed:
        self.phase = "failed"
        return SecAggFailed(reason, detail, worker)

    def _prune(self, alive: set[str]) -> frozenset[str]:
        """Drop every worker with fewer than t live holders (its secrets could not be rebuilt),
        again until no one is short. Bounded: each pass removes at least one worker or stops."""
        t = self.params.threshold
        for _ in range(len(alive) + 1):
            short = {w for w in alive if len(self.topology.holders(w, alive)) < t}
            if not short:
                break
            alive -= short
        return frozenset(alive)

    # -- phase 1: advertise keys ---------------------------------------------------------

    def _check_group(self, sender: str, msg) -> None:
        if msg.round != self.params.round or msg.group != self.params.group:
            raise SecAggRejection("unexpected_message", f"round {msg.round} group {msg.group[:64]!r}", sender)

    def on_advertise(self, sender: str, msg: SecAggAdvertise) -> None:
        self._accept("advertise", sender, frozenset(self.params.roster), self.keys)
        self._check_group(sender, msg)
        # A key seen twice is a copied key: its owner's masks would cancel against the copier's.
        if msg.enc_pk == msg.mask_pk or msg.enc_pk in self._public_keys or msg.mask_pk in self._public_keys:
            raise SecAggRejection("malformed_keys", "a public key used twice", sender)
        if not (usable_public_key(msg.enc_pk) and usable_public_key(msg.mask_pk)):
            raise SecAggRejection("malformed_keys", "a low-order X25519 point", sender)
        self._public_keys.update((msg.enc_pk, msg.mask_pk))
        self.keys[sender] = Keys.of(msg)

    def close_advertise(self) -> SecAggKeys:
        if self.phase != "advertise":
            raise SecAggRejection("unexpected_message", f"close_advertise in phase {self.phase}")
        self.u1 = self._prune(set(self.keys))
        if len(self.u1) < MIN_ROSTER:
            raise self._fail("below_threshold", f"{len(self.u1)} workers advertised keys with enough live neighbours")
        self.phase = "shares"
        workers = sorted(self.u1)
        return SecAggKeys(round=self.params.round, group=self.params.group, workers=workers,
                          enc_pks=[self.keys[w].enc_pk for w in workers], mask_pks=[self.keys[w].mask_pk for w in workers],
                          self_commits=[self.keys[w].self_commit for w in workers])

    # -- phase 2: share keys -------------------------------------------------------------

    def on_share_keys(self, sender: str, msg: SecAggShares) -> None:
        self._accept("shares", sender, self.u1, self.sent_shares)
        self._check_group(sender, msg)
        holders = self.topology.holders(sender, self.u1)
        by_holder = {h: SealedShare(p, s, c) for h, p, s, c in zip(msg.peers, msg.pair_commits, msg.self_commits,
                                                                      msg.ciphertexts)}
        if len(by_holder) != len(msg.peers) or by_holder.keys() != holders:
            raise SecAggRejection("malformed_shares", f"{len(msg.peers)} shares for {len(holders)} holders", sender)
        self.sent_shares[sender] = by_holder

    def close_share_keys(self) -> dict[str, SecAggBundle]:
        if self.phase != "shares":
            raise SecAggRejection("unexpected_message", f"close_share_keys in phase {self.phase}")
        self.u2 = self._prune(set(self.sent_shares))
        if len(self.u2) < MIN_ROSTER:
            raise self._fail("below_threshold", f"{len(self.u2)} workers shared keys with enough live holders")
        bundles: dict[str, list[tuple[str, SealedShare]]] = {h: [] for h in self.u2}
        for dealer in sorted(self.u2):
            for holder, s in self.sent_shares[dealer].items():
                if holder in self.u2:
                    bundles[holder].append((dealer, s))
        self.phase = "input"
        return {h: SecAggBundle(round=self.params.round, group=self.params.group, holder=h, peers=[d for d, _ in b],
                                pair_commits=[s.pair_commit for _, s in b], self_commits=[s.self_commit for _, s in b],
                                ciphertexts=[s.ciphertext for _, s in b])
                for h, b in bundles.items()}

    # -- phase 3: masked input -----------------------------------------------------------

    def on_masked_input(self, sender: str, values: np.ndarray) -> None:
        self._accept("input", sender, self.u2, self.u3)
        p = self.params
        dtype = wire_dtype(p.bits)
        if not isinstance(values, np.ndarray) or values.dtype != dtype or values.shape != (p.length,):
            raise SecAggRejection("wrong_length", f"expected {p.length} × {dtype}", sender)
        if p.bits < 8 * dtype.itemsize and int(values.max()) >= 1 << p.bits:  # (a shift by the full width is undefined)
            raise SecAggRejection("out_of_range", f"a residue >= 2^{p.bits}", sender)
        self._sum += values  # uint64 wraps modulo 2^64, a multiple of 2^bits
        self.u3.add(sender)

    def close_masked_input(self) -> SecAggUnmask:
        if self.phase != "input":
            raise SecAggRejection("unexpected_message", f"close_masked_input in phase {self.phase}")
        t, u3 = self.params.threshold, frozenset(self.u3)
        dropped = self.u2 - u3
        if len(u3) < MIN_ROSTER:
            raise self._fail("below_threshold", f"{len(u3)} masked inputs")
        for w in sorted(self.u2):
            live = self.topology.holders(w, u3) if w in u3 else self.topology.neighbours[w] & u3
            if len(live) < t:
                raise self._fail("below_threshold", f"{w[:64]} has {len(live)} surviving holders, threshold {t}", w)
        self.request = SecAggUnmask(round=self.params.round, group=self.params.group, survivors=sorted(u3),
                                    dropped=sorted(dropped))
        self.phase = "unmask"
        return self.request

    # -- phase 4: unmasking --------------------------------------------------------------

    def on_unmask(self, sender: str, msg: SecAggReveal) -> list[SecAggRejection]:
        """Keep the shares that open their dealer's commitments; the rest are returned as bad_share."""
        self._accept("unmask", sender, self.u3, self._responded)
        self._check_group(sender, msg)
        assert self.request is not None
        if msg.request_digest != request_digest(self.params, self.request):
            raise SecAggRejection("malformed_unmask", "answers another request", sender)
        wanted = {}
        for dealer, claimed, y_raw, salt in zip(msg.dealers, msg.kinds, msg.ys, msg.salts):
            kind = "self" if dealer in self.u3 else "pair" if dealer in self.u2 else None
            if kind != claimed or sender not in self.sent_shares[dealer] or (dealer, kind) in wanted:
                raise SecAggRejection("malformed_unmask", f"{claimed} share of {dealer[:64]!r}", sender)
            wanted[(dealer, kind)] = (y_raw, salt)
        self._responded.add(sender)
        bad = []
        x = self.topology.x[sender]
        for (dealer, kind), (y_raw, salt) in wanted.items():
            sent = self.sent_shares[dealer][sender]
            commit = sent.pair_commit if kind == "pair" else sent.self_commit
            try:
                y = shamir.y_from_bytes(y_raw)
            except shamir.ShamirError:
                y = None
            if y is None or share_commitment(self.params, dealer, sender, kind, y_raw, salt) != commit:
                bad.append(SecAggRejection("bad_share", f"{kind} share of {dealer[:64]!r}", sender))
                continue
            self._revealed.setdefault((dealer, kind), {})[x] = y
        return bad

    def finish(self) -> SecAggResult:
        if self.phase != "unmask":
            raise SecAggRejection("unexpected_message", f"finish in phase {self.phase}")
        p, t = self.params, self.params.threshold
        needed = [(w, "self") for w in sorted(self.u3)] + [(w, "pair") for w in sorted(self.u2 - self.u3)]
        # Count first, rebuild after: a round that cannot finish rebuilds nothing.
        for dealer, kind in needed:
            have = len(self._revealed.get((dealer, kind), {}))
            if have < t:
                raise self._fail("below_threshold", f"{have} {kind} shares of {dealer[:64]}, threshold {t}", dealer)
        flagged = []
        secrets = {}
        for dealer, kind in needed:
            if kind == "self":
                commit = self.keys[dealer].self_commit
                verify = lambda s, d=dealer, c=commit: self_commitment(p, d, s) == c  # noqa: E731
            else:
                pk = self.keys[dealer].mask_pk
                verify = lambda s, pk=pk: crypto_scalarmult_base(s) == pk  # noqa: E731
            r = shamir.reconstruct(self._revealed[(dealer, kind)], t, verify)
            if r.secret is None:
                raise self._fail("inconsistent_shares", f"{kind} secret of {dealer[:64]} does not verify", dealer)
            if r.off_polynomial:
                flagged.append(SecAggRejection("inconsistent_shares",
                                               f"{len(r.off_polynomial)} {kind} shares off the polynomial", dealer))
            secrets[(dealer, kind)] = r.secret
        total = self._sum
        for (dealer, kind), secret in secrets.items():
            if kind == "self":
                add_mask(total, secret, p.bits, -1)
                continue
            for u in sorted(self.topology.neighbours[dealer] & self.u3):
                seed = pair_seed(secret, self.keys[u].mask_pk, job=p.job, round=p.round, a=u, b=dealer)
                add_mask(total, seed, p.bits, -pair_sign(u, dealer))
        total &= np.uint64((1 << p.bits) - 1)
        self.phase = "done"
        return SecAggResult(total, sorted(self.u3), sorted(self.u2 - self.u3), flagged)
