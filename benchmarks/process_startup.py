"""What one worker process costs before its first round: wall time, CPU time and peak RSS.

Each sample is a fresh Python process (`sys.executable`) that does what `fedbus worker`
does before it heartbeats: imports fedbus.worker.service, loads the digits task, builds
the model and its worker_data, runs warm_up_torch and one train + evaluate (as
WorkerService.warm_up does), then reports its peak resident set (VmHWM) and CPU time.
The parent measures wall time from spawn to exit, so interpreter start-up and exit count.

`old` simulates the behaviour before fedbus.tasks.optim and the CSV reader: the same
steps plus importing what digits.py used to import from scikit-learn (sklearn.datasets
and sklearn.model_selection) and constructing and stepping a torch.optim.SGD, as the old
warm_up_torch did (this is what imports torch._dynamo).

Processes run one at a time, alternating new/old, so both see the same machine state.

    python benchmarks/process_startup.py            # 5 processes per variant
    python benchmarks/process_startup.py -n 9 --model cnn
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import sys, time
t0 = time.perf_counter()
variant, model_name = sys.argv[1], sys.argv[2]

import copy, json, resource
import torch
torch.set_num_threads(1)  # as `fedbus worker` does (--threads 1)
import fedbus.worker.service  # noqa: F401
from fedbus.tasks import TrainSettings, load_task, warm_up_torch
t_import = time.perf_counter()

if variant == "old":
    import sklearn.datasets  # noqa: F401
    import sklearn.model_selection  # noqa: F401
    layer = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    layer(torch.zeros(1, 2)).sum().backward()
    optimizer.step()
t_old = time.perf_counter()

task = load_task("fedbus.tasks.digits:task")
params = {"model": model_name}
torch.manual_seed(0)
model = task.build_model(params)
data = task.worker_data(partition=0, num_partitions=10, params=params, seed=0)
t_data = time.perf_counter()

warm_up_torch()
scratch = copy.deepcopy(model)
task.train(scratch, data.train, TrainSettings(), seed=0)
task.evaluate(scratch, data.val)
t_warm = time.perf_counter()

# The first real round, which the warm-up should have made as fast as later ones.
task.train(model, data.train, TrainSettings(), seed=1)
task.evaluate(model, data.val)
t_round = time.perf_counter()

usage = resource.getrusage(resource.RUSAGE_SELF)
with open("/proc/self/status") as status:
    fields = dict(line.split(":", 1) for line in status)
print(json.dumps({
    "vmhwm_mb": int(fields["VmHWM"].split()[0]) / 1024,
    "vmrss_mb": int(fields["VmRSS"].split()[0]) / 1024,
    "cpu_s": usage.ru_utime + usage.ru_stime,
    "imports_s": t_import - t0,
    "old_extra_s": t_old - t_import,
    "data_s": t_data - t_old,
    "warm_up_s": t_warm - t_data,
    "first_round_ms": (t_round - t_warm) * 1000,
    "dynamo": "torch._dynamo" in sys.modules,
    "sklearn": "sklearn" in sys.modules,
}))
"""

VARIANTS = ("new", "old")


def spawn(variant: str, model: str) -> dict:
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", CHILD, variant, model], cwd=PROJECT_ROOT, capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(f"{variant} child failed:\n{out.stderr}")
    sample = json.loads(out.stdout.strip().splitlines()[-1])
    sample["wall_s"] = wall
    return sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--processes", type=int, default=5, help="fresh processes per variant")
    parser.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    args = parser.parse_args()

    samples: dict[str, list[dict]] = {variant: [] for variant in VARIANTS}
    spawn("new", args.model)  # untimed: warm the page cache and .pyc files
    for i in range(args.processes):
        order = VARIANTS if i % 2 == 0 else VARIANTS[::-1]
        for variant in order:
            samples[variant].append(spawn(variant, args.model))

    keys = [("wall_s", "wall s", "{:.2f}"), ("cpu_s", "CPU s", "{:.2f}"), ("vmhwm_mb", "VmHWM MB", "{:.0f}"),
            ("imports_s", "imports s", "{:.2f}"), ("old_extra_s", "sklearn+optim s", "{:.2f}"),
            ("data_s", "task+data s", "{:.2f}"), ("warm_up_s", "warm-up s", "{:.2f}"),
            ("first_round_ms", "round 1 ms", "{:.1f}")]
    print(f"{args.processes} fresh processes per variant, model={args.model}, medians:")
    print(f"{'':>8} " + " ".join(f"{label:>15}" for _key, label, _fmt in keys) + "  imports dynamo/sklearn")
    medians: dict[str, dict[str, float]] = {}
    for variant in VARIANTS:
        rows = samples[variant]
        medians[variant] = {key: statistics.median(row[key] for row in rows) for key, _label, _fmt in keys}
        flags = f"{sum(r['dynamo'] for r in rows)}/{len(rows)} {sum(r['sklearn'] for r in rows)}/{len(rows)}"
        cells = " ".join(f"{fmt.format(medians[variant][key]):>15}" for key, _label, fmt in keys)
        print(f"{variant:>8} {cells}  {flags}")
    new, old = medians["new"], medians["old"]
    print(
        f"old/new: wall {old['wall_s'] / new['wall_s']:.2f}x, CPU {old['cpu_s'] / new['cpu_s']:.2f}x, "
        f"VmHWM {old['vmhwm_mb'] / new['vmhwm_mb']:.2f}x; "
        f"saved per process: {old['wall_s'] - new['wall_s']:.2f} s wall, {old['cpu_s'] - new['cpu_s']:.2f} s CPU, "
        f"{old['vmhwm_mb'] - new['vmhwm_mb']:.0f} MB"
    )
    print("wall s per process (new):", " ".join(f"{r['wall_s']:.2f}" for r in samples["new"]))
    print("wall s per process (old):", " ".join(f"{r['wall_s']:.2f}" for r in samples["old"]))


if __name__ == "__main__":
    main()
