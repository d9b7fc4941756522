"""DP-FedAvg's clipping and noise against hand-computed values and the formulas' statistics."""

from __future__ import annotations

import math

import pytest
import torch

from fedbus.aggregation.base import Contribution, InvalidUpdate
from fedbus.privacy.central import DpFedAvg
from fedbus.privacy.noise import central_std, gaussian_like, share_std
from fedbus.transforms.base import LocalUpdate, UpdateContext
from fedbus.transforms.dp_noise import GaussianNoiseShare


def contribution(worker: str, delta: list[float], weight: float = 50.0) -> Contribution:
    return Contribution(worker, 0, weight, {"w": torch.tensor(delta, dtype=torch.float64)})


def test_std_formulas():
    assert central_std(1.5, 2.0) == 3.0  # z · C
    assert share_std(1.0, 2.0, 4) == 1.0  # z · C / sqrt(q)
    with pytest.raises(ValueError):
        share_std(1.0, 2.0, 0)


def test_central_clips_weighs_one_and_averages_by_hand():
    x = {"w": torch.tensor([1.0, 1.0], dtype=torch.float32)}
    rule = DpFedAvg("central", noise_multiplier=1.0, clip=1.0)
    rule_no_noise = rule.begin(x)
    rule_no_noise.noise_std = 0.0
    # ||(3, 4)|| = 5 -> clipped to (0.6, 0.8); ||(0.3, 0.4)|| = 0.5 stays. Weights 1, not 50 and 1000.
    rule_no_noise.fold(contribution("a", [3.0, 4.0], 50.0))
    rule_no_noise.fold(contribution("b", [0.3, 0.4], 1000.0))
    out = rule_no_noise.finalize()
    assert torch.allclose(out["w"], torch.tensor([1.0 + 0.45, 1.0 + 0.6]), atol=1e-7)
    assert rule_no_noise.unclipped == 1.0  # only b was within C


def test_central_noise_is_added_to_the_sum_with_std_z_c():
    x = {"w": torch.zeros(2, dtype=torch.float64)}
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    acc = DpFedAvg("central", noise_multiplier=2.0, clip=0.5, generator=g1).begin(x)
    acc.fold(contribution("a", [3.0, 4.0]))
    acc.fold(contribution("b", [0.0, 0.1]))
    out = acc.finalize()
    # (S + N(0, (z C)^2)) / m with S = (0.3, 0.4) + (0, 0.1), z C = 1, m = 2, the same draw.
    noise = torch.randn(2, dtype=torch.float64, generator=g2) * 1.0
    assert torch.allclose(out["w"], (torch.tensor([0.3, 0.5], dtype=torch.float64) + noise) / 2, atol=1e-12)


def test_central_noise_statistics():
    d = 200_000
    x = {"w": torch.zeros(d, dtype=torch.float64)}
    acc = DpFedAvg("central", noise_multiplier=2.0, clip=0.5, generator=torch.Generator().manual_seed(1)).begin(x)
    for i in range(4):
        acc.fold(Contribution(f"c{i}", 0, 1.0, {"w": torch.zeros(d, dtype=torch.float64)}))
    noise = acc.finalize()["w"]
    # z C / m = 2 * 0.5 / 4 = 0.25 per coordinate; the sample std of 200k draws is within ~0.3%.
    assert abs(float(noise.std()) - 0.25) < 0.25 * 0.01
    assert abs(float(noise.mean())) < 4 * 0.25 / math.sqrt(d)


def test_central_refuses_a_malformed_contribution_before_clipping():
    acc = DpFedAvg("central", 1.0, 1.0).begin({"w": torch.zeros(2)})
    with pytest.raises(InvalidUpdate):
        acc.fold(Contribution("a", 0, 1.0, {"w": torch.zeros(3)}))
    assert acc.count == 0


def test_distributed_server_takes_the_plain_uniform_mean():
    acc = DpFedAvg("distributed", 1.0, 1.0).begin({"w": torch.zeros(2, dtype=torch.float64)})
    acc.fold(contribution("a", [3.0, 4.0], 10.0))  # not clipped again: its noise must stay
    acc.fold(contribution("b", [1.0, 0.0], 90.0))
    assert torch.allclose(acc.finalize()["w"], torch.tensor([2.0, 2.0], dtype=torch.float64))


def _update(state):
    return LocalUpdate(round=1, base_version=0, state=state, num_samples=10, num_steps=1)


def test_worker_noise_share_statistics_and_buffers_untouched():
    d = 100_000
    share = GaussianNoiseShare(noise_multiplier=1.0, clip=2.0, shares=4, generator=torch.Generator().manual_seed(3))
    assert share.std == 1.0
    state = {"w": torch.zeros(d), "steps": torch.tensor(5)}
    ctx = UpdateContext(None, None, {"w": torch.zeros(d), "steps": torch.tensor(5)}, {}, 0)  # type: ignore[arg-type]
    shares = [share.apply(ctx, _update(state)).state for _ in range(4)]
    assert all(s["steps"].item() == 5 and s["steps"].dtype == torch.int64 for s in shares)
    assert all(abs(float(s["w"].std()) - 1.0) < 0.015 for s in shares)
    total = sum(s["w"].double() for s in shares)
    # Four shares sum to the central mechanism's z C = 2.
    assert abs(float(total.std()) - 2.0) < 0.03


def test_gaussian_like_refuses_bad_std():
    with pytest.raises(ValueError):
        gaussian_like({"w": torch.zeros(1)}, float("nan"))


def test_regional_partials_of_clipped_sums_merge_into_the_same_aggregate():
    x = {"w": torch.zeros(2, dtype=torch.float64)}
    rule = DpFedAvg("central", noise_multiplier=1.0, clip=1.0)
    whole, east, west = rule.begin(x), rule.begin(x), rule.begin(x)
    for acc in (whole, east, west):
        acc.noise_std = 0.0
    for i, d in enumerate(([3.0, 4.0], [0.3, 0.4], [0.0, -2.0])):
        whole.fold(contribution(f"c{i}", d))
        (east if i < 2 else west).fold(contribution(f"c{i}", d))
    east.merge(west.partial())  # what the coordinator does with a region's partial
    assert east.unclipped == whole.unclipped == 1.0
    assert torch.allclose(east.finalize()["w"], whole.finalize()["w"])
    assert torch.allclose(whole.finalize()["w"], torch.tensor([0.9, 0.2], dtype=torch.float64) / 3)
