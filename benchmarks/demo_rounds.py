"""Round latency of the local federation: `fedbus demo` (10 worker processes) N times.

Each run is a fresh nats-server, coordinator and workers started through the CLI; the
numbers come from each run's summary.json (median round seconds, coordinator wall
seconds, final accuracy) and the demo's memory sampler (peak concurrent RSS of all its
processes). Prints each run and the median over runs.

    python benchmarks/demo_rounds.py [--runs 3] [--workers 10]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one_run(workers: int, run_dir: Path) -> dict:
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "fedbus.cli", "demo", "--workers", str(workers),
                          "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=900)
    total = time.perf_counter() - started
    if out.returncode != 0:
        raise SystemExit(f"demo failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    peak = re.search(r"peak concurrent RSS of all processes (\d+) MiB", out.stdout)
    return {"median_round_ms": 1000 * summary["median_round_seconds"], "job_wall_s": summary["wall_seconds"],
            "demo_total_s": total, "final_accuracy": summary["final_accuracy"],
            "peak_rss_mib": int(peak.group(1)) if peak else None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--workers", type=int, default=10)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            row = one_run(args.workers, Path(tmp) / f"run{i}")
            rows.append(row)
            print(f"run {i + 1}: median round {row['median_round_ms']:.1f} ms, job {row['job_wall_s']:.1f} s, "
                  f"demo {row['demo_total_s']:.1f} s, accuracy {row['final_accuracy']:.4f}, "
                  f"peak RSS {row['peak_rss_mib']} MiB", flush=True)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print(f"median of {args.runs} runs: round {med['median_round_ms']:.1f} ms, job {med['job_wall_s']:.1f} s, "
          f"demo {med['demo_total_s']:.1f} s, accuracy {med['final_accuracy']:.4f}, peak RSS {med['peak_rss_mib']:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
