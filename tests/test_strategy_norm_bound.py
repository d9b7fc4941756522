"""Norm bounding (Sun et al. 2019): Δ_i' = Δ_i · min(1, M/||Δ_i||), one L2 norm over all float tensors."""

from __future__ import annotations

import pytest
import torch

from fedbus.aggregation.base import ClientUpdate
from fedbus.aggregation.fedavg import FedAvg
from fedbus.aggregation.median import CoordinateMedian
from fedbus.aggregation.norm_bound import NormBound, clip_update, wrap_norm_bound
from fedbus.aggregation.scaffold import Scaffold


def run(rule, g, updates):
    agg = rule.begin(g)
    for u in updates:
        agg.add(u)
    return agg.result(), agg


G = {"w": torch.tensor([1.0]), "b": torch.tensor([1.0]), "nbt": torch.tensor(3)}


def test_clip_uses_one_norm_over_all_tensors():
    # Δ = (w: 3, b: 4): ||Δ|| = 5 > M = 2.5 -> scale 0.5 -> (1.5, 2) -> y' = (2.5, 3); the counter is untouched
    u = ClientUpdate("a", 1, {"w": torch.tensor([4.0]), "b": torch.tensor([5.0]), "nbt": torch.tensor(9)})
    clipped, norm = clip_update(G, u, 2.5)
    assert norm == 5.0
    assert clipped.state["w"].tolist() == [2.5] and clipped.state["b"].tolist() == [3.0]
    assert clipped.state["nbt"].item() == 9


def test_fedavg_behind_norm_bound():
    # a: Δ = (3, 4), norm 5 -> clipped to (1.5, 2) -> y' = (2.5, 3)
    # b: Δ = (0.3, 0.4), norm 0.5 <= 2.5 -> unchanged y = (1.3, 1.4)
    # FedAvg, n = 1, 1: w = (2.5 + 1.3)/2 = 1.9, b = (3 + 1.4)/2 = 2.2; nbt: increments 6, 0 -> 3 -> 6
    rule = wrap_norm_bound(FedAvg(), 2.5)
    assert isinstance(rule, NormBound) and rule.streaming and rule.name == "fedavg"
    out, agg = run(rule, G, [
        ClientUpdate("a", 1, {"w": torch.tensor([4.0]), "b": torch.tensor([5.0]), "nbt": torch.tensor(9)}),
        ClientUpdate("b", 1, {"w": torch.tensor([1.3]), "b": torch.tensor([1.4]), "nbt": torch.tensor(3)})])
    assert out["w"].tolist() == pytest.approx([1.9]) and out["b"].tolist() == pytest.approx([2.2])
    assert out["nbt"].item() == 6
    assert agg.clipped == 1 and agg.count == 2


def test_with_a_buffered_rule_and_extras_pass_through():
    # median of Δ_w after clipping to 1: (10 -> 1), (0.5), (-0.25) -> sorted [-0.25, 0.5, 1] -> 0.5 -> w = 1.5
    rule = wrap_norm_bound(CoordinateMedian(), 1.0)
    assert not rule.streaming
    g = {"w": torch.tensor([1.0])}
    ups = [ClientUpdate(str(i), 1, {"w": torch.tensor([1.0 + d])}) for i, d in enumerate([10, 0.5, -0.25])]
    out, _ = run(rule, g, ups)
    assert out["w"].tolist() == [1.5]
    # SCAFFOLD behind the filter: Δc travels untouched and commit reaches the inner rule.
    sc = wrap_norm_bound(Scaffold(), 1.0)
    agg = sc.begin(g)
    agg.add(ClientUpdate("a", 1, {"w": torch.tensor([5.0])}, extra={"scaffold_delta_c": {"w": torch.tensor([2.0])}}))
    assert agg.result()["w"].tolist() == [2.0]  # Δ = 4 clipped to 1
    sc.commit(agg, num_workers_total=2)
    assert sc.broadcast()["w"].tolist() == [1.0]  # (1/2) * 2


def test_none_is_no_wrapper():
    rule = FedAvg()
    assert wrap_norm_bound(rule, None) is rule
    with pytest.raises(ValueError):
        NormBound(rule, 0.0)
