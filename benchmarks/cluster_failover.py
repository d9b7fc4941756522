"""Stall of a fedbus job on a 3-node JetStream cluster when a node is SIGKILLed (issue 9, acceptance 5).

Each run starts a fresh cluster from deploy/nats/cluster-node{1,2,3}.conf (ports and
store dirs rewritten to free ones / temp dirs), a coordinator and workers as CLI
processes given all three URLs, a job with transport.replicas 3, and SIGKILLs one node
right after a round closed:

  stream_leader     the Raft leader of the job's update stream
  coordinator_node  the node the coordinator's connection is on

and prints, per case, the median (and every) stall: the longest gap between two
consecutive round.closed events of the coordinator (the close is logged once the round's
model is committed), the time from the kill to the next close, the longest gap between
summary.json rows (elapsed_s, taken at the close decision, before the commit), and the
accepted / lost update counts.

    python benchmarks/cluster_failover.py [--repeats 3] [--rounds 10] [--workers 3] [--case ...]

Exit code 0 when every run completed with 0 lost updates, 1 otherwise. Run directories
are kept under --run-dir.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.cluster_support import CASES, run_failover  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--kill-after-round", type=int, default=3)
    ap.add_argument("--case", choices=CASES, action="append", help="default: both")
    ap.add_argument("--run-dir", default=None)
    args = ap.parse_args(argv)
    run_dir = Path(args.run_dir or f"runs/cluster-failover-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    cases = args.case or list(CASES)
    print(f"cluster failover: {args.repeats} x {cases}, {args.rounds} rounds, {args.workers} workers, "
          f"replicas 3; run dir {run_dir}")
    failed = False
    table = []
    for case in cases:
        stalls, to_next, rows_stall, accepted, lost, errors = [], [], [], 0, 0, 0
        for i in range(args.repeats):
            try:
                r = run_failover(run_dir / f"{case}-{i + 1}", case, rounds=args.rounds, num_workers=args.workers,
                                 kill_after_round=args.kill_after_round, job_id=f"failover-{i + 1}")
            except Exception as exc:  # noqa: BLE001 - a failed run is reported and counted, not hidden
                errors += 1
                failed = True
                print(f"  {case} #{i + 1}: FAILED: {exc!r}")
                traceback.print_exc(limit=3)
                continue
            s = r.summary
            complete = s.get("reason") == "completed" and s.get("rounds_completed") == args.rounds
            expected = args.rounds * args.workers
            failed |= bool(r.lost) or not complete or s.get("updates_accepted") != expected
            stalls.append(r.stall_s)
            to_next.append(r.kill_to_next_close_s)
            rows_stall.append(r.row_stall_s)
            accepted += int(s.get("updates_accepted") or 0)
            lost += len(r.lost)
            print(f"  {case} #{i + 1}: {r.describe()}")
        if stalls:
            table.append((case, len(stalls), errors, statistics.median(stalls), stalls,
                          statistics.median(to_next), statistics.median(rows_stall), accepted, lost))
        else:
            table.append((case, 0, errors, float("nan"), [], float("nan"), float("nan"), 0, 0))
    print()
    print(f"{'case':<18}{'runs':>5}{'failed':>7}{'stall median s':>16}{'kill->close s':>15}"
          f"{'row gap s':>11}{'accepted':>10}{'lost':>6}  stalls")
    for case, n, errors, med, stalls, nxt, rows, acc, lst in table:
        print(f"{case:<18}{n:>5}{errors:>7}{med:>16.2f}{nxt:>15.2f}{rows:>11.2f}{acc:>10}{lst:>6}  "
              + ", ".join(f"{x:.2f}" for x in stalls))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
