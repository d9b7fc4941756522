"""Which aggregation rules can run over secure aggregation's masked sums.

Secure aggregation gives the server one number per coordinate: the sum of the
survivors' (weighted, clipped, quantized) updates. A rule can run over it only if it is
a sum: mergeable, not needing any update on its own. Robust rules (Krum, median,
trimmed mean, Bulyan, geometric median) and the pre-aggregations that compare updates
(NNM, bucketing) need each update in the clear; server-side norm bounding needs each
update's norm. Job validation calls ``secure_aggregation_refusal`` and refuses the
combination with the reason it returns.
"""

from __future__ import annotations

from fedbus.aggregation.base import AggregationRule
from fedbus.aggregation.norm_bound import NormBound


def secure_aggregation_refusal(rule: AggregationRule) -> str | None:
    """Why ``rule`` cannot aggregate masked sums (None: it can)."""
    if isinstance(rule, NormBound):
        return (f"strategy {rule.name}: norm_bound clips each update at the server, which sees only the masked sum; "
                f"with secure aggregation, clip on the workers (privacy.dp clip)")
    if rule.needs_plaintext:
        return (f"strategy {rule.name}: it compares updates with each other (robust rules, nnm, bucketing), and "
                f"secure aggregation shows the server only their sum")
    if not rule.mergeable:
        return f"strategy {rule.name}: it cannot be computed from a sum of updates"
    return None
