"""What the server receives from one worker looks uniform modulo 2^bits, whatever the input.

Chi-square goodness of fit on the top 4 bits (16 equiprobable bins) of 2^17 coordinates
of one worker's masked input, with seeded randomness (a fixed test). The same statistic
on the unmasked quantized input must be enormous, so the test can tell the two apart.
"""

from __future__ import annotations

import random

import numpy as np
from scipy.stats import chi2, chisquare

from fedbus.secagg.simulate import Dropouts, run_round
from fedbus.secagg.client import SecAggClient
from fedbus.secagg.spec import SecureAggregationSpec, quantizer_of

LENGTH = 1 << 17
BINS = 16
CRITICAL = chi2.ppf(1 - 1e-4, BINS - 1)  # ~ 42.6: a uniform source exceeds it once in 10,000 runs


def top_bits_statistic(residues: np.ndarray, bits: int) -> float:
    top = (residues.astype(np.uint64) >> np.uint64(bits - 4)).astype(np.int64)
    return float(chisquare(np.bincount(top, minlength=BINS)).statistic)


def test_one_workers_masked_input_is_indistinguishable_from_uniform():
    roster = [f"w{i}" for i in range(5)]
    params = SecureAggregationSpec().round_params(job="j", round=1, roster=roster, seed=bytes(32),
                                                  length=LENGTH, bound=1.0)
    q = quantizer_of(params)
    # Inputs as far from uniform as they get: constant zero, constant +bound, a narrow bump
    quantized = {"w0": q.quantize(np.zeros(LENGTH)), "w1": q.quantize(np.ones(LENGTH)),
                 "w2": q.quantize(np.random.default_rng(0).normal(0, 0.01, LENGTH))}
    quantized |= {w: q.quantize(np.zeros(LENGTH)) for w in roster[3:]}
    seen = {}

    class Recorded(SecAggClient):
        def masked_input(self, x):
            seen[self.me] = y = super().masked_input(x)
            return y

    run_round(params, quantized, Dropouts(), random_bytes=random.Random(11).randbytes,
              make_client=lambda w, p, r: Recorded(w, p, r))
    for w in ("w0", "w1", "w2"):
        assert top_bits_statistic(seen[w], params.bits) < CRITICAL, w
        assert top_bits_statistic(quantized[w], params.bits) > 100 * CRITICAL, w
