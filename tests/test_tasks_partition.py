"""Partitioners: disjoint, complete, reproducible, and Dirichlet is really label-skewed."""

from __future__ import annotations

import numpy as np
import pytest

from fedbus.tasks.partition import dirichlet_partition, iid_partition

NUM_CLASSES = 10


def _labels(num_samples=2000, seed=0):
    return np.random.default_rng(seed).integers(0, NUM_CLASSES, size=num_samples)


def _assert_disjoint_and_covering(parts, num_samples):
    joined = np.concatenate(parts)
    assert len(joined) == num_samples, "some index is missing or repeated"
    assert np.array_equal(np.sort(joined), np.arange(num_samples))


def _mean_label_entropy(parts, labels):
    entropies = []
    for part in parts:
        counts = np.bincount(labels[part], minlength=NUM_CLASSES)
        p = counts[counts > 0] / counts.sum()
        entropies.append(-(p * np.log(p)).sum())
    return float(np.mean(entropies))


@pytest.mark.parametrize("num_partitions", [1, 3, 10, 64])
def test_iid_is_disjoint_covering_and_balanced(num_partitions):
    labels = _labels()
    parts = iid_partition(labels, num_partitions, seed=1)
    assert len(parts) == num_partitions
    _assert_disjoint_and_covering(parts, len(labels))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("alpha", [0.1, 0.5, 5.0])
@pytest.mark.parametrize("num_partitions", [2, 10, 20])
def test_dirichlet_is_disjoint_covering_and_respects_min_size(alpha, num_partitions):
    labels = _labels()
    parts = dirichlet_partition(labels, num_partitions, alpha=alpha, seed=3, min_size=20)
    assert len(parts) == num_partitions
    _assert_disjoint_and_covering(parts, len(labels))
    assert min(len(p) for p in parts) >= 20


def test_partitions_are_deterministic_for_a_seed_and_vary_across_seeds():
    labels = _labels()
    for split in (
        lambda seed: iid_partition(labels, 10, seed),
        lambda seed: dirichlet_partition(labels, 10, alpha=0.5, seed=seed),
    ):
        first, again, other = split(7), split(7), split(8)
        assert all(np.array_equal(a, b) for a, b in zip(first, again))
        assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_partitions_are_sorted_index_arrays():
    labels = _labels()
    for part in dirichlet_partition(labels, 5, alpha=1.0, seed=0):
        assert part.dtype.kind == "i"
        assert np.all(np.diff(part) > 0)


def test_small_alpha_is_visibly_non_iid():
    labels = _labels()
    iid_entropy = _mean_label_entropy(iid_partition(labels, 10, seed=0), labels)
    skewed_entropy = _mean_label_entropy(dirichlet_partition(labels, 10, alpha=0.1, seed=0), labels)
    mild_entropy = _mean_label_entropy(dirichlet_partition(labels, 10, alpha=100.0, seed=0), labels)
    # IID partitions hold all 10 classes almost evenly: entropy close to log(10).
    assert iid_entropy > 0.97 * np.log(NUM_CLASSES)
    assert skewed_entropy < 0.6 * iid_entropy
    # A large alpha approaches IID.
    assert mild_entropy > 0.95 * iid_entropy


def test_impossible_min_size_fails_fast_with_a_clear_error():
    labels = _labels(100)
    with pytest.raises(ValueError, match="at least 20 samples"):
        dirichlet_partition(labels, 10, alpha=0.5, seed=0, min_size=20)


def test_unreachable_min_size_gives_up_after_bounded_attempts():
    # Feasible on paper (10 x 9 <= 100) but Dir(0.01) almost never spreads samples that evenly.
    labels = _labels(100)
    with pytest.raises(ValueError, match=r"in 50 attempts.*raise alpha"):
        dirichlet_partition(labels, 10, alpha=0.01, seed=0, min_size=9, max_attempts=50)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda labels: iid_partition(labels, 0, seed=0), "num_partitions must be >= 1"),
        (lambda labels: iid_partition(labels[:5], 6, seed=0), "cannot split 5 samples"),
        (lambda labels: dirichlet_partition(labels, 5, alpha=0.0, seed=0), "alpha must be > 0"),
    ],
)
def test_bad_arguments_are_rejected(call, message):
    with pytest.raises(ValueError, match=message):
        call(_labels(50))
