"""A bounded run of benchmarks/fuzz_receive.py: mutated, validly signed messages of every
type through the whole receive path; only Rejection may come out, no input may cost more
than 10 MB or 10 ms of CPU, and no pointer that should be refused is ever fetched."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fuzz_receive.py"


@pytest.fixture(scope="module")
def fuzz():
    spec = importlib.util.spec_from_file_location("fuzz_receive", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_receive"] = module
    spec.loader.exec_module(module)
    return module


def test_bounded_fuzz_of_the_receive_path(fuzz):
    res = fuzz.run_fuzz(5_000, seed=7)
    print(fuzz.report(res))
    assert res.inputs == 5_000 and sum(res.outcomes.values()) == 5_000
    assert res.uncaught == []
    assert res.fetch_violations == []
    assert max(res.peak_bytes) < 10 * 2**20
    assert res.over_memory == []
    assert res.over_time == [], res.over_time
    # The mutations reach every layer, not just the signature check.
    deep = {"accepted", "malformed_body", "oversize", "invalid_metrics", "header_mismatch", "pointer_not_allowed",
            "tensor_mismatch", "non_finite", "blob_unavailable", "digest_mismatch", "malformed_header",
            "bad_signature", "stale_timestamp", "future_timestamp"}
    assert deep <= set(res.outcomes), deep - set(res.outcomes)
    # Families that must never be accepted.
    for family in ("zero_size_flood", "round_mismatch", "nested_maps", "numpy_kind"):
        assert "accepted" not in res.by_family[family], (family, res.by_family[family])
    assert set(res.by_family["valid"]) == {"accepted"}


def test_inputs_are_reproducible_from_the_seed(fuzz):
    a, b = fuzz.make_input(3, 123), fuzz.make_input(3, 123)
    assert a.family == b.family
    # timestamps follow the real clock; everything else is fixed by (seed, index)
    assert len(a.wire) == len(b.wire)
