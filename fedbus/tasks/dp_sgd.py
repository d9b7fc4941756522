"""Sample-level DP-SGD on a worker (Abadi et al. 2016) through Opacus, for the default train loop.

    train: {dp_sgd_noise_multiplier: 1.0, dp_sgd_max_grad_norm: 1.0, dp_sgd_delta: 1.0e-5}

(flat ``TrainSettings`` scalars, because round.open carries the train settings as scalars).
Each step clips every example's gradient to ``max_grad_norm`` and adds N(0, σ² max_grad_norm²)
to their sum; batches are Poisson-sampled with rate batch_size / samples (Opacus's
``DPDataLoader``), which is what Opacus's RDP accountant assumes.

The guarantee protects one *example* of one worker's data against the updates that worker
sends: a different unit and a different observer than the client-level ε of ``privacy.dp``
(one whole worker, against the released model). The two are never added up or mixed: this
one is reported as ``dp_sgd_epsilon`` in the worker's train metrics (the round rows show
their sample-weighted mean as ``train_dp_sgd_epsilon``; each worker's own value is its
guarantee). It composes over every round the worker trained in this process: one Opacus
accountant per worker id lives with the task object, so a restarted worker process starts
its count again (not persisted: a known gap).

Known limits: Opacus's noise comes from torch's default generator (``secure_mode`` needs
torchcsprng, not installed); momentum and weight decay apply to the privatised gradient
(post-processing, no extra cost). FedProx's proximal term and SCAFFOLD's gradient
correction are not supported with DP-SGD (job validation refuses them).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset


def train_dp_sgd(model: nn.Module, dataset: Dataset, settings, seed: int, engines: dict, worker: str,
                 loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> tuple[int, dict[str, float]]:
    """Train ``model`` in place for ``settings.epochs`` with Opacus; (steps, metrics).

    ``engines`` maps worker id -> its PrivacyEngine, kept across rounds so ε composes.
    """
    from opacus import PrivacyEngine  # optional at import time: only DP-SGD jobs pay for it

    with warnings.catch_warnings():
        # Opacus warns on every call (secure_mode off, hook details, the accountant's alpha range).
        warnings.simplefilter("ignore")
        return _train(PrivacyEngine, model, dataset, settings, seed, engines, worker, loss)


def _train(engine_class, model, dataset, settings, seed, engines, worker, loss) -> tuple[int, dict[str, float]]:
    engine = engines.setdefault(worker, engine_class(accountant="rdp"))
    params = [p for p in model.parameters() if p.requires_grad]
    if settings.optimizer == "adam":
        optimizer: torch.optim.Optimizer = torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum,
                                    weight_decay=settings.weight_decay)
    loader = DataLoader(dataset, batch_size=settings.batch_size, generator=torch.Generator().manual_seed(seed))
    private, optimizer, loader = engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
                                                     noise_multiplier=settings.dp_sgd_noise_multiplier,
                                                     max_grad_norm=settings.dp_sgd_max_grad_norm, poisson_sampling=True)
    steps, seen, total_loss, correct = 0, 0, 0.0, 0
    try:
        private.train()
        for _ in range(settings.epochs):
            for inputs, targets in loader:
                if not len(targets):
                    # Poisson sampling drew an empty batch (probability (1 - q)^n, ~e^-B): skipped, so
                    # the step is neither taken nor accounted. Strictly, the noise-only step should run.
                    continue
                optimizer.zero_grad(set_to_none=True)
                outputs = private(inputs)
                objective = loss(outputs, targets)
                objective.backward()
                seen += len(targets)
                total_loss += float(objective) * len(targets)
                if outputs.dim() == 2:
                    correct += int((outputs.argmax(1) == targets).sum())
                optimizer.step()
                steps += 1
    finally:
        private._close()  # removes Opacus's hooks and per-sample grads: the trainer reuses the model
    metrics = {"dp_sgd_epsilon": float(engine.get_epsilon(settings.dp_sgd_delta))}
    if seen:
        metrics.update(loss=total_loss / seen, accuracy=correct / seen)
    return steps, metrics
