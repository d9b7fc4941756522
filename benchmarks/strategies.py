"""Strategy benchmark: digits, 10 workers, Dirichlet(0.1) label skew.

Part 1 (clean): final accuracy and rounds-to-0.90 for FedAvg, FedProx, FedNova,
SCAFFOLD, FedAdam and FedYogi.
Part 2 (attacked): 2 of 10 workers send sign-flipped updates scaled by 5; accuracy of
FedAvg and of each robust rule, next to clean FedAvg, at Dirichlet(0.1) and at the
milder Dirichlet(0.5). Each robust rule runs twice: as the paper defines it, and behind
nearest-neighbour mixing (NNM, Allouah et al. 2023). Under strong label skew a robust rule
cannot tell an honest client with unusual data from an attacker and discards honest
signal; NNM first replaces every update by the mean of its n - f nearest, which makes
the honest inputs agree while the attackers stay outliers.

Runs the real coordinator core (RoundStateMachine, the strategy library) and the real
worker training code (LocalTrainer) in one process per run through ``fedbus.sim``; the
NATS path is exercised by the end-to-end tests. Medians over ``--seeds`` seeds; runs are
spread over ``--jobs`` processes (each with one torch thread).

    python benchmarks/strategies.py [--rounds 30] [--seeds 0 1 2] [--part clean|attacked|all] [--jobs 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import torch

from fedbus.jobspec import JobSpec
from fedbus.sim import simulate
from fedbus.worker.attacks import Attack

ATTACKERS = 2
WITHIN_POINTS = 2.0  # the acceptance bar: a robust rule ends within 2 points of clean FedAvg

CLEAN = [
    ("FedAvg", {"name": "fedavg"}, {"name": "sgd"}),
    ("FedProx (mu=0.01)", {"name": "fedprox", "mu": 0.01}, {"name": "sgd"}),
    ("FedNova", {"name": "fednova"}, {"name": "sgd"}),
    ("SCAFFOLD", {"name": "scaffold"}, {"name": "sgd"}),
    ("FedAdam (eta=0.01)", {"name": "fedavg"}, {"name": "adam", "lr": 0.01, "tau": 0.001}),
    ("FedYogi (eta=0.01)", {"name": "fedavg"}, {"name": "yogi", "lr": 0.01, "tau": 0.001}),
]

ROBUST = [
    ("Krum (f=2)", {"name": "krum", "f": 2}),
    ("Multi-Krum (f=2, m=6)", {"name": "multi_krum", "f": 2, "m": 6}),
    ("Median", {"name": "median"}),
    ("Trimmed mean (beta=0.2)", {"name": "trimmed_mean", "beta": 0.2}),
    ("Geometric median", {"name": "geometric_median"}),
    ("Bulyan (f=2)", {"name": "bulyan", "f": 2}),
]
NNM = {"f": ATTACKERS}
# Pre-filters and pre-aggregations shown for comparison, not robust rules on their own.
OTHERS = [
    ("FedAvg + norm bound (2.0)", {"name": "fedavg", "norm_bound": {"max_norm": 2.0}}),
    # 8.0: just above the largest honest update norm seen at Dirichlet(0.1) (7.7, round 1)
    ("Median + NNM + norm bound (8.0)", {"name": "median", "nnm": NNM, "norm_bound": {"max_norm": 8.0}}),
    # Bucketing (s=2): 10 updates -> 5 bucket means; the 2 attackers contaminate at most 2 of them.
    ("Median + bucketing (s=2)", {"name": "median", "bucketing": {"s": 2}}),
]

# What robustness costs when nobody attacks.
NO_ATTACK = [
    ("(reference) Median, no attack", {"name": "median"}),
    (f"(reference) Median + NNM (f={ATTACKERS}), no attack", {"name": "median", "nnm": NNM}),
]


@dataclass
class Run:
    strategy: dict
    optimizer: dict
    rounds: int
    seed: int
    alpha: float
    workers: int = 10
    attackers: int = 0
    silent: int = 0  # the first `silent` workers never deliver an update (the honest-only reference)


def workers_for(strategy: dict) -> int:
    # Bulyan needs n >= 4f + 3 = 11 for f = 2: one extra honest worker (and its own clean baseline).
    return 11 if strategy["name"] == "bulyan" else 10


def job(run: Run) -> JobSpec:
    # Evaluation on the coordinator's held-out test set only: the benchmark compares the
    # global model, and skipping federated evaluation keeps the runs short.
    return JobSpec(job="bench", task="fedbus.tasks.digits:task", rounds=run.rounds, seed=run.seed,
                   task_params={"model": "mlp", "partition": "dirichlet", "alpha": run.alpha},
                   cohort={"min_workers": run.workers, "min_updates": run.workers - run.silent},
                   strategy=run.strategy, server_optimizer=run.optimizer,
                   evaluation={"server_test": True, "federated": False, "final_round": False})


def run_one(run: Run) -> tuple[float, int | None]:
    """(final accuracy, rounds to 0.90) of one run."""
    torch.set_num_threads(1)
    attacks = {i: Attack("sign_flip", 5.0, run.seed) for i in range(run.attackers)}
    result = simulate(job(run), run.workers, attacks=attacks, silent=set(range(run.silent)))
    return result.final.get("test_accuracy", 0.0), result.rounds_to(0.90)


class Runner:
    """Collects runs, executes them on a process pool, then answers per-configuration medians."""

    def __init__(self, args):
        self.args = args
        self.pending: list[Run] = []
        # keyed by repr: the dict-valued fields make Run unhashable
        self.results: dict[str, tuple[float, int | None]] = {}

    def runs(self, strategy: dict, optimizer: dict, alpha: float, attackers: int = 0,
             workers: int = 10, silent: int = 0) -> list[Run]:
        return [Run(strategy, optimizer, self.args.rounds, seed, alpha, workers, attackers, silent)
                for seed in self.args.seeds]

    def want(self, *args, **kwargs) -> None:
        self.pending += self.runs(*args, **kwargs)

    def execute(self) -> None:
        todo = list({repr(r): r for r in self.pending if repr(r) not in self.results}.values())
        with ProcessPoolExecutor(self.args.jobs) as pool:
            for run, out in zip(todo, pool.map(run_one, todo)):
                self.results[repr(run)] = out
        self.pending = []

    def summary(self, *args, **kwargs) -> tuple[float, str, list[float]]:
        """Median final accuracy, rounds to 0.90 (median over the seeds that got there), per-seed accuracies."""
        outs = [self.results[repr(r)] for r in self.runs(*args, **kwargs)]
        accs = [a for a, _ in outs]
        reached = [r for _, r in outs if r is not None]
        rtt = f"{statistics.median(reached):g} ({len(reached)}/{len(accs)})" if reached else f"never (0/{len(accs)})"
        return statistics.median(accs), rtt, accs


def per_seed(accs: list[float]) -> str:
    return " ".join(f"{a:.3f}" for a in accs)


def attacked_rows() -> list[tuple[str, dict, str]]:
    """(label, strategy, group) for the attacked table; the bar is counted per group of robust rules."""
    rows: list[tuple[str, dict, str]] = [("FedAvg", {"name": "fedavg"}, "")]
    for name, strategy in ROBUST:
        rows.append((name, strategy, "as published"))
        rows.append((f"{name} + NNM (f={ATTACKERS})", {**strategy, "nnm": NNM}, "behind NNM"))
    rows += [(name, strategy, "") for name, strategy in OTHERS]
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--attack-alpha", type=float, nargs="+", default=[0.1, 0.5],
                   help="Dirichlet concentrations for the attacked part")
    p.add_argument("--part", choices=["clean", "attacked", "all"], default="all")
    p.add_argument("--jobs", type=int, default=2, help="worker processes for the runs")
    args = p.parse_args()
    print(f"digits, MLP, {args.rounds} rounds, seeds {args.seeds} (medians); clean part at Dirichlet({args.alpha})\n")
    started = time.perf_counter()
    runner = Runner(args)
    sgd = {"name": "sgd"}
    if args.part in ("clean", "all"):
        for _, strategy, optimizer in CLEAN:
            runner.want(strategy, optimizer, args.alpha)
    if args.part in ("attacked", "all"):
        for alpha in args.attack_alpha:
            for workers in (10, 11):
                runner.want({"name": "fedavg"}, sgd, alpha, workers=workers)
            runner.want({"name": "fedavg"}, sgd, alpha, silent=ATTACKERS)
            for _, strategy in NO_ATTACK:
                runner.want(strategy, sgd, alpha)
            for _, strategy, _ in attacked_rows():
                runner.want(strategy, sgd, alpha, ATTACKERS, workers_for(strategy))
    runner.execute()

    if args.part in ("clean", "all"):
        print(f"10 workers, Dirichlet({args.alpha}), no attack")
        print(f"{'strategy':28s} {'final acc':>9s} {'rounds to 0.90':>15s}  per seed")
        for name, strategy, optimizer in CLEAN:
            acc, rtt, accs = runner.summary(strategy, optimizer, args.alpha)
            print(f"{name:28s} {acc:9.4f} {rtt:>15s}  {per_seed(accs)}")
        print()
    if args.part in ("attacked", "all"):
        for alpha in args.attack_alpha:
            clean = {w: runner.summary({"name": "fedavg"}, sgd, alpha, workers=w)[0] for w in (10, 11)}
            print(f"Dirichlet({alpha}): {ATTACKERS} workers attack with sign flip x5 (delta -> -5 delta)")
            print(f"clean FedAvg (no attack): {clean[10]:.4f} with 10 workers, {clean[11]:.4f} with 11 "
                  f"(Bulyan's baseline)")
            print(f"{'rule':44s} {'final acc':>9s} {'vs clean FedAvg':>16s} {'within 2p':>9s}  per seed")
            # What the best possible defence can reach: the attackers' own data is lost to it.
            ref, _, ref_accs = runner.summary({"name": "fedavg"}, sgd, alpha, silent=ATTACKERS)
            print(f"{'(reference) FedAvg over the 8 honest only':44s} {ref:9.4f} {100 * (ref - clean[10]):+15.1f}p "
                  f"{'':>9s}  {per_seed(ref_accs)}")
            for name, strategy in NO_ATTACK:
                acc, _, accs = runner.summary(strategy, sgd, alpha)
                print(f"{name:44s} {acc:9.4f} {100 * (acc - clean[10]):+15.1f}p {'':>9s}  {per_seed(accs)}")
            tally: dict[str, list[bool]] = {}
            for name, strategy, group in attacked_rows():
                workers = workers_for(strategy)
                acc, _, accs = runner.summary(strategy, sgd, alpha, ATTACKERS, workers)
                gap = 100 * (acc - clean[workers])
                ok = gap >= -WITHIN_POINTS
                if group:
                    tally.setdefault(group, []).append(ok)
                label = name + (" [11 workers]" if workers == 11 else "")
                print(f"{label:44s} {acc:9.4f} {gap:+15.1f}p {'yes' if ok else 'no':>9s}  {per_seed(accs)}")
            for group, oks in tally.items():
                print(f"robust rules {group}: {sum(oks)}/{len(oks)} within {WITHIN_POINTS:g} points of clean FedAvg")
            print()
    print(f"({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
