"""The task plugin API: what a task must provide and the default training loop.

A task owns the model architecture, each worker's data and the local train/evaluate
functions. fedbus owns everything else (rounds, messaging, aggregation). A user task
subclasses `Task` and implements `build_model` and `worker_data`; the PyTorch
defaults for `train` and `evaluate` cover ordinary classification.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

# make_optimizer used to live here; it is still importable from this module.
from fedbus.tasks.dp_sgd import train_dp_sgd
from fedbus.tasks.optim import SGD, Adam, make_optimizer

# Evaluation has no backward pass, so large batches only cost memory.
EVAL_BATCH_SIZE = 1024


class TrainSettings(BaseModel):
    """Local training hyper-parameters sent to workers with each round.

    Defaults chosen with benchmarks/digits_inprocess.py (10 workers, digits,
    Dirichlet(0.5), MLP): over seeds 0-9 server test accuracy reaches 0.95 by round 16
    and stays there from round 19 at the latest, at about 5 ms of train+eval per
    worker per round.
    lr=0.2 converged faster for the MLP but made the CNN diverge, and one epoch
    of batch 32 (4 steps a round) needed more than 25 rounds.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # inf/nan in lr etc. would crash training

    epochs: int = Field(default=3, ge=1)
    batch_size: int = Field(default=16, ge=1)
    lr: float = Field(default=0.1, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    optimizer: Literal["sgd", "adam"] = "sgd"
    # FedProx: (mu/2) * ||w - w_global||^2 is added to the loss when mu > 0.
    proximal_mu: float = Field(default=0.0, ge=0)
    # Sample-level DP-SGD through Opacus in the default train loop when > 0 (fedbus/tasks/dp_sgd.py);
    # its ε is reported apart, as dp_sgd_epsilon. Flat scalars: round.open carries these settings.
    dp_sgd_noise_multiplier: float = Field(default=0.0, ge=0, le=1e4,
                                           description="σ of DP-SGD (noise std over the per-example clip); 0: off")
    dp_sgd_max_grad_norm: float = Field(default=1.0, gt=0, le=1e6,
                                        description="DP-SGD clips every example's gradient to this L2 norm")
    dp_sgd_delta: float = Field(default=1e-5, gt=0, lt=1, description="δ at which dp_sgd_epsilon is reported")


@dataclass(frozen=True)
class TrainingContext:
    """Who is training what: handed to `Task.train` and `Task.evaluate` as `context=`.

    A deployed worker and a simulated one build it the same way (`training_context`),
    so a task that keys per-worker state on `worker_id` behaves the same in both.
    `round` is the synchronous round (or, in asynchronous mode, the base model version);
    `run` is the coordinator run the work answers (None when the coordinator names none).

    `seed` is for reproducibility only (data order, dropout, augmentation): it is
    derived from public values, so anyone can recompute it. Randomness that protects
    privacy (DP noise, secure-aggregation masks) must never come from it; it comes from
    `os.urandom` / `secrets` (a CSPRNG) in the transform that needs it.
    """

    worker_id: str
    partition: int
    num_partitions: int
    run: str | None
    round: int
    seed: int


def derive_seed(job_seed: int, run: str | None, worker_id: str, round_: int) -> int:
    """A 63-bit training seed, distinct per (job seed, run, worker, round).

    BLAKE2b over an unambiguous encoding of the four values (first 8 bytes, top bit
    cleared so every torch/numpy seeding API takes it). Not secret: see TrainingContext.
    """
    material = "\x1f".join(("fedbus-train-seed-v1", str(int(job_seed)), run or "", worker_id, str(int(round_))))
    digest = hashlib.blake2b(material.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & ((1 << 63) - 1)


def training_context(*, job_seed: int, run: str | None, worker_id: str, partition: int, num_partitions: int,
                     round_: int, seed_with_run: bool = True) -> TrainingContext:
    """The context of one round's work. ``seed_with_run=False`` (a job's ``deterministic`` mode)
    leaves the run out of the seed, so a rerun of the job (a new run) trains identically."""
    seed = derive_seed(job_seed, run if seed_with_run else None, worker_id, round_)
    return TrainingContext(worker_id=worker_id, partition=partition, num_partitions=num_partitions, run=run,
                           round=round_, seed=seed)


def accepts_context(method) -> bool:
    """Whether a task's train/evaluate takes ``context=`` (user tasks written before it existed do not)."""
    try:
        params = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "context" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) or p.kind == p.VAR_KEYWORD
               for p in params)


