"""SecAgg+ rounds with every party in process: exact sums under dropouts, named failures,
hostile workers. Randomness is seeded, so every run is the same run."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from fedbus.secagg import SecAggAbort, SecAggClient, SecAggFailed, SecAggRejection, SecAggServer, shamir
from fedbus.protocol.secagg import SecAggAdvertise, SecAggBundle, SecAggReveal, SecAggShares, SecAggUnmask
from fedbus.secagg.simulate import Dropouts, RoundLog, run_round
from fedbus.secagg.spec import SecureAggregationSpec, quantizer_of


def make_round(n: int, length: int = 256, seed: int = 0, **spec):
    roster = [f"w{i:02d}" for i in range(n)]
    params = SecureAggregationSpec(**spec).round_params(job="job", round=3, roster=roster,
                                                         seed=random.Random(seed).randbytes(32), length=length, bound=1.0)
    rng = np.random.default_rng(seed)
    floats = {w: rng.uniform(-1, 1, length) for w in roster}
    quantized = {w: quantizer_of(params).quantize(x) for w, x in floats.items()}
    return params, floats, quantized


def plain_sum(params, quantized, workers):
    total = np.zeros(params.length, dtype=np.uint64)
    for w in workers:
        total += quantized[w]
    return total & np.uint64((1 << params.bits) - 1)


def check_sum(result, params, floats, quantized):
    assert (result.total == plain_sum(params, quantized, result.survivors)).all()
    float_sum = sum(floats[w] for w in result.survivors)
    assert np.abs(quantizer_of(params).dequantize_sum(result.total) - float_sum).max() <= quantizer_of(params).sum_error_bound


@pytest.mark.parametrize("n", [5, 8, 13, 20])
def test_sum_is_exact_with_30_percent_dropouts_before_and_after_the_masked_input(n):
    params, floats, quantized = make_round(n, seed=n)
    roster = params.roster
    drops = math.ceil(0.3 * n)  # 2, 3, 4, 6
    before, after = roster[:drops // 2], roster[drops // 2:drops]
    log = RoundLog()
    result = run_round(params, quantized, Dropouts(before_input=frozenset(before), before_unmask=frozenset(after)),
                       random_bytes=random.Random(n).randbytes, log=log)
    assert result.dropped == sorted(before)
    assert set(after) <= set(result.survivors)  # their inputs count: their self-masks came off via shares
    assert len(result.survivors) == n - len(before)
    assert log.rejections == []
    check_sum(result, params, floats, quantized)


def test_no_dropouts_and_dropouts_before_the_key_phases():
    params, floats, quantized = make_round(12, seed=7)
    check_sum(run_round(params, quantized, random_bytes=random.Random(1).randbytes), params, floats, quantized)
    r = run_round(params, quantized, Dropouts(before_advertise=frozenset({"w00"}), before_shares=frozenset({"w01"})),
                  random_bytes=random.Random(2).randbytes)
    assert "w00" not in r.survivors + r.dropped and "w01" not in r.survivors + r.dropped
    check_sum(r, params, floats, quantized)


def test_too_many_dropouts_before_input_fail_by_name_before_any_share_is_asked_for():
    params, _, quantized = make_round(5, seed=1)  # k = 4, t = 3 of 5 holders
    with pytest.raises(SecAggFailed) as e:
        run_round(params, quantized, Dropouts(before_input=frozenset(params.roster[:3])))
    assert e.value.reason == "below_threshold"


def test_too_many_dropouts_during_unmasking_fail_by_name_without_rebuilding_anything():
    params, _, quantized = make_round(5, seed=2)
    with pytest.raises(SecAggFailed) as e:
        run_round(params, quantized, Dropouts(before_unmask=frozenset(params.roster[:3])))
    assert e.value.reason == "below_threshold"


class _Driver:
    """Step a round by hand so tests can interfere between phases."""

    def __init__(self, params, clients=None):
        self.params = params
        self.server = SecAggServer(params)
        self.clients = clients or {w: SecAggClient(w, params, random.Random(w).randbytes) for w in params.roster}

    def to_input(self, skip=()):
        for w, c in self.clients.items():
            self.server.on_advertise(w, c.advertise())
        directory = self.server.close_advertise()
        self.share_keys = {w: c.on_keys(directory) for w, c in self.clients.items()}
        for w, m in self.share_keys.items():
            self.server.on_share_keys(w, m)
        self.bundles = self.server.close_share_keys()
        return {w: self.clients[w].on_shares(b) for w, b in self.bundles.items() if w not in skip}


def test_masked_input_of_the_wrong_length_dtype_or_range_is_refused_and_the_round_still_sums_correctly():
    params, floats, quantized = make_round(8, seed=3)
    d = _Driver(params)
    d.to_input()
    good = {w: d.clients[w].masked_input(quantized[w]) for w in params.roster}
    bad = good["w01"]
    for wrong, reason in ((bad[:-1], "wrong_length"), (bad.astype(np.uint64), "wrong_length"),
                          (np.full_like(bad, 1 << params.bits), "out_of_range")):
        with pytest.raises(SecAggRejection) as e:
            d.server.on_masked_input("w01", wrong)
        assert e.value.reason == reason
    for w in params.roster:
        if w != "w01":  # w01 only sent garbage: it counts as dropped before its input
            d.server.on_masked_input(w, good[w])
    with pytest.raises(SecAggRejection) as e:
        d.server.on_masked_input("w02", good["w02"])
    assert e.value.reason == "duplicate_message"
    request = d.server.close_masked_input()
    assert request.dropped == ["w01"]
    for w in request.survivors:
        d.server.on_unmask(w, d.clients[w].on_unmask(request))
    result = d.server.finish()
    assert result.dropped == ["w01"]
    check_sum(result, params, floats, quantized)


def test_share_keys_not_matching_the_holders_are_refused():
    params, _, _ = make_round(6, seed=4)
    d = _Driver(params)
    for w, c in d.clients.items():
        d.server.on_advertise(w, c.advertise())
    directory = d.server.close_advertise()
    msg = d.clients["w00"].on_keys(directory)
    fields = msg.model_dump()
    lists = ("peers", "pair_commits", "self_commits", "ciphertexts")
    for cut in (slice(None, -1), slice(1, None)):  # a holder left out
        with pytest.raises(SecAggRejection) as e:
            d.server.on_share_keys("w00", SecAggShares(**{**fields, **{k: fields[k][cut] for k in lists}}))
        assert e.value.reason == "malformed_shares"
    with pytest.raises(SecAggRejection) as e:  # a holder twice
        d.server.on_share_keys("w00", SecAggShares(**{**fields, **{k: fields[k] + fields[k][:1] for k in lists}}))
    assert e.value.reason == "malformed_shares"
    with pytest.raises(ValueError):  # lists that do not line up never get past decoding
        SecAggShares(**{**fields, "peers": fields["peers"][:-1]})
    with pytest.raises(SecAggRejection) as e:
        d.server.on_advertise("w01", d.clients["w01"].keys)
    assert e.value.reason == "unexpected_message"  # the advertise phase is closed


def test_reused_public_keys_are_refused():
    params, _, _ = make_round(5, seed=5)
    server = SecAggServer(params)
    keys = SecAggClient("w00", params).advertise()
    server.on_advertise("w00", keys)
    with pytest.raises(SecAggRejection) as e:
        server.on_advertise("w01", keys)
    assert e.value.reason == "malformed_keys"
    low_order = SecAggAdvertise(round=3, enc_pk=b"\1" + bytes(31), mask_pk=b"\2" * 32, self_commit=bytes(32))
    with pytest.raises(SecAggRejection) as e:  # agrees on no secret: every pairing with it would fail
        server.on_advertise("w02", low_order)
    assert e.value.reason == "malformed_keys"


class InconsistentDealer(SecAggClient):
    """Deals one holder a share off the polynomial (with a valid commitment to it)."""

    victims = 1

    def _split(self, secret, xs, t):
        shares = super()._split(secret, xs, t)
        for x in xs[:self.victims]:
            shares[x] = (shares[x] + 1) % shamir.PRIME
        return shares


def _with_cheater(cls, cheater="w03"):
    def make(w, params, rnd):
        return (cls if w == cheater else SecAggClient)(w, params, rnd)
    return make


def test_an_inconsistent_dealer_is_named_and_the_sum_stays_correct():
    params, floats, quantized = make_round(8, seed=6)  # complete graph, t = 5 of 8: 7 good shares suffice
    log = RoundLog()
    result = run_round(params, quantized, Dropouts(before_unmask=frozenset({"w03"})),
                       random_bytes=random.Random(6).randbytes, log=log, make_client=_with_cheater(InconsistentDealer))
    assert [(r.reason, r.worker) for r in log.rejections] == [("inconsistent_shares", "w03")]
    check_sum(result, params, floats, quantized)


def test_a_dealer_whose_shares_never_verify_fails_the_round_by_name():
    class Garbage(InconsistentDealer):
        victims = 8  # every share off: no t of them rebuild the seed its commitment names

    params, _, quantized = make_round(8, seed=7)
    with pytest.raises(SecAggFailed) as e:
        run_round(params, quantized, Dropouts(before_unmask=frozenset({"w03"})),
                  random_bytes=random.Random(7).randbytes, make_client=_with_cheater(Garbage))
    assert (e.value.reason, e.value.worker) == ("inconsistent_shares", "w03")


def test_a_holder_revealing_a_substituted_share_is_refused_and_the_sum_stays_correct():
    class LyingHolder(SecAggClient):
        def on_unmask(self, request):
            r = super().on_unmask(request)
            return SecAggReveal(**{**r.model_dump(), "ys": [bytes(shamir.Y_BYTES)] + r.ys[1:]})

    params, floats, quantized = make_round(8, seed=8)
    log = RoundLog()
    result = run_round(params, quantized, Dropouts(before_input=frozenset({"w00"})),
                       random_bytes=random.Random(8).randbytes, log=log, make_client=_with_cheater(LyingHolder))
    assert [(r.reason, r.worker) for r in log.rejections] == [("bad_share", "w03")]
    check_sum(result, params, floats, quantized)


def test_clients_never_reveal_both_shares_of_a_worker():
    params, _, quantized = make_round(6, seed=9)
    d = _Driver(params)
    d.to_input()
    for w in params.roster:
        d.server.on_masked_input(w, d.clients[w].masked_input(quantized[w]))
    c = d.clients["w00"]
    with pytest.raises(SecAggAbort) as e:  # a worker listed as both survivor and dropped
        c.on_unmask(SecAggUnmask(round=3, survivors=params.roster, dropped=["w01"]))
    assert e.value.reason == "inconsistent_request"
    with pytest.raises(SecAggAbort) as e:  # and no second chance: one answer per round
        c.on_unmask(SecAggUnmask(round=3, survivors=[w for w in params.roster if w != "w01"], dropped=["w01"]))
    assert e.value.reason == "unexpected_message"
    c2 = d.clients["w02"]
    with pytest.raises(SecAggAbort) as e:  # a request that would leave me below the threshold
        c2.on_unmask(SecAggUnmask(round=3, survivors=["w02", "w03"], dropped=[w for w in params.roster if w not in ("w02", "w03")]))
    assert e.value.reason == "below_threshold"
    # The server's own request: disjoint lists, and it refuses a share of the other kind
    request = d.server.close_masked_input()
    assert not set(request.survivors) & set(request.dropped)
    honest = d.clients["w04"].on_unmask(request)
    flipped = SecAggReveal(**{**honest.model_dump(), "kinds": ["pair"] * len(honest.kinds)})
    with pytest.raises(SecAggRejection) as e:
        d.server.on_unmask("w04", flipped)
    assert e.value.reason == "malformed_unmask"


def test_a_bad_share_is_rejected_by_its_holder():
    params, _, _ = make_round(6, seed=10)
    d = _Driver(params)
    for w, c in d.clients.items():
        d.server.on_advertise(w, c.advertise())
    directory = d.server.close_advertise()
    for w, c in d.clients.items():
        d.server.on_share_keys(w, c.on_keys(directory))
    bundles = d.server.close_share_keys()
    b = bundles["w00"]
    tampered = SecAggBundle(**{**b.model_dump(), "ciphertexts": [b.ciphertexts[0], bytes(len(b.ciphertexts[1]))]
                                                               + b.ciphertexts[2:]})
    rejections = d.clients["w00"].on_shares(tampered)
    assert [(r.reason, r.worker) for r in rejections] == [("bad_share", b.peers[1])]
