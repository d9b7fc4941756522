"""The chaos run of tests/test_e2e_chaos.py as a standalone program (issue 7, acceptance 4).

Runs a job through the CLI against its own nats-server while the coordinator is
SIGKILLed and resumed again and again, two workers die for good and the nats-server is
restarted once; then prints the timeline and the numbers the test asserts on (kills,
resumes, rounds, updates sent / required / accepted / lost, audit chain).

    python benchmarks/chaos.py [--seed N] [--kills 11] [--rounds 36] [--run-dir DIR]

Exit code 0 when the run had no problems, 1 otherwise. The run directory (logs,
summary.json, nats store) is kept for inspection.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.chaos_support import ChaosError, ChaosPlan, ChaosRun, analyse, chaos_job  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=20261129)
    ap.add_argument("--kills", type=int, default=11)
    ap.add_argument("--rounds", type=int, default=36)
    ap.add_argument("--epochs", type=int, default=8, help="local epochs per round")
    ap.add_argument("--deadline", type=float, default=3.5, help="round_deadline_s")
    ap.add_argument("--budget", type=float, default=330.0, help="seconds the whole run may take")
    ap.add_argument("--run-dir", default=None)
    args = ap.parse_args(argv)
    run_dir = Path(args.run_dir or f"runs/chaos-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    plan = ChaosPlan.draw(args.seed, kills=args.kills)
    job = chaos_job(rounds=args.rounds, deadline_s=args.deadline, epochs=args.epochs)
    print(f"chaos: seed {args.seed}, {args.kills} coordinator kills, {args.rounds} rounds; run dir {run_dir}")
    print(f"plan: {plan}")
    run = ChaosRun(run_dir, plan, job, budget_s=args.budget)
    try:
        outcome = run.execute()
    except ChaosError as exc:
        print("\n".join(run.outcome.timeline))
        print(f"chaos run aborted: {exc}")
        return 1
    print("\n".join(outcome.timeline))
    report = analyse(run_dir, job, outcome)
    print(report.describe())
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
