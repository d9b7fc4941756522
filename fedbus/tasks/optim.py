"""The default train loop's optimizers: plain SGD (with momentum) and Adam, in-house.

Why not torch.optim: constructing any torch.optim optimizer imports torch._dynamo
(about 1.3 s of CPU and 70 MB of RSS per process), and every fedbus worker pays that
at start-up for two update rules that are a few tensor operations each. These
classes reproduce torch.optim's CPU (single-tensor, i.e. non-foreach) code path
operation by operation, so on CPU they give bit-identical parameters:

* `SGD` = torch.optim.SGD(params, lr, momentum, weight_decay) with dampening=0,
  nesterov=False, maximize=False: g <- grad + weight_decay·p; the momentum buffer
  starts as a copy of g on the first step and is then b <- momentum·b + g; p <- p − lr·b
  (p <- p − lr·g without momentum).
* `Adam` = torch.optim.Adam(params, lr, betas, eps, weight_decay) with amsgrad=False,
  maximize=False and weight decay as L2 added to the gradient (not AdamW): with step
  t counted per parameter, m <- lerp(m, g, 1 − β1), v <- β2·v + (1 − β2)·g²,
  p <- p − lr/(1 − β1^t) · m / (sqrt(v)/sqrt(1 − β2^t) + eps).

On an accelerator torch.optim switches to its multi-tensor (foreach) kernels, which
round differently in the last bits. A task that wants other optimizers can still
override `Task.train` and use torch.optim freely; only the built-in loop avoids it.
Parameters whose `.grad` is None are skipped, as torch.optim does.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from fedbus.tasks.base import TrainSettings


class LocalOptimizer(Protocol):
    """What the default train loop needs from an optimizer (torch.optim's also qualify)."""

    def zero_grad(self, set_to_none: bool = True) -> None: ...

    def step(self) -> object: ...


class _InHouseOptimizer:
    def __init__(self, params: Iterable[torch.Tensor], lr: float, weight_decay: float):
        if not lr >= 0.0:
            raise ValueError(f"invalid learning rate: {lr}")
        if not weight_decay >= 0.0:
            raise ValueError(f"invalid weight_decay: {weight_decay}")
        self.params: list[torch.Tensor] = list(params)
        if not self.params:
            raise ValueError("optimizer got an empty parameter list")
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.params:
            if param.grad is None:
                continue
            if set_to_none:
                param.grad = None
            else:
                param.grad.detach_()
                param.grad.zero_()

    def _grad(self, param: torch.Tensor) -> torch.Tensor | None:
        grad = param.grad
        if grad is None:
            return None
        if grad.is_sparse:
            raise RuntimeError(
                f"{type(self).__name__} does not support sparse gradients; override Task.train to use torch.optim"
            )
        if self.weight_decay != 0:
            grad = grad.add(param, alpha=self.weight_decay)
        return grad


class SGD(_InHouseOptimizer):
    """torch.optim.SGD with dampening=0 and nesterov=False, for the default train loop."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        super().__init__(params, lr, weight_decay)
        if not momentum >= 0.0:
            raise ValueError(f"invalid momentum value: {momentum}")
        self.momentum = float(momentum)
        self.momentum_buffers: list[torch.Tensor | None] = [None] * len(self.params)

    @torch.no_grad()
    def step(self) -> None:
        for i, param in enumerate(self.params):
            grad = self._grad(param)
            if grad is None:
                continue
            if self.momentum != 0:
                buf = self.momentum_buffers[i]
                if buf is None:
                    buf = grad.detach().clone()
                    self.momentum_buffers[i] = buf
                else:
                    buf.mul_(self.momentum).add_(grad)  # dampening 0: alpha = 1 - 0
                grad = buf
            param.add_(grad, alpha=-self.lr)


class Adam(_InHouseOptimizer):
    """torch.optim.Adam (amsgrad=False, L2 weight decay), for the default train loop."""

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        super().__init__(params, lr, weight_decay)
        beta1, beta2 = betas
        if not 0.0 <= beta1 < 1.0 or not 0.0 <= beta2 < 1.0:
            raise ValueError(f"invalid betas: {betas}")
        if not eps >= 0.0:
            raise ValueError(f"invalid epsilon value: {eps}")
        self.beta1, self.beta2, self.eps = float(beta1), float(beta2), float(eps)
        # Per parameter, created on its first step (as torch.optim does): step count, m, v.
        self.steps: list[int] = [0] * len(self.params)
        self.exp_avgs: list[torch.Tensor | None] = [None] * len(self.params)
        self.exp_avg_sqs: list[torch.Tensor | None] = [None] * len(self.params)

    @torch.no_grad()
    def step(self) -> None:
        for i, param in enumerate(self.params):
            grad = self._grad(param)
            if grad is None:
                continue
            exp_avg, exp_avg_sq = self.exp_avgs[i], self.exp_avg_sqs[i]
            if exp_avg is None or exp_avg_sq is None:
                exp_avg = self.exp_avgs[i] = torch.zeros_like(param, memory_format=torch.preserve_format)
                exp_avg_sq = self.exp_avg_sqs[i] = torch.zeros_like(param, memory_format=torch.preserve_format)
            self.steps[i] += 1
            step = float(self.steps[i])  # torch keeps a float32 step tensor and reads it back with .item()

            if torch.is_complex(param):
                grad = torch.view_as_real(grad)
                exp_avg = torch.view_as_real(exp_avg)
                exp_avg_sq = torch.view_as_real(exp_avg_sq)
                param = torch.view_as_real(param)

            exp_avg.lerp_(grad, 1 - self.beta1)
            exp_avg_sq.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
            bias_correction1 = 1 - self.beta1**step
            bias_correction2 = 1 - self.beta2**step
            step_size = self.lr / bias_correction1
            bias_correction2_sqrt = bias_correction2**0.5
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
            param.addcdiv_(exp_avg, denom, value=-step_size)


def make_optimizer(model: nn.Module, settings: TrainSettings) -> SGD | Adam:
    """The optimizer `settings` asks for, over the model's trainable parameters."""
    # Frozen parameters never get a .grad, so the step skips them.
    params = list(model.parameters())
    if settings.optimizer == "adam":
        return Adam(params, lr=settings.lr, weight_decay=settings.weight_decay)
    return SGD(params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
