"""Update compression on digits: update bytes and final accuracy per method, next to none.

10 workers, Dirichlet(0.5) label skew, MLP, FedAvg, every worker in every round, one local
epoch. Runs ``fedbus.sim`` (the real coordinator core, the real worker training code and
the job spec's real pipeline, ``compression:`` included) in one process per run; the NATS
path is exercised by tests/test_e2e_compression.py.

What "update bytes" counts: the encoded Update body of every update delivered to the
coordinator (msgpack fields + tensor section, exactly the bytes a worker signs and puts on
the bus; the envelope's ~200-byte header and signature are not counted), summed over the
run. Over NATS the coordinator reports the same count for the updates it accepted as
``update_bytes`` in summary.json. The ratio is none's bytes / the method's, same seed.

Acceptance (issue 12, point 4): int8 and top-k 1% with error feedback end within 1 point of
uncompressed accuracy, with >= 4x and >= 20x fewer update bytes. Medians over ``--seeds``.

    python benchmarks/compression.py [--rounds 60] [--seeds 0 1 2] [--jobs 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor

import torch

from fedbus.jobspec import JobSpec
from fedbus.sim import simulate

WORKERS = 10
METHODS = [
    ("none", {"method": "none"}),
    ("fp16", {"method": "fp16"}),
    ("bf16", {"method": "bf16"}),
    ("int8 (chunk 1024, deflated)", {"method": "int8"}),
    ("int8 (chunk 1024, raw)", {"method": "int8", "entropy_coding": False}),
    ("top-k 10% + EF", {"method": "topk", "fraction": 0.1}),
    ("top-k 1% + EF", {"method": "topk", "fraction": 0.01}),
    ("top-k 1%, no EF", {"method": "topk", "fraction": 0.01, "error_feedback": False}),
]
# The acceptance bars: (method, most accuracy points lost, least byte ratio).
BARS = {"int8 (chunk 1024, deflated)": (1.0, 4.0), "top-k 1% + EF": (1.0, 20.0)}


def job_for(compression: dict, seed: int, rounds: int) -> JobSpec:
    return JobSpec.model_validate({
        "job": "compression-bench", "task": "fedbus.tasks.digits:task", "seed": seed, "rounds": rounds,
        "task_params": {"model": "mlp", "partition": "dirichlet", "alpha": 0.5},
        "cohort": {"min_workers": WORKERS, "min_updates": WORKERS},
        "train": {"epochs": 1, "batch_size": 16, "lr": 0.1, "momentum": 0.9},
        "evaluation": {"server_test": True, "federated": False, "final_round": False},
        "compression": compression})


def run(args: tuple[str, dict, int, int]) -> tuple[str, int, float, float, int, float]:
    name, compression, seed, rounds = args
    torch.set_num_threads(1)
    result = simulate(job_for(compression, seed, rounds), WORKERS)
    if result.reason != "completed":
        raise RuntimeError(f"{name} seed {seed}: {result.reason}")
    early = result.rounds[rounds // 3 - 1]["test_accuracy"]  # how fast it gets there
    return (name, seed, 100.0 * result.final["test_accuracy"], 100.0 * early, result.update_bytes,
            result.wall_seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    work = [(name, spec, seed, args.rounds) for name, spec in METHODS for seed in args.seeds]
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(run, work))
    by = {(name, seed): (acc, nbytes, wall, early) for name, seed, acc, early, nbytes, wall in results}
    print(f"digits, {WORKERS} workers, Dirichlet(0.5), {args.rounds} rounds, FedAvg; medians over seeds "
          f"{args.seeds}; update bytes = encoded Update bodies delivered to the coordinator, whole run")
    early_round = args.rounds // 3
    print(f"{'method':30} {f'acc % r{early_round}':>10} {'final acc %':>11} {'Δ vs none':>9} {'update bytes':>13} "
          f"{'bytes/update':>12} {'fewer bytes':>11} {'wall s':>7}")
    failed = []
    updates = WORKERS * args.rounds
    for name, _ in METHODS:
        acc = statistics.median(by[name, s][0] for s in args.seeds)
        nbytes = statistics.median(by[name, s][1] for s in args.seeds)
        # Per seed against none of the same seed, then the median.
        loss = statistics.median(by["none", s][0] - by[name, s][0] for s in args.seeds)
        ratio = statistics.median(by["none", s][1] / by[name, s][1] for s in args.seeds)
        wall = statistics.median(by[name, s][2] for s in args.seeds)
        early = statistics.median(by[name, s][3] for s in args.seeds)
        print(f"{name:30} {early:10.2f} {acc:11.2f} {0.0 - loss + 0.0:+9.2f} {nbytes:13,.0f} {nbytes / updates:12,.0f} "
              f"{ratio:10.1f}x {wall:7.2f}")
        if name in BARS:
            max_loss, min_ratio = BARS[name]
            if loss > max_loss or ratio < min_ratio:
                failed.append(f"{name}: lost {loss:.2f} points (bar {max_loss}), {ratio:.1f}x fewer bytes "
                              f"(bar {min_ratio}x)")
    for line in failed:
        print("BELOW THE BAR:", line)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
