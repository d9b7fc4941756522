"""Strategy benchmark: digits, 10 workers, Dirichlet(0.1) label skew.

Part 1 (clean): final accuracy and rounds-to-0.90 for FedAvg, FedProx, FedNova,
SCAFFOLD, FedAdam and FedYogi.
Part 2 (attacked): 2 of 10 workers send sign-flipped updates scaled by 5; accuracy of
FedAvg and of each robust rule, next to clean FedAvg, at Dirichlet(0.1) and at the
milder Dirichlet(0.5) (robust rules discard heterogeneous honest updates too, so label
skew alone costs them accuracy; the two settings separate that cost from the attack's).

Runs the real coordinator core (RoundStateMachine, the strategy library) and the real
worker training code (LocalTrainer) in one process through ``fedbus.sim``; the NATS path
is exercised by the end-to-end tests. Medians over ``--seeds`` seeds.

    python benchmarks/strategies.py [--rounds 30] [--seeds 0 1 2] [--part clean|attacked|all]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from fedbus.jobspec import JobSpec
from fedbus.sim import simulate
from fedbus.worker.attacks import Attack

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
    ("FedAvg + norm bound (2.0)", {"name": "fedavg", "norm_bound": {"max_norm": 2.0}}),
    # Bucketing (s=2): 10 updates -> 5 bucket means; the 2 attackers contaminate at most 2 of them.
    ("Median + bucketing (s=2)", {"name": "median", "bucketing": {"s": 2}}),
    # beta=0.4: b = floor(0.4*5) = 2 buckets trimmed per end, enough for 2 contaminated buckets
    # pushing the same way (beta=0.2 trims only 1); 2b < 5 caps b at 2, so on 5 buckets this
    # trimmed mean keeps only the middle value: it equals the median of the bucket means.
    ("Trimmed mean (beta=0.4) + bucketing (s=2)", {"name": "trimmed_mean", "beta": 0.4, "bucketing": {"s": 2}}),
    ("Geometric median + bucketing (s=2)", {"name": "geometric_median", "bucketing": {"s": 2}}),
]


def job(strategy: dict, optimizer: dict, rounds: int, seed: int, alpha: float, workers: int) -> JobSpec:
    # Evaluation on the coordinator's held-out test set only: the benchmark compares the
    # global model, and skipping federated evaluation keeps the runs short.
    return JobSpec(job="bench", task="fedbus.tasks.digits:task", rounds=rounds, seed=seed,
                   task_params={"model": "mlp", "partition": "dirichlet", "alpha": alpha},
                   cohort={"min_workers": workers, "min_updates": workers},
                   strategy=strategy, server_optimizer=optimizer,
                   evaluation={"server_test": True, "federated": False, "final_round": False})


def run(strategy: dict, optimizer: dict, args, *, alpha: float, attackers: int = 0,
        workers: int = 10) -> tuple[float, str, list[float]]:
    """Median final accuracy, rounds to 0.90 (median over the seeds that got there) and per-seed accuracies."""
    accs, reached = [], []
    for seed in args.seeds:
        attacks = {i: Attack("sign_flip", 5.0, seed) for i in range(attackers)}
        result = simulate(job(strategy, optimizer, args.rounds, seed, alpha, workers), workers, attacks=attacks)
        accs.append(result.final.get("test_accuracy", 0.0))
        if (r := result.rounds_to(0.90)) is not None:
            reached.append(r)
    rtt = f"{statistics.median(reached):g} ({len(reached)}/{len(accs)})" if reached else f"never (0/{len(accs)})"
    return statistics.median(accs), rtt, accs


def per_seed(accs: list[float]) -> str:
    return " ".join(f"{a:.3f}" for a in accs)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--attack-alpha", type=float, nargs="+", default=[0.1, 0.5],
                   help="Dirichlet concentrations for the attacked part")
    p.add_argument("--part", choices=["clean", "attacked", "all"], default="all")
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"digits, 10 workers, {args.rounds} rounds, seeds {args.seeds} (medians); clean part at Dirichlet({args.alpha})\n")
    started = time.perf_counter()
    if args.part in ("clean", "all"):
        print(f"{'strategy':28s} {'final acc':>9s} {'rounds to 0.90':>15s}  per seed")
        for name, strategy, optimizer in CLEAN:
            acc, rtt, accs = run(strategy, optimizer, args, alpha=args.alpha)
            print(f"{name:28s} {acc:9.4f} {rtt:>15s}  {per_seed(accs)}", flush=True)
        print()
    if args.part in ("attacked", "all"):
        for alpha in args.attack_alpha:
            clean, _, _ = run({"name": "fedavg"}, {"name": "sgd"}, args, alpha=alpha)
            print(f"Dirichlet({alpha}): 2 of 10 workers attack with sign flip x5 (delta -> -5 delta)")
            print(f"{'rule':42s} {'final acc':>9s} {'vs clean FedAvg':>16s}  per seed")
            print(f"{'FedAvg, no attack':42s} {clean:9.4f} {'':>16s}")
            rows = [("FedAvg", {"name": "fedavg"})] + ROBUST
            for name, strategy in rows:
                workers = 10
                if strategy["name"] == "bulyan":
                    workers = 11  # Bulyan needs n >= 4f + 3 = 11 for f = 2: one extra honest worker
                    name += " [11 workers]"
                acc, _, accs = run(strategy, {"name": "sgd"}, args, alpha=alpha, attackers=2, workers=workers)
                print(f"{name:42s} {acc:9.4f} {100 * (acc - clean):+15.1f}p  {per_seed(accs)}", flush=True)
            print()
    print(f"\n({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