def call_train(task: Task, model: nn.Module, dataset: Dataset, settings: TrainSettings, *,
               context: TrainingContext, global_state: Mapping[str, torch.Tensor] | None = None,
               **extra: Any) -> TrainResult:
    """``task.train`` with the context's seed, passing ``context=`` only to tasks that accept it."""
    if accepts_context(task.train):
        extra["context"] = context
    return task.train(model, dataset, settings, seed=context.seed, global_state=global_state, **extra)


def call_evaluate(task: Task, model: nn.Module, dataset: Dataset, *, context: TrainingContext | None) -> EvalResult:
    if context is not None and accepts_context(task.evaluate):
        return task.evaluate(model, dataset, context=context)
    return task.evaluate(model, dataset)


@dataclass
class WorkerData:
    """One worker's private data: `train` to fit on, `val` to report on."""

    train: Dataset
    val: Dataset


@dataclass
class TrainResult:
    """Outcome of one local training call.

    `num_samples` is the size of the training set (the FedAvg weight), not the
    number of samples seen over all epochs.
    """

    num_samples: int
    num_steps: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class EvalResult:
    """Outcome of evaluating a model on a dataset (loss and accuracy are means)."""

    num_samples: int
    loss: float
    accuracy: float
    metrics: dict[str, float] = field(default_factory=dict)


class TaskParamsError(ValueError):
    """A task's `task_params` do not match what the task accepts."""


ParamsT = TypeVar("ParamsT", bound=BaseModel)


def parse_task_params(
    params_model: type[ParamsT], params: Mapping[str, Any] | None, task_name: str
) -> ParamsT:
    """Validate a job spec's task_params, turning pydantic's report into one readable line per problem."""
    try:
        return params_model.model_validate(dict(params or {}))
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(part) for part in err["loc"]) or "(params)"
            problems.append(f"{where}: {err['msg']} (got {err.get('input')!r})")
        allowed = ", ".join(params_model.model_fields)
        raise TaskParamsError(
            f"invalid task_params for {task_name}: " + "; ".join(problems) + f". Accepted keys: {allowed}"
        ) from None


