"""In-process FedAvg on the digits task, for choosing defaults (not the production path).

Everything runs in one process with no bus, no signing and no serialization: it
measures what the task itself costs and how fast FedAvg converges with given
local TrainSettings. Per-worker times are measured with one torch thread, as the
worker processes run.

    python benchmarks/digits_inprocess.py                      # defaults, 3 seeds, per-round tables
    python benchmarks/digits_inprocess.py --epochs 2 --lr 0.1  # try other settings
    python benchmarks/digits_inprocess.py --sweep              # a small grid, one summary line each
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from fedbus.tasks import TrainSettings, load_task, warm_up_torch
from fedbus.tasks.base import Task

TARGETS = (0.93, 0.95)


@dataclass
class RoundRow:
    round: int
    test_accuracy: float
    test_loss: float
    train_loss: float
    val_accuracy: float
    worker_ms_mean: float
    worker_ms_max: float
    round_ms: float


@dataclass
class RunSummary:
    seed: int
    rows: list[RoundRow] = field(default_factory=list)
    worker_ms: list[float] = field(default_factory=list)  # every worker's train+eval, every round

    def first_round_reaching(self, target: float) -> int | None:
        return next((row.round for row in self.rows if row.test_accuracy >= target), None)

    def first_round_staying_at(self, target: float) -> int | None:
        """The round from which accuracy never drops below target again (within this run)."""
        stable = None
        for row in self.rows:
            if row.test_accuracy < target:
                stable = None
            elif stable is None:
                stable = row.round
        return stable

    @property
    def final_accuracy(self) -> float:
        return self.rows[-1].test_accuracy


def fedavg(states: list[dict[str, torch.Tensor]], weights: list[int]) -> dict[str, torch.Tensor]:
    """Sample-weighted mean of floating-point entries; integer buffers (e.g. BatchNorm's
    num_batches_tracked) cannot be averaged meaningfully and are copied from the first."""
    total = float(sum(weights))
    averaged = {}
    for name, first in states[0].items():
        if first.is_floating_point():
            averaged[name] = sum(state[name] * (w / total) for state, w in zip(states, weights))  # type: ignore[misc]
        else:
            averaged[name] = first.clone()
    return averaged


def local_seed(seed: int, round_number: int, worker: int) -> int:
    return int(np.random.SeedSequence([seed, round_number, worker]).generate_state(1)[0])


def run(task: Task, params: dict, settings: TrainSettings, num_workers: int, rounds: int, seed: int) -> RunSummary:
    torch.manual_seed(seed)  # the initial global model
    global_model = task.build_model(params)
    worker_models = [task.build_model(params) for _ in range(num_workers)]
    worker_data = [task.worker_data(i, num_workers, params, seed) for i in range(num_workers)]
    test_data = task.server_test_data(params, seed)
    assert test_data is not None

    summary = RunSummary(seed=seed)
    for round_number in range(1, rounds + 1):
        round_start = time.perf_counter()
        global_state = {name: t.detach().clone() for name, t in global_model.state_dict().items()}
        states, weights, worker_ms, train_losses, val_results = [], [], [], [], []
        for worker, (model, data) in enumerate(zip(worker_models, worker_data)):
            model.load_state_dict(global_state)
            start = time.perf_counter()
            result = task.train(
                model, data.train, settings, seed=local_seed(seed, round_number, worker), global_state=global_state
            )
            evaluation = task.evaluate(model, data.val)
            worker_ms.append((time.perf_counter() - start) * 1000)
            states.append(model.state_dict())
            weights.append(result.num_samples)
            train_losses.append(result.metrics["loss"])
            val_results.append(evaluation)
        summary.worker_ms += worker_ms
        global_model.load_state_dict(fedavg(states, weights))
        test = task.evaluate(global_model, test_data)
        val_seen = sum(ev.num_samples for ev in val_results)
        summary.rows.append(
            RoundRow(
                round=round_number,
                test_accuracy=test.accuracy,
                test_loss=test.loss,
                train_loss=statistics.fmean(train_losses),
                val_accuracy=sum(ev.accuracy * ev.num_samples for ev in val_results) / max(val_seen, 1),
                worker_ms_mean=statistics.fmean(worker_ms),
                worker_ms_max=max(worker_ms),
                round_ms=(time.perf_counter() - round_start) * 1000,
            )
        )
    return summary


def print_table(summary: RunSummary) -> None:
    print(f"\nseed {summary.seed}")
    print("round  test_acc  test_loss  train_loss  val_acc  worker_ms(mean/max)  round_ms")
    for row in summary.rows:
        print(
            f"{row.round:5d}  {row.test_accuracy:8.4f}  {row.test_loss:9.4f}  {row.train_loss:10.4f}  "
            f"{row.val_accuracy:7.4f}  {row.worker_ms_mean:8.2f} / {row.worker_ms_max:6.2f}  {row.round_ms:8.1f}"
        )


def describe(summaries: list[RunSummary]) -> str:
    parts = []
    for s in summaries:
        reach = "/".join(str(s.first_round_reaching(t) or "-") for t in TARGETS)
        stays = s.first_round_staying_at(TARGETS[-1]) or "-"
        parts.append(f"seed {s.seed}: final {s.final_accuracy:.4f} r{reach} stays>={TARGETS[-1]} r{stays}")
    worker_ms = [ms for s in summaries for ms in s.worker_ms]
    p90 = statistics.quantiles(worker_ms, n=10)[-1]
    timing = f"worker train+eval median {statistics.median(worker_ms):.2f} ms, p90 {p90:.2f} ms"
    return "; ".join(parts) + f"; {timing}"


def main() -> None:
    defaults = TrainSettings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=None, help="default: the task's suggested_rounds")
    parser.add_argument("--partition", choices=["iid", "dirichlet"], default="dirichlet")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--momentum", type=float, default=defaults.momentum)
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default=defaults.optimizer)
    parser.add_argument("--mu", type=float, default=defaults.proximal_mu, help="FedProx proximal_mu")
    parser.add_argument("--sweep", action="store_true", help="grid over epochs, lr and batch size")
    parser.add_argument("--quiet", action="store_true", help="summaries only, no per-round tables")
    args = parser.parse_args()

    torch.set_num_threads(1)  # as the worker processes do
    warm_up_torch()
    task = load_task("fedbus.tasks.digits:task")
    rounds = args.rounds or task.suggested_rounds or 20
    params = {"model": args.model, "hidden": args.hidden, "partition": args.partition, "alpha": args.alpha}

    if args.sweep:
        grid = itertools.product([1, 2, 3, 5], [0.05, 0.1, 0.2], [16, 32])
        candidates = [
            TrainSettings(epochs=e, lr=lr, batch_size=b, momentum=args.momentum, optimizer=args.optimizer)
            for e, lr, b in grid
        ]
    else:
        candidates = [
            TrainSettings(
                epochs=args.epochs,
                batch_size=args.batch_size,
                lr=args.lr,
                momentum=args.momentum,
                optimizer=args.optimizer,
                proximal_mu=args.mu,
            )
        ]

    print(f"task_params={params} workers={args.workers} rounds={rounds} seeds={args.seeds}")
    for settings in candidates:
        summaries = [run(task, params, settings, args.workers, rounds, seed) for seed in args.seeds]
        if not (args.sweep or args.quiet):
            for summary in summaries:
                print_table(summary)
        label = f"epochs={settings.epochs} lr={settings.lr} bs={settings.batch_size} mom={settings.momentum}"
        print(f"{label}: {describe(summaries)}", flush=True)


if __name__ == "__main__":
    main()
