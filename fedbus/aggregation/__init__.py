"""Aggregation: strategies (how contributions become a proposal) and server optimizers.

Each rule and optimizer lives in its own module with its formula and paper; ``specs``
turns the job spec's ``strategy:`` / ``server_optimizer:`` sections into objects. The
contract (``Contribution``, ``Accumulator``, ``PartialAggregate``) is described in ``base``.
"""

from fedbus.aggregation.base import (Accumulator, AggregationRule, ClientUpdate, Contribution, InvalidUpdate,
                                     RoundAggregator, ServerOptimizer, State, StrategyConfigError, is_averageable,
                                     state_to_tensors)
from fedbus.aggregation.fedavg import FedAvg, WeightedMeanAccumulator
from fedbus.aggregation.fednova import fednova_a
from fedbus.aggregation.norm_bound import NormBound, wrap_norm_bound
from fedbus.aggregation.partial import Contributor, PartialAggregate
from fedbus.aggregation.scaffold import scaffold_client_update
from fedbus.aggregation.staleness import staleness_discount, staleness_weight
from fedbus.aggregation.specs import (ServerOptimizerSpec, StrategySpec, build_rule, build_server_optimizer,
                                      validate_strategy)

__all__ = [
    "Accumulator", "AggregationRule", "ClientUpdate", "Contribution", "Contributor", "FedAvg", "InvalidUpdate",
    "NormBound", "PartialAggregate", "RoundAggregator", "ServerOptimizer", "ServerOptimizerSpec", "State",
    "StrategyConfigError", "StrategySpec", "WeightedMeanAccumulator", "build_rule", "build_server_optimizer",
    "fednova_a", "is_averageable", "scaffold_client_update", "staleness_discount", "staleness_weight",
    "state_to_tensors", "validate_strategy", "wrap_norm_bound",
]