class Task:
    """Base class for fedbus tasks.

    Subclasses must implement `build_model` and `worker_data`; they may override
    `server_test_data`, `loss`, `train` and `evaluate`.

    About seeds: `worker_data` receives the *job* seed, the same on every worker,
    because all workers must derive the same global partition to take disjoint
    shares of it. `train` receives a seed that differs per worker, run and round
    (`derive_seed`), and, if its signature accepts it, a keyword `context`
    (`TrainingContext`: worker id, partition, run, round, the same seed); so does
    `evaluate`. Tasks whose `train`/`evaluate` take no `context` keep working.
    """

    name: str = "task"
    # How many federated rounds this task needs with default settings; a hint for
    # tools that start jobs without an explicit round count (None: no opinion).
    suggested_rounds: int | None = None

    # --- what a user implements -------------------------------------------------

    def build_model(self, params: Mapping[str, Any] | None) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} must implement build_model(params)")

    def worker_data(
        self, partition: int, num_partitions: int, params: Mapping[str, Any] | None, seed: int
    ) -> WorkerData:
        raise NotImplementedError(
            f"{type(self).__name__} must implement worker_data(partition, num_partitions, params, seed)"
        )

    def server_test_data(self, params: Mapping[str, Any] | None, seed: int) -> Dataset | None:
        """The coordinator's held-out test set; None when the task has none."""
        return None

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean loss over a batch; override for tasks that are not classification."""
        return F.cross_entropy(outputs, targets)

    # --- defaults -----------------------------------------------------------------

    def train(
        self,
        model: nn.Module,
        dataset: Dataset,
        settings: TrainSettings,
        seed: int,
        global_state: Mapping[str, torch.Tensor] | None = None,
        *,
        grad_correction: Mapping[str, torch.Tensor] | None = None,
        context: TrainingContext | None = None,
    ) -> TrainResult:
        """Minibatch training; returns the mean objective and accuracy over all epochs.

        With `settings.proximal_mu > 0` the objective is FedProx's
        loss + (mu/2)·||w − w_global||², where w_global comes from `global_state`
        (parameter name -> tensor). When `global_state` is None the weights the
        model has on entry are used, which are the global weights in the normal flow.
        metrics["loss"] is that objective; metrics["proximal"] its FedProx part.

        `grad_correction` (parameter name -> tensor of the parameter's shape) is added
        to each trainable parameter's gradient after every backward pass and before
        the optimizer step (so before weight decay and momentum): SCAFFOLD passes
        c − c_i here. Every trainable parameter needs an entry (KeyError otherwise);
        extra entries, e.g. for buffers, are ignored. A parameter the loss does not
        reach gets the correction alone as its gradient.

        `context` says which worker, partition, run and round this is; the default
        loop needs only `seed` (which is `context.seed` when fedbus calls it).
        """
        num_samples = len(dataset)  # type: ignore[arg-type]
        if settings.dp_sgd_noise_multiplier > 0:
            if settings.proximal_mu > 0 or grad_correction is not None:
                raise ValueError("dp_sgd does not support FedProx's proximal term or SCAFFOLD's gradient correction")
            engines = self.__dict__.setdefault("_dp_sgd_engines", {})  # per worker id: ε composes over rounds
            steps, metrics = train_dp_sgd(model, dataset, settings, seed, engines,
                                          context.worker_id if context is not None else "", self.loss)
            return TrainResult(num_samples=num_samples, num_steps=steps, metrics=metrics)
        model.train()
        optimizer = make_optimizer(model, settings)
        anchors = _proximal_anchors(model, global_state) if settings.proximal_mu > 0 else None
        corrections = _gradient_corrections(model, grad_correction) if grad_correction is not None else None

        # Per-step values are kept as tensors and reduced once at the end: a
        # conversion to Python per step costs a device sync (GPU) or a few
        # extra ops (CPU), which shows at a few milliseconds per round.
        objectives: list[torch.Tensor] = []
        proximals: list[torch.Tensor] = []
        corrects: list[torch.Tensor] = []
        batch_sizes: list[int] = []
        # One generator for all epochs, so each epoch gets a fresh order from the same seed.
        generator = torch.Generator().manual_seed(seed)
        for _epoch in range(settings.epochs):
            for inputs, targets in shuffled_batches(dataset, settings.batch_size, generator):
                outputs = model(inputs)
                objective = self.loss(outputs, targets)
                if anchors is not None:
                    proximal = _proximal_term(anchors, settings.proximal_mu)
                    objective = objective + proximal
                    proximals.append(proximal.detach())
                optimizer.zero_grad(set_to_none=True)
                objective.backward()
                if corrections is not None:
                    _apply_corrections(corrections)
                optimizer.step()
                objectives.append(objective.detach())
                correct = _count_correct(outputs, targets)
                if correct is not None:
                    corrects.append(correct)
                batch_sizes.append(len(targets))

        metrics: dict[str, float] = {}
        num_seen = sum(batch_sizes)
        if num_seen:
            metrics["loss"] = _weighted_mean(objectives, batch_sizes)
            metrics["accuracy"] = float(torch.stack(corrects).sum()) / num_seen if corrects else 0.0
            if anchors is not None:
                metrics["proximal"] = _weighted_mean(proximals, batch_sizes)
        num_steps = len(batch_sizes)
        return TrainResult(num_samples=num_samples, num_steps=num_steps, metrics=metrics)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset: Dataset, *, context: TrainingContext | None = None) -> EvalResult:
        """Mean loss and accuracy. An empty dataset gives zeros with num_samples=0,
        so sample-weighted averages ignore it (NaN would poison unweighted ones)."""
        was_training = model.training
        model.eval()
        try:
            sum_loss = 0.0
            num_correct = 0
            num_seen = 0
            for inputs, targets in ordered_batches(dataset, EVAL_BATCH_SIZE):
                outputs = model(inputs)
                sum_loss += float(self.loss(outputs, targets)) * len(targets)
                correct = _count_correct(outputs, targets)
                num_correct += int(correct) if correct is not None else 0
                num_seen += len(targets)
        finally:
            model.train(was_training)
        if num_seen == 0:
            return EvalResult(num_samples=0, loss=0.0, accuracy=0.0)
        return EvalResult(num_samples=num_seen, loss=sum_loss / num_seen, accuracy=num_correct / num_seen)


def warm_up_torch() -> None:
    """Pay PyTorch's one-time costs now rather than inside the first round.

    Runs a forward pass, a backward pass and both default optimizers (two steps each,
    so SGD's momentum update and Adam's state both run) on a tiny layer. It does not
    touch torch.optim, whose first use imports torch._dynamo (over a second and some
    70 MB per process); the default train loop does not need it (see fedbus.tasks.optim).
    """
    layer = nn.Linear(2, 2)
    inputs, targets = torch.zeros(4, 2), torch.zeros(4, dtype=torch.int64)
    for optimizer in (SGD(layer.parameters(), lr=0.1, momentum=0.9), Adam(layer.parameters(), lr=0.1)):
        for _ in range(2):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(layer(inputs), targets).backward()
            optimizer.step()
    with torch.no_grad():
        layer(inputs)


def shuffled_batches(
    dataset: Dataset, batch_size: int, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of shuffled minibatches, the order drawn from `generator`."""
    if isinstance(dataset, TensorDataset):
        # Indexing the tensors directly is an order of magnitude faster than a
        # DataLoader on small data, and a round's budget is a few milliseconds.
        inputs, targets = dataset.tensors[0], dataset.tensors[1]
        order = torch.randperm(len(targets), generator=generator)
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            yield inputs[index], targets[index]
    else:
        yield from DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)


