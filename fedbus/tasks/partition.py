"""Splitting a labelled dataset among simulated workers.

Every function returns one sorted index array per partition; the arrays are
disjoint, cover every index exactly once and depend only on the arguments (each
worker recomputes the same split from the job seed and keeps its own share).
"""

from __future__ import annotations

import numpy as np

DEFAULT_MIN_SIZE = 10
DEFAULT_MAX_ATTEMPTS = 1000


def iid_partition(labels: np.ndarray, num_partitions: int, seed: int) -> list[np.ndarray]:
    """Uniformly random partitions whose sizes differ by at most one."""
    num_samples = len(labels)
    _check_num_partitions(num_partitions, num_samples)
    order = np.random.default_rng(seed).permutation(num_samples)
    return [np.sort(part) for part in np.array_split(order, num_partitions)]


def dirichlet_partition(
    labels: np.ndarray,
    num_partitions: int,
    alpha: float,
    seed: int,
    min_size: int = DEFAULT_MIN_SIZE,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
) -> list[np.ndarray]:
    """Label-skewed partitions (Hsu et al., 2019): each class is split among the
    partitions in proportions drawn from Dir(alpha); small alpha means each
    partition holds few classes. Draws are repeated until every partition has at
    least `min_size` samples, at most `max_attempts` times.
    """
    labels = np.asarray(labels)
    num_samples = len(labels)
    _check_num_partitions(num_partitions, num_samples)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if min_size * num_partitions > num_samples:
        raise ValueError(
            f"cannot give {num_partitions} partitions at least {min_size} samples each "
            f"from {num_samples} samples; lower min_size or num_partitions"
        )

    rng = np.random.default_rng(seed)
    class_indices = [np.flatnonzero(labels == label) for label in np.unique(labels)]
    smallest = 0
    for _attempt in range(max_attempts):
        parts = _draw_dirichlet_split(class_indices, num_partitions, alpha, rng)
        smallest = min(len(part) for part in parts)
        if smallest >= min_size:
            return [np.sort(part) for part in parts]
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) split of {num_samples} samples into {num_partitions} "
        f"partitions gave every partition >= {min_size} samples in {max_attempts} attempts "
        f"(smallest in the last attempt: {smallest}); raise alpha, or lower min_size or num_partitions"
    )


def _draw_dirichlet_split(
    class_indices: list[np.ndarray], num_partitions: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    pieces: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
    for indices in class_indices:
        shuffled = rng.permutation(indices)
        proportions = rng.dirichlet(np.full(num_partitions, alpha))
        cut_points = (np.cumsum(proportions)[:-1] * len(shuffled)).astype(int)
        for partition, piece in enumerate(np.split(shuffled, cut_points)):
            pieces[partition].append(piece)
    return [np.concatenate(piece_list) for piece_list in pieces]


def _check_num_partitions(num_partitions: int, num_samples: int) -> None:
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    if num_partitions > num_samples:
        raise ValueError(f"cannot split {num_samples} samples into {num_partitions} non-empty partitions")
