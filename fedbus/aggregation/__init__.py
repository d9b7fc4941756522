"""Aggregation: strategies (how a round's updates become a proposal) and server optimizers.

Each rule and optimizer lives in its own module with its formula and paper; ``specs``
turns the job spec's ``strategy:`` / ``server_optimizer:`` sections into objects.
"""

from fedbus.aggregation.base import (AggregationRule, ClientUpdate, InvalidUpdate, RoundAggregator, ServerOptimizer,
                                     State, StrategyConfigError, is_averageable)
from fedbus.aggregation.fedavg import FedAvg, WeightedMeanAccumulator
from fedbus.aggregation.fednova import fednova_a
from fedbus.aggregation.norm_bound import NormBound, wrap_norm_bound
from fedbus.aggregation.scaffold import scaffold_client_update
from fedbus.aggregation.specs import (ServerOptimizerSpec, StrategySpec, build_rule, build_server_optimizer,
                                      validate_strategy)

__all__ = [
    "AggregationRule", "ClientUpdate", "FedAvg", "InvalidUpdate", "NormBound", "RoundAggregator", "ServerOptimizer",
    "ServerOptimizerSpec", "State", "StrategyConfigError", "StrategySpec", "WeightedMeanAccumulator",
    "build_rule", "build_server_optimizer", "fednova_a", "is_averageable", "scaffold_client_update",
    "validate_strategy", "wrap_norm_bound",
]