def ordered_batches(dataset: Dataset, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(dataset, TensorDataset):
        inputs, targets = dataset.tensors[0], dataset.tensors[1]
        for start in range(0, len(targets), batch_size):
            yield inputs[start : start + batch_size], targets[start : start + batch_size]
    else:
        yield from DataLoader(dataset, batch_size=batch_size, shuffle=False)


def _count_correct(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
    """Correct predictions in a batch (a 0-d tensor); None when outputs are not class
    logits against integer labels, in which case accuracy is reported as 0."""
    if outputs.dim() != 2 or targets.dim() != 1 or targets.is_floating_point():
        return None
    return (outputs.detach().argmax(dim=1) == targets).sum()


def _weighted_mean(values: list[torch.Tensor], weights: list[int]) -> float:
    stacked = torch.stack(values).to(torch.float64)
    return float((stacked * torch.tensor(weights, dtype=torch.float64)).sum()) / sum(weights)


def _proximal_anchors(
    model: nn.Module, global_state: Mapping[str, torch.Tensor] | None
) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """Pair each trainable parameter with the (constant) global weight it is pulled towards."""
    pairs = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if global_state is None:
            anchor = param.detach().clone()
        elif name in global_state:
            anchor = torch.as_tensor(global_state[name]).detach().to(dtype=param.dtype, device=param.device)
        else:
            raise KeyError(f"proximal_mu > 0 but global_state has no entry for parameter {name!r}")
        if anchor.shape != param.shape:
            raise ValueError(
                f"global_state[{name!r}] has shape {tuple(anchor.shape)}, model has {tuple(param.shape)}"
            )
        pairs.append((param, anchor))
    return pairs


def _gradient_corrections(
    model: nn.Module, grad_correction: Mapping[str, torch.Tensor]
) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """Pair each trainable parameter with the constant added to its gradient every step."""
    pairs = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name not in grad_correction:
            raise KeyError(f"grad_correction has no entry for parameter {name!r}")
        correction = torch.as_tensor(grad_correction[name]).detach().to(dtype=param.dtype, device=param.device)
        if correction.shape != param.shape:
            raise ValueError(
                f"grad_correction[{name!r}] has shape {tuple(correction.shape)}, model has {tuple(param.shape)}"
            )
        pairs.append((param, correction))
    return pairs


def _apply_corrections(corrections: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
    for param, correction in corrections:
        if param.grad is None:
            param.grad = correction.clone()
        else:
            param.grad.add_(correction)


def _proximal_term(anchors: list[tuple[nn.Parameter, torch.Tensor]], mu: float) -> torch.Tensor:
    squared_distance = sum(((param - anchor) ** 2).sum() for param, anchor in anchors)
    return (mu / 2.0) * squared_distance  # type: ignore[operator]

