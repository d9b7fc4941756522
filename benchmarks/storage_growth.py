"""Bytes in the nats-server store directory, round by round, over a long job with retention.

A real nats-server (fresh store), the coordinator and 3 workers as CLI processes, the
digits task's MLP; after every closed round the store directory is measured. Prints the
curve (every --every rounds), the growth per round over each quarter of the job, and, with
--compare, the same job keeping every version (claim-check blobs and acknowledged updates
are deleted in both).

    python benchmarks/storage_growth.py [--rounds 200] [--keep 5] [--every 10] [--hidden 128] [--compare]

With --demo the job is `fedbus demo` itself (10 workers, Dirichlet digits, run as a
subprocess with --rounds/--hidden/--keep-versions) and its run directory's nats-server
store is measured after every round.closed of its coordinator.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedbus.bus import EmbeddedNatsServer  # noqa: E402
from fedbus.demo import cli_command  # noqa: E402
from tests.storage_support import run_sampled, sample_log_rounds  # noqa: E402


def one_job(rounds: int, keep: int, hidden: int, tmp: Path) -> list[tuple[int, int]]:
    server = EmbeddedNatsServer(store_dir=tmp / "store").start()
    try:
        samples, summary = run_sampled(tmp / "run", server.url, server.store_dir, rounds=rounds, keep=keep,
                                       hidden=hidden, timeout=60 * 60)
    finally:
        server.stop()
    assert summary["rounds_completed"] == rounds, summary
    return samples


def one_demo(rounds: int, keep: int, hidden: int, tmp: Path, workers: int) -> list[tuple[int, int]]:
    """`fedbus demo` as a subprocess; its store (run_dir/nats) sampled after every round."""
    run_dir = tmp / "demo"
    (run_dir / "logs").mkdir(parents=True)
    argv = cli_command("demo", "--workers", str(workers), "--rounds", str(rounds), "--run-dir", str(run_dir),
                       "--hidden", str(hidden), "--keep-versions", str(keep), "--timeout", str(60 * 60))
    with (tmp / "demo.out").open("w") as out:
        demo = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        try:
            samples = sample_log_rounds(run_dir / "logs" / "coordinator.log", demo, run_dir / "nats", 2 * 60 * 60)
        finally:
            if demo.poll() is None:
                demo.terminate()
            demo.wait(timeout=60)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == rounds, (tmp / "demo.out").read_text()[-3000:]
    print("store at the end, by stream: " + ", ".join(
        f"{name} {size / 1024:.0f} KiB" for name, size in by_stream(run_dir / "nats")))
    return samples


def by_stream(store_dir: Path) -> list[tuple[str, int]]:
    """Bytes per stream directory of a nats-server store (largest first)."""
    sizes: dict[str, int] = {}
    for path in store_dir.rglob("*"):
        parts = path.relative_to(store_dir).parts
        if path.is_file() and "streams" in parts[:-1]:
            name = parts[parts.index("streams") + 1]
            sizes[name] = sizes.get(name, 0) + path.stat().st_size
    return sorted(sizes.items(), key=lambda kv: -kv[1])


def peaks(samples: list[tuple[int, int]]) -> list[str]:
    """The largest store size in each quarter of the job: flat peaks mean bounded storage
    (nats-server frees deleted messages' space a file block at a time, so the curve saws)."""
    n = len(samples)
    out = []
    for q in range(4):
        part = samples[q * n // 4:(q + 1) * n // 4] or samples[-1:]
        out.append(f"rounds {part[0][0]:>4}-{part[-1][0]:<4} peak {max(b for _, b in part) / 1024:9.1f} KiB")
    return out


def quarters(samples: list[tuple[int, int]]) -> list[str]:
    n = len(samples)
    out = []
    for q in range(4):
        a, b = samples[q * n // 4], samples[min((q + 1) * n // 4, n - 1)]
        per_round = (b[1] - a[1]) / max(1, b[0] - a[0])
        out.append(f"rounds {a[0]:>4}-{b[0]:<4} {per_round / 1024:+9.2f} KiB/round")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--keep", type=int, default=5)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--hidden", type=int, default=128,
                   help="MLP hidden units: 128 is the demo's model (~38 KiB, inline); 2048 (~600 KiB) uses claim checks")
    p.add_argument("--compare", action="store_true", help="also run the job keeping every version")
    p.add_argument("--demo", action="store_true", help="measure `fedbus demo` itself (10 workers) instead of the "
                                                       "3-worker job")
    p.add_argument("--workers", type=int, default=10, help="workers of --demo")
    args = p.parse_args()
    # The comparison keeps every version; blobs and acknowledged updates are still deleted.
    runs = [(f"keep {args.keep} versions", args.keep)] + ([("keep every version", args.rounds + 1)]
                                                          if args.compare else [])
    for label, keep in runs:
        with tempfile.TemporaryDirectory() as tmp:
            samples = (one_demo(args.rounds, keep, args.hidden, Path(tmp), args.workers) if args.demo
                       else one_job(args.rounds, keep, args.hidden, Path(tmp)))
        what = f"fedbus demo, {args.workers} workers" if args.demo else "3 workers"
        print(f"== {label}: {what}, {args.rounds} rounds, keep_versions={keep}, hidden={args.hidden}")
        for round_, size in samples:
            if round_ == 1 or round_ % args.every == 0:
                print(f"round {round_:>4}  {size / 1024:10.1f} KiB")
        print("\n".join(quarters(samples)))
        print("\n".join(peaks(samples)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
