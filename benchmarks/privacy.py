"""Client-level DP on digits: final accuracy at ε ∈ {1, 3, 8} (δ = 1e-5) and without DP.

Each row is one ``fedbus sim`` run of a job spec that runs unchanged over NATS
(``fedbus coordinator`` / ``fedbus worker``; ``--dump-jobs DIR`` writes them). The noise
multiplier z for a target ε comes from fedbus's accountant (dp-accounting, RDP, replace-one
neighbouring, the job's cohort sampling) by bisection over the job's rounds, and the job's
``max_epsilon`` is the target itself, so the budget would stop the job before exceeding it.
Central DP-FedAvg (fixed clip C, uniform weights; ``fedbus/privacy/central.py``); the
no-DP row is plain FedAvg with the same local training. Medians over ``--seeds``.

    python benchmarks/privacy.py [--workers 10 100] [--rounds 20] [--epochs 5] [--clip 0.3] [--seeds 0 1 2] [--jobs 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from fedbus.jobspec import JobSpec
from fedbus.privacy.accountant import noise_multiplier_for
from fedbus.sim import simulate

DELTA = 1e-5
EPSILONS = (1.0, 3.0, 8.0)


def job_for(workers: int, cohort: int | None, rounds: int, seed: int, clip: float, eps: float | None,
            server_lr: float, epochs: int) -> tuple[JobSpec, float | None]:
    z = None
    spec = {"job": f"dp-digits-{workers}-{'nodp' if eps is None else f'eps{eps:g}'}",
            "task": "fedbus.tasks.digits:task", "task_params": {"model": "mlp", "partition": "iid"},
            "seed": seed, "rounds": rounds,
            "cohort": {"min_workers": workers, "size": cohort, "min_updates": cohort or workers},
            "train": {"epochs": epochs, "batch_size": 16, "lr": 0.1, "momentum": 0.9},
            "server_optimizer": {"name": "sgd", "lr": server_lr},
            "evaluation": {"federated": False}}
    if eps is not None:
        z = noise_multiplier_for(eps, DELTA, rounds, workers, cohort or workers)
        spec["privacy"] = {"dp": {"mode": "central", "noise_multiplier": z, "clip": {"fixed": clip},
                                  "target_delta": DELTA, "max_epsilon": eps}}
    return JobSpec.model_validate(spec), z


def run_one(args: tuple) -> dict:
    torch.set_num_threads(1)
    job, z = job_for(*args)
    workers, eps, seed = args[0], args[5], args[3]
    t = time.perf_counter()
    result = simulate(job, workers)
    last = result.rounds[-1] if result.rounds else {}
    return {"workers": workers, "eps": eps, "seed": seed, "z": z, "reason": result.reason,
            "rounds": sum(r["status"] == "aggregated" for r in result.rounds),
            "accuracy": result.final.get("test_accuracy", float("nan")), "epsilon": last.get("dp_epsilon"),
            "seconds": time.perf_counter() - t}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--cohort", type=int, default=None, help="workers sampled per round (default: all)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--clip", type=float, default=0.3, help="C of the fixed clip")
    ap.add_argument("--server-lr", type=float, default=1.0)
    ap.add_argument("--epochs", type=int, default=5, help="local epochs per round")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--dump-jobs", type=Path, default=None, help="write each job spec as YAML here")
    a = ap.parse_args()
    cohort_of = {w: (min(a.cohort, w) if a.cohort else None) for w in a.workers}
    runs = [(w, cohort_of[w], a.rounds, s, a.clip, e, a.server_lr, a.epochs)
            for w in a.workers for e in (None, *EPSILONS) for s in a.seeds]
    if a.dump_jobs:
        a.dump_jobs.mkdir(parents=True, exist_ok=True)
        for run in runs:
            if run[3] == a.seeds[0]:
                job, _ = job_for(*run)
                job.dump(a.dump_jobs / f"{job.job}.yaml")
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=a.jobs) as pool:
        results = list(pool.map(run_one, runs))
    print(f"digits MLP, iid partition, {a.rounds} rounds, {a.epochs} local epoch(s), clip C={a.clip:g}, "
          f"central DP-FedAvg, "
          f"δ={DELTA:g}, RDP accountant (replace-one), medians over seeds {a.seeds}; "
          f"{time.perf_counter() - started:.0f} s wall on {a.jobs} processes\n")
    print("| workers (cohort) | target ε | noise multiplier z | reached ε | rounds | final accuracy |")
    print("|---|---|---|---|---|---|")
    for w in a.workers:
        for e in (None, *EPSILONS):
            rows = [r for r in results if r["workers"] == w and r["eps"] == e]
            acc = statistics.median(r["accuracy"] for r in rows)
            rounds = statistics.median(r["rounds"] for r in rows)
            z = f"{rows[0]['z']:.2f}" if e is not None else "-"
            reached = f"{max(r['epsilon'] for r in rows):.3f}" if e is not None else "-"
            print(f"| {w} ({cohort_of[w] or w}) | {'no DP' if e is None else f'{e:g}'} | {z} | {reached} | "
                  f"{rounds:g} | {acc:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
