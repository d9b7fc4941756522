"""Peak coordinator memory of one aggregation round versus cohort size (issue 3, acceptance 5).

For each rule and cohort size a fresh Python process builds a float32 model of ``--params``
parameters (plus an integer buffer), begins a round, and adds ``n`` updates one at a time,
generating each update on the fly and dropping its own reference right after ``add()``
(as the coordinator does with a decoded message), then calls ``result()``. The process
reports its peak resident set size (VmHWM from /proc/self/status) before the round and
after it; a separate process per measurement keeps one run's peak out of the next.

Streaming rules (FedAvg) should show the same peak for 4, 16 and 64 updates; buffered
rules (median) keep every update, so their growth over the baseline scales with n; a
pre-aggregation (median+nnm) adds its n mixed inputs, about one more model per update.

    python benchmarks/aggregation_memory.py                    # 10M params; 4, 16, 64 updates
    python benchmarks/aggregation_memory.py --params 1000000 --sizes 4,8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# --rules names beyond plain strategy names
SPECS = {"median+nnm": {"name": "median", "nnm": {"f": 1}}}


def _status_mb(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0  # kB -> MiB
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(rule_name: str, n: int, params: int) -> dict:
    import torch

    from fedbus.aggregation.base import ClientUpdate
    from fedbus.aggregation.specs import build_rule

    torch.set_num_threads(1)  # same arithmetic and no thread-pool arenas in every run
    # Three tensors like a small network's layers, plus BatchNorm's counter.
    sizes = {"layer1.weight": params // 2, "layer2.weight": params * 3 // 10}
    sizes["layer3.weight"] = params - sum(sizes.values())
    torch.manual_seed(0)
    global_state = {k: torch.randn(v) for k, v in sizes.items()}
    global_state["bn.num_batches_tracked"] = torch.tensor(100)
    rule = build_rule(SPECS.get(rule_name, {"name": rule_name}))
    baseline = _status_mb("VmHWM")

    start = time.perf_counter()
    agg = rule.begin(global_state)
    for i in range(n):
        torch.manual_seed(i + 1)
        state = {}
        for k, v in global_state.items():
            if v.is_floating_point():
                state[k] = torch.randn_like(v).mul_(0.01).add_(v)  # in place: no extra temporaries
            else:
                state[k] = v + 3
        agg.add(ClientUpdate(f"w{i}", 100 + i, state, num_steps=3))
        del state  # the coordinator drops the decoded update; a buffered rule still holds it
    proposal = agg.result()
    seconds = time.perf_counter() - start
    assert set(proposal) == set(global_state)
    return {"rule": rule_name, "updates": n, "params": params, "baseline_mb": baseline,
            "peak_mb": _status_mb("VmHWM"), "seconds": seconds}


def measure(rule: str, n: int, params: int, timeout: float) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, __file__, "--child", rule, str(n), "--params", str(params)],
                         capture_output=True, text=True, timeout=timeout, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{rule} n={n} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=int, default=10_000_000)
    ap.add_argument("--sizes", default="4,16,64")
    ap.add_argument("--rules", default="fedavg,median", help="streaming first, then buffered; also: median+nnm")
    ap.add_argument("--timeout", type=float, default=150.0, help="seconds per measurement")
    ap.add_argument("--child", nargs=2, metavar=("RULE", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.params)))
        return

    sizes = [int(s) for s in args.sizes.split(",")]
    model_mb = args.params * 4 / 2**20
    print(f"model: {args.params:,} float32 parameters = {model_mb:.1f} MiB; one fresh process per row\n")
    header = (f"{'rule':<10} {'updates':>7} {'baseline MiB':>12} {'peak MiB':>9} {'round MiB':>9} {'x model':>7} "
              f"{'ratio':>6} {'MiB/extra update':>16} {'seconds':>7}")
    print(header)
    print("-" * len(header))
    started = time.perf_counter()
    for rule in args.rules.split(","):
        first: tuple[int, float] | None = None
        for n in sizes:
            r = measure(rule, n, args.params, args.timeout)
            grown = r["peak_mb"] - r["baseline_mb"]  # what the round added on top of model + runtime
            first = first or (n, grown)
            slope = (grown - first[1]) / (n - first[0]) if n > first[0] else float("nan")
            print(f"{rule:<10} {n:>7} {r['baseline_mb']:>12.0f} {r['peak_mb']:>9.0f} {grown:>9.0f} "
                  f"{grown / model_mb:>7.1f} {grown / first[1]:>6.2f} {slope:>16.1f} {r['seconds']:>7.1f}", flush=True)
    print(f"""
baseline   peak RSS (VmHWM) with torch loaded and the global model built, before the round
round MiB  peak - baseline: what aggregating the round added
ratio      round MiB / round MiB of the {sizes[0]}-update run (the cohort grows {sizes[-1] / sizes[0]:g}x)
MiB/extra  (round MiB - round MiB at {sizes[0]}) / (updates - {sizes[0]}):
           ~0 for a streaming rule, ~1 model ({model_mb:.1f} MiB) for a buffered one
total {time.perf_counter() - started:.0f} s""")

if __name__ == "__main__":
    main()
