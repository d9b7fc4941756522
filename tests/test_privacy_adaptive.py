"""Adaptive clipping (Andrew et al. 2021) converges to the target quantile of the update norms,
from above and from below, through the rule fedbus runs (``DpFedAvg.commit``)."""

from __future__ import annotations

import math

import pytest
import torch

from fedbus.aggregation.base import Contribution
from fedbus.privacy.adaptive import next_clip, update_noise_multiplier
from fedbus.privacy.central import DpFedAvg
from fedbus.privacy.spec import AdaptiveClipSpec

MEDIAN = 2.0  # norms = 2 · exp(0.5 · N(0, 1)): log-normal, median 2
COHORT = 100
ROUNDS = 300


def run(initial: float, seed: int) -> list[float]:
    spec = AdaptiveClipSpec(initial=initial, target_quantile=0.5, learning_rate=0.2)
    rule = DpFedAvg("central", noise_multiplier=1.0, clip=initial, adaptive=spec, count_noise=COHORT / 20,
                    generator=torch.Generator().manual_seed(seed))
    norms = torch.Generator().manual_seed(seed + 1)
    base = {"w": torch.zeros(1, dtype=torch.float64)}
    clips = []
    for _ in range(ROUNDS):
        acc = rule.begin(base)
        for i, z in enumerate(torch.randn(COHORT, dtype=torch.float64, generator=norms).tolist()):
            acc.fold(Contribution(f"c{i}", 0, 1.0, {"w": torch.tensor([MEDIAN * math.exp(0.5 * z)])}))
        rule.commit(acc, COHORT)
        clips.append(rule.clip)
    return clips


@pytest.mark.parametrize("initial", [20.0, 0.2], ids=["from_above", "from_below"])
def test_clip_converges_to_the_median_norm(initial):
    clips = run(initial, seed=11)
    # The right direction from the first step on (Flower's was reported to step the wrong way).
    assert (clips[0] < initial) if initial > MEDIAN else (clips[0] > initial)
    # Geometric steps of at most exp(0.2 · 0.5) per round: 10x away takes ~25 rounds.
    settled = clips[100:]
    assert all(abs(c / MEDIAN - 1) < 0.10 for c in settled)
    tail_mean = math.exp(sum(math.log(c) for c in clips[-50:]) / 50)
    assert abs(tail_mean / MEDIAN - 1) < 0.05, tail_mean
    assert abs(clips[-1] / MEDIAN - 1) < 0.05, clips[-1]


def test_geometric_step_and_budget_share_by_hand():
    assert next_clip(1.0, 0.7, 0.5, 0.2) == pytest.approx(math.exp(-0.04))
    # z = 1, σ_b = 5: z_Δ = (1 − 1/100)^(−1/2)
    assert update_noise_multiplier(1.0, 5.0) == pytest.approx(1 / math.sqrt(0.99))
    with pytest.raises(ValueError):
        update_noise_multiplier(2.0, 1.0)


def test_adaptive_clip_is_committed_state():
    spec = AdaptiveClipSpec(initial=1.0)
    rule = DpFedAvg("central", 1.0, 1.0, adaptive=spec, count_noise=5.0)
    rule.clip = 0.37
    other = DpFedAvg("central", 1.0, 1.0, adaptive=spec, count_noise=5.0)
    other.load_state_dict(rule.state_dict())
    assert other.clip == 0.37 and other.describe() == rule.describe()
