"""Seconds and bytes per round of the pure SecAgg+ protocol, against plain (unmasked) updates.

Every party runs in this process, one after another (``fedbus.secagg.simulate``), so
the seconds are compute, not network: ``client s`` is the median worker's total over
the round (quantization, key agreement, sharing, mask expansion, unmasking answer),
``server s`` the aggregator's total (folding masked inputs, checks, reconstruction,
removing masks). Deployed, workers run in parallel, so a round's compute is about
max(client) + server. ``bytes`` count every message as msgpack (masked inputs as raw
residues; a broadcast once per recipient), without envelopes (≈ 200 B each) and
without the model download, which is the same with and without SecAgg.

plain: each worker sends its update as float32 and the server adds them in float64.

    python benchmarks/secagg.py [--params 100000] [--clients 10 50 100] [--repeats 3] [--dropout 0.1]

Medians over ``--repeats``; ratios are taken within the same run. Over-NATS numbers
(a 1M-parameter model, >= 5 processes) come with the bus wiring.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedbus.secagg.simulate import Dropouts, RoundLog, run_round  # noqa: E402
from fedbus.secagg.spec import SecureAggregationSpec, quantizer_of  # noqa: E402


def plain_round(updates: dict[str, np.ndarray]) -> tuple[float, float, int]:
    client, wire = [], []
    for u in updates.values():
        start = time.perf_counter()
        wire.append(u.astype(np.float32).tobytes())
        client.append(time.perf_counter() - start)
    start = time.perf_counter()
    total = np.zeros(len(next(iter(updates.values()))), dtype=np.float64)
    for raw in wire:
        total += np.frombuffer(raw, dtype=np.float32)
    return statistics.median(client), time.perf_counter() - start, sum(len(w) for w in wire)


def secagg_round(updates: dict[str, np.ndarray], dropout: float, seed: bytes) -> tuple[float, float, int, int]:
    roster = sorted(updates)
    length = len(updates[roster[0]])
    params = SecureAggregationSpec().round_params(job="bench", round=1, roster=roster, seed=seed, length=length,
                                                  bound=1.0)
    log = RoundLog()
    start = time.perf_counter()
    quantized = {w: quantizer_of(params).quantize(u) for w, u in updates.items()}
    quantize_s = (time.perf_counter() - start) / len(updates)
    dropped = frozenset(roster[:int(dropout * len(roster))])
    result = run_round(params, quantized, Dropouts(before_input=dropped), log=log)
    assert len(result.survivors) == len(roster) - len(dropped)
    client = statistics.median(log.client_seconds.values()) + quantize_s
    return client, log.server_seconds, log.up + log.down, params.degree


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=int, default=100_000, help="model size (float coordinates)")
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 50, 100])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dropout", type=float, default=0.1, help="fraction dropped before the masked input")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"model: {args.params:,} parameters; medians of {args.repeats} runs; "
          f"cpu: {os.cpu_count()} cores, every party in one process")
    print(f"{'n':>4} {'mode':<16} {'k':>3} {'client s':>9} {'server s':>9} {'MB/round':>9} {'x plain':>8} "
          f"{'x plain s':>9}")
    for n in args.clients:
        updates = {f"w{i:04d}": np.clip(rng.normal(0, 0.05, args.params), -1, 1) for i in range(n)}
        plain = [plain_round(updates) for _ in range(args.repeats)]
        p_client, p_server = statistics.median(r[0] for r in plain), statistics.median(r[1] for r in plain)
        p_bytes = plain[0][2]
        print(f"{n:>4} {'plain':<16} {'-':>3} {p_client:>9.4f} {p_server:>9.4f} {p_bytes / 1e6:>9.2f} {1:>8.2f} "
              f"{1:>9.1f}")
        for label, dropout in (("secagg", 0.0), (f"secagg {args.dropout:.0%} drop", args.dropout)):
            runs = [secagg_round(updates, dropout, os.urandom(32)) for _ in range(args.repeats)]
            client, server = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
            nbytes, k = statistics.median(r[2] for r in runs), runs[0][3]
            print(f"{n:>4} {label:<16} {k:>3} {client:>9.4f} {server:>9.4f} {nbytes / 1e6:>9.2f} "
                  f"{nbytes / p_bytes:>8.2f} {(client + server) / (p_client + p_server):>9.1f}")


if __name__ == "__main__":
    main()
