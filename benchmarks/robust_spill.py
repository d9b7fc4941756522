"""A buffered robust rule's anonymous memory and time with and without spilling (issue 12).

One round of a robust rule (median by default) over ``--n`` contributions of a float32
model of ``--params`` parameters, built and folded as the coordinator does
(``acc.from_local_state`` then ``acc.fold``; each local model dropped right after), then
``finalize()``. Each variant runs in its own Python process: in memory, and spilling
every contribution (``--spill-above``, default 0) into a temporary directory that is
removed afterwards.

Reported per variant: the peak anonymous RSS (RssAnon from /proc/self/status, sampled
every 2 ms by a thread: what the kernel cannot drop under pressure), the peak of the
file-backed RSS (RssFile: mapped page cache, which it can), VmHWM (the kernel's peak of
both together), and the seconds spent folding and finalizing. The processes fix glibc's
mmap threshold as the coordinator does (fedbus/allocator.py), so freed buffers leave RSS.

    python benchmarks/robust_spill.py                       # 25M params (100 MB), n = 8, median
    python benchmarks/robust_spill.py --rule trimmed_mean --params 5000000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RULES = {"median": {"name": "median"}, "trimmed_mean": {"name": "trimmed_mean", "beta": 0.25},
         "krum": {"name": "krum", "f": 1}, "geometric_median": {"name": "geometric_median"},
         "median+nnm": {"name": "median", "nnm": {"f": 1}}}


def status_kib() -> dict[str, int]:
    out = {}
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmHWM"):
                out[key] = int(rest.split()[0])
    return out


class PeakSampler(threading.Thread):
    """Peak RssAnon and RssFile while it runs (the kernel keeps no high-water mark of each)."""

    def __init__(self, every_s: float = 0.002):
        super().__init__(daemon=True)
        self.every_s = every_s
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            time.sleep(self.every_s)

    def sample(self) -> None:
        now = status_kib()
        for k in self.peak:
            self.peak[k] = max(self.peak[k], now[k])

    def stop(self) -> dict[str, int]:
        self._halt.set()
        self.join()
        self.sample()
        return self.peak


def child(rule: str, n: int, params: int, spill_dir: str | None, spill_above: int) -> dict:
    import torch

    from fedbus.aggregation.specs import build_rule
    from fedbus.allocator import keep_large_buffers_mapped
    from fedbus.spill import configure_spill

    keep_large_buffers_mapped()
    torch.set_num_threads(1)
    sizes = {"layer1.weight": params // 2, "layer2.weight": params * 3 // 10}
    sizes["layer3.weight"] = params - sum(sizes.values())
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(v, generator=g) for k, v in sizes.items()}
    if spill_dir is not None:
        configure_spill(spill_dir, spill_above)
    baseline = status_kib()
    sampler = PeakSampler()
    sampler.start()
    start = time.perf_counter()
    acc = build_rule(RULES[rule]).begin(base, 0)
    for i in range(n):
        g = torch.Generator().manual_seed(i + 1)
        local = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        acc.fold(acc.from_local_state(f"w{i}", 1.0, local))
        del local
    folded = time.perf_counter()
    after_folds = status_kib()
    result = acc.finalize()
    done = time.perf_counter()
    peak = sampler.stop()
    return {"fold_s": folded - start, "finalize_s": done - folded, "baseline_anon_mib": baseline["RssAnon"] / 1024,
            "anon_after_folds_mib": after_folds["RssAnon"] / 1024, "peak_anon_mib": peak["RssAnon"] / 1024,
            "peak_file_mib": peak["RssFile"] / 1024, "hwm_mib": status_kib()["VmHWM"] / 1024,
            "checksum": float(sum(t.double().sum() for t in result.values())),
            "resident_mib": acc.resident_bytes / 2**20, "spilled_mib": acc.spilled_bytes / 2**20}


def run_variant(args: argparse.Namespace, spill_dir: str | None) -> dict:
    cmd = [sys.executable, __file__, "--child", "--rule", args.rule, "--n", str(args.n), "--params", str(args.params),
           "--spill-above", str(args.spill_above)]
    if spill_dir is not None:
        cmd += ["--spill-dir", spill_dir]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if out.returncode:
        raise SystemExit(f"variant {'spill' if spill_dir else 'memory'} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rule", choices=sorted(RULES), default="median")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--params", type=int, default=25_000_000)
    p.add_argument("--spill-above", type=int, default=0, help="bytes a buffer keeps in memory (default 0: all spill)")
    p.add_argument("--dir", default=None, help="parent of the temporary spill directory (default $TMPDIR)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--spill-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.rule, args.n, args.params, args.spill_dir, args.spill_above)))
        return
    print(f"{args.rule}, n={args.n}, {args.params:,} float32 params ({args.params * 4 / 2**20:.0f} MiB per model); "
          f"spill above {args.spill_above} bytes")
    results = {"memory": run_variant(args, None)}
    with tempfile.TemporaryDirectory(prefix="fedbus-robust-spill-", dir=args.dir) as d:
        results["spill"] = run_variant(args, d)
    assert results["memory"]["checksum"] == results["spill"]["checksum"], "spilling changed the result"
    cols = ["peak_anon_mib", "anon_after_folds_mib", "baseline_anon_mib", "peak_file_mib", "hwm_mib",
            "fold_s", "finalize_s", "spilled_mib"]
    print(f"{'variant':8} " + " ".join(f"{c:>20}" for c in cols))
    for name, r in results.items():
        print(f"{name:8} " + " ".join(f"{r[c]:20.2f}" for c in cols))
    m, s = results["memory"], results["spill"]
    print(f"peak anonymous RSS: spill/memory = {s['peak_anon_mib'] / m['peak_anon_mib']:.2f} "
          f"({m['peak_anon_mib']:.0f} -> {s['peak_anon_mib']:.0f} MiB); "
          f"time: spill/memory = {(s['fold_s'] + s['finalize_s']) / (m['fold_s'] + m['finalize_s']):.2f} "
          f"({m['fold_s'] + m['finalize_s']:.1f} -> {s['fold_s'] + s['finalize_s']:.1f} s); results identical")


if __name__ == "__main__":
    main()
