"""The test-only attack as a pipeline stage (only a worker started with --simulate-attack has it)."""

from __future__ import annotations

from typing import ClassVar

from fedbus.transforms.base import LocalUpdate, Transform, UpdateContext
from fedbus.worker.attacks import Attack


class AttackTransform(Transform):
    name: ClassVar[str] = "attack"

    def __init__(self, attack: Attack):
        self.attack = attack

    def apply(self, ctx: UpdateContext, update: LocalUpdate) -> LocalUpdate:
        poisoned = self.attack.poison_update(dict(ctx.global_state), update.state, update.round)
        return update.with_(state=poisoned)
