"""Secure aggregation runs only with rules that are sums; the others are refused with a reason."""

from __future__ import annotations

import pytest

from fedbus.aggregation.secure import secure_aggregation_refusal
from fedbus.aggregation.specs import build_rule


@pytest.mark.parametrize("spec", [{"name": "fedavg"}, {"name": "fedprox", "mu": 0.1}, {"name": "fednova"},
                                  {"name": "scaffold"}])
def test_sums_run_over_masked_inputs(spec):
    assert secure_aggregation_refusal(build_rule(spec)) is None


@pytest.mark.parametrize("spec, words", [
    ({"name": "krum", "f": 1}, "compares updates"),
    ({"name": "median"}, "compares updates"),
    ({"name": "trimmed_mean", "beta": 0.1}, "compares updates"),
    ({"name": "bulyan", "f": 1}, "compares updates"),
    ({"name": "geometric_median"}, "compares updates"),
    ({"name": "median", "nnm": {"f": 1}}, "compares updates"),
    ({"name": "fedavg", "norm_bound": {"max_norm": 1.0}}, "clip on the workers"),
])
def test_rules_that_need_plaintext_updates_are_refused_with_the_reason(spec, words):
    reason = secure_aggregation_refusal(build_rule(spec))
    assert reason is not None and words in reason and spec["name"] in reason
