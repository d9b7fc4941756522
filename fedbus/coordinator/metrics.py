"""Averaging the metrics workers report, weighted by their sample counts (pure)."""

from __future__ import annotations

import math
from collections import Counter


def weighted_means(pairs: list[tuple[float, dict[str, float]]], prefix: str) -> dict[str, float]:
    """Per key, sum(n_i * v_i) / sum(n_i) over the reports that carry the key.

    Non-finite values are skipped (the verifier already refuses them; this keeps the
    summary valid JSON whatever a caller passes).
    """
    totals: Counter[str] = Counter()
    weights: Counter[str] = Counter()
    for n, metrics in pairs:
        for key, value in metrics.items():
            v = float(value)
            if not math.isfinite(v):
                continue
            totals[key] += n * v
            weights[key] += n
    return {f"{prefix}{k}": totals[k] / weights[k] for k in totals if weights[k] > 0}
