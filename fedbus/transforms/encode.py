"""The last stage: the update as it travels (Update body fields + one tensor section).

Model tensors keep their state_dict names; strategy groups are prefixed
(``fedbus.protocol.tensor_groups``). ``decode`` is what the receiver runs first.
"""

from __future__ import annotations

from typing import ClassVar

from fedbus.protocol.codec import Tensor
from fedbus.protocol.messages import Update, finite_metrics
from fedbus.protocol.tensor_groups import join_groups, split_groups
from fedbus.transforms.base import LocalUpdate, Transform, UpdateContext


class Encode(Transform):
    name: ClassVar[str] = "encode"

    def apply(self, ctx: UpdateContext, update: LocalUpdate) -> LocalUpdate:
        fields = Update(round=update.round, base_version=update.base_version, num_samples=update.num_samples,
                        num_steps=update.num_steps, train_metrics=finite_metrics(update.train_metrics),
                        eval_metrics=finite_metrics(update.eval_metrics), eval_samples=update.eval_samples,
                        extra_scalars=update.extra_scalars)
        return update.with_(fields=fields, tensors=join_groups(update.state, update.extra_groups))

    @staticmethod
    def parse(fields: Update, tensors: dict[str, Tensor] | None) -> LocalUpdate:
        state, groups = split_groups(tensors or {})
        return LocalUpdate(round=fields.round, base_version=fields.base_version, state=state,
                           num_samples=fields.num_samples, num_steps=fields.num_steps,
                           train_metrics=dict(fields.train_metrics), eval_metrics=dict(fields.eval_metrics),
                           eval_samples=fields.eval_samples, extra_scalars=dict(fields.extra_scalars),
                           extra_groups=groups, fields=fields, tensors=tensors)
