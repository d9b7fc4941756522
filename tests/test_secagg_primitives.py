"""SecAgg building blocks, checked by hand: Shamir sharing, the graph, fixed point, the PRG."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from fedbus.secagg import shamir
from fedbus.secagg.graph import default_degree, neighbours
from fedbus.secagg.prg import expand, pair_seed
from fedbus.secagg.quantize import Quantizer, QuantizationError
from fedbus.secagg import SecAggAbort, SecAggClient, SecAggServer
from fedbus.secagg.spec import RoundParams, SecureAggregationSpec, quantizer_of


def fixed_bytes(value: int):
    return lambda n: value.to_bytes(n, "little")


def test_shamir_by_hand():
    # f(x) = 7 + 5x: shares 12, 17, 22 at x = 1, 2, 3
    secret = (7).to_bytes(32, "little")
    shares = shamir.split(secret, [1, 2, 3], 2, fixed_bytes(5))
    assert shares == {1: 12, 2: 17, 3: 22}
    # Lagrange at 0 from x = 1, 3: 12·(0-3)/(1-3) + 22·(0-1)/(3-1) = 18 - 11 = 7
    assert shamir.interpolate_at({1: 12, 3: 22}, 0) == 7
    r = shamir.reconstruct({1: 12, 3: 22}, 2, lambda s: s == secret)
    assert r.secret == secret and r.off_polynomial == ()


def test_shamir_any_t_of_n_and_field_size():
    rnd = random.Random(1).randbytes
    secret = rnd(32)
    shares = shamir.split(secret, list(range(1, 11)), 6, rnd)
    assert all(0 <= y < shamir.PRIME for y in shares.values())
    for subset in ([1, 2, 3, 4, 5, 6], [5, 6, 7, 8, 9, 10], [1, 3, 5, 7, 9, 10]):
        assert shamir.reconstruct({x: shares[x] for x in subset}, 6, lambda s: s == secret).secret == secret
    # t - 1 shares: the polynomial through them and any candidate secret exists, so 5 shares fit
    # every secret; reconstruction refuses to run below t
    with pytest.raises(shamir.ShamirError):
        shamir.reconstruct({x: shares[x] for x in range(1, 6)}, 6, lambda s: True)
    assert shamir.y_from_bytes(shamir.y_to_bytes(shares[1])) == shares[1]
    with pytest.raises(shamir.ShamirError):
        shamir.y_from_bytes(shamir.PRIME.to_bytes(shamir.Y_BYTES, "little"))


def test_shamir_bad_share_is_found_and_routed_around():
    rnd = random.Random(2).randbytes
    secret = rnd(32)
    shares = shamir.split(secret, [1, 2, 3, 4, 5], 3, rnd)
    shares[1] = (shares[1] + 1) % shamir.PRIME  # a dealer's off-polynomial share, among the first t
    r = shamir.reconstruct(shares, 3, lambda s: s == secret)
    assert r.secret == secret and r.off_polynomial == (1,)
    # Nothing verifies: no secret, never a wrong one
    assert shamir.reconstruct(shares, 3, lambda s: False).secret is None


def test_graph_is_k_regular_symmetric_and_seeded():
    roster = [f"w{i:03d}" for i in range(100)]
    g = neighbours(roster, 20, b"\x01" * 32)
    assert all(len(nb) == 20 and w not in nb for w, nb in g.items())
    assert all(w in g[v] for w, nb in g.items() for v in nb)
    assert g == neighbours(roster, 20, b"\x01" * 32)
    assert g != neighbours(roster, 20, b"\x02" * 32)
    assert all(len(nb) == 4 for nb in neighbours(roster[:5], 4, b"\x00" * 32).values())  # complete
    assert [default_degree(n) for n in (5, 10, 50, 100, 1000)] == [4, 9, 18, 20, 30]


def test_quantizer_bits_by_hand_and_no_wrap_at_the_extremes():
    q = Quantizer(bound=1.0, scale=2.0**16, max_summands=100)
    # R = 65536, 2·100·R + 1 = 13,107,201 -> ceil(log2) = 24
    assert q.step_range == 65536 and q.bits == 24 == math.ceil(math.log2(13_107_201))
    assert q.sum_error_bound == 100 / 2**17
    for extreme in (1.0, -1.0, 5.0, -5.0):  # beyond the bound: clamped
        total = np.zeros(3, dtype=np.uint64)
        for _ in range(100):
            total += q.quantize(np.full(3, extreme))
        total &= np.uint64((1 << q.bits) - 1)
        assert q.decode_sum(total).tolist() == [100 * 65536 * int(np.sign(extreme))] * 3
    assert q.quantize(np.array([-1 / 2**16])).tolist() == [(1 << 24) - 1]  # two's complement
    with pytest.raises(QuantizationError):
        Quantizer(bound=1e6, scale=2.0**40, max_summands=1000)


def test_pair_seed_is_symmetric_and_bound_to_round_and_pair():
    a, b = random.Random(3).randbytes(32), random.Random(4).randbytes(32)
    from nacl.bindings import crypto_scalarmult_base
    pa, pb = crypto_scalarmult_base(a), crypto_scalarmult_base(b)
    s = pair_seed(a, pb, job="j", round=1, a="x", b="y")
    assert s == pair_seed(b, pa, job="j", round=1, a="y", b="x") and len(s) == 32
    assert s != pair_seed(a, pb, job="j", round=2, a="x", b="y")
    assert s != pair_seed(a, pb, job="k", round=1, a="x", b="y")
    m = expand(s, 1000, 20)
    assert m.dtype == np.uint64 and int(m.max()) < 2**20 and len(set(m.tolist())) > 990
    assert (expand(s, 10, 20) == m[:10]).all()


def test_spec_threshold_is_a_strict_majority_and_params_check_themselves():
    spec = SecureAggregationSpec()
    assert spec.degree_for(5) == 4 and spec.threshold_for(4) == 3
    assert spec.degree_for(100) == 20 and spec.threshold_for(20) == 11
    assert SecureAggregationSpec(threshold=0.8).threshold_for(20) == 17
    with pytest.raises(ValueError):
        SecureAggregationSpec(threshold=0.4)
    with pytest.raises(ValueError):
        SecureAggregationSpec(degree=7)
    p = spec.round_params(job="j", round=1, roster=[f"w{i}" for i in range(5)], seed=bytes(32), length=10, bound=1.0)
    assert quantizer_of(p).bits == p.bits
    with pytest.raises(ValueError):
        RoundParams(**{**p.model_dump(), "threshold": 2})  # not a majority of 5 holders
    with pytest.raises(ValueError):
        RoundParams(**{**p.model_dump(), "roster": ["b", "a", "c"]})
    with pytest.raises(ValueError):
        RoundParams(**{**p.model_dump(), "degree": 3})  # odd, below n - 1
    too_few_bits = RoundParams(**{**p.model_dump(), "bits": 12})  # valid on its own, but the sum could wrap:
    with pytest.raises(ValueError):
        quantizer_of(too_few_bits)
    with pytest.raises(SecAggAbort) as e:  # workers refuse such a round
        SecAggClient("w0", too_few_bits)
    assert e.value.reason == "malformed_setup"
    with pytest.raises(ValueError):
        SecAggServer(too_few_bits)
