"""Stragglers: what 3 of 10 workers slowed 10x cost each federation mode.

Real processes: for every mode and seed, a fresh nats-server, `fedbus coordinator` and 10
`fedbus worker` processes through the CLI (``fedbus.demo.run_local``, the demo's harness),
digits with Dirichlet(0.5) label skew, workers w08-w10 started with
``--simulate-slowdown 10``. Modes:

  sync-full   sync FedAvg waiting for the whole cohort (min_updates 10, deadline 120 s)
  quorum      sync, cohort.close_at_quorum with min_updates 7 (late updates dropped)
  next-round  sync, close_at_quorum (min_updates 7) and late_updates: next_round
  fedbuff     mode async, FedBuff, buffer 3 (the demo's settings)
  fedasync    mode async, FedAsync (buffer 1, alpha 0.6)

A run stops by itself once the observer sees a committed model at the target test
accuracy (0.93), or after the job's versions (sync 40 rounds, async 150 versions) or the
per-run timeout. Per run, from summary.json and the processes' logs:

  to-0.93 s   wall seconds from the first round's (version's) start to the first committed
              model at 0.93 (``elapsed_s`` of the rows; the wait for workers to start is
              left out, it is the same in every mode)
  final acc   test accuracy of the last committed model
  used        updates folded into committed models (the rows' ``folded``/``accepted``)
  wasted      updates the workers sent (``update.sent`` log lines) up to that commit, minus
              used: rejected (wrong_round, too_stale, ...) or never folded
  rejected    the coordinator's rejections, by reason

The table shows medians over ``--seeds`` seeds and the ratios of time-to-0.93 to
sync-full's, measured in this run. Then the same modes through ``fedbus.sim.simulate``
with 1,000 simulated workers (IID digits: Dirichlet cannot give 1,000 workers a sample of
each of its 1,797 images), 30 % of them slowed 10x on top of a lognormal speed
distribution, on its virtual clock (seconds are virtual; 1 s base training time).

    python benchmarks/stragglers.py [--seeds 3] [--quick] [--modes fedbuff,sync-full] [--no-sim]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from fedbus.demo import (DEMO_BUFFER_SIZE, TARGET_ACCURACY, Progress, demo_job, run_local, straggler_ids,
                         time_to_accuracy, updates_folded, write_federation)
from fedbus.jobspec import JobSpec

WORKERS = 10
STRAGGLERS = 3
SLOWDOWN = 10.0
SYNC_ROUNDS = 40  # bounds: sync FedAvg reaches 0.93 in ~5 rounds on this task
ASYNC_VERSIONS = 150
# The simulator runs every version it is given (no stop at the target): smaller bounds.
SIM_ROUNDS = 60
SIM_VERSIONS = 200
SIM_FEDASYNC_VERSIONS = 3000
SIM_COHORT = 100
MODES = ("sync-full", "quorum", "next-round", "fedbuff", "fedasync")
BASELINE = "sync-full"


def job_for(mode: str, seed: int, workers: int = WORKERS, *, partition: str = "dirichlet",
            sync_rounds: int = SYNC_ROUNDS, async_versions: int = ASYNC_VERSIONS,
            buffer_size: int = DEMO_BUFFER_SIZE) -> JobSpec:
    """The job spec of one mode: the demo's job (digits, MLP, Dirichlet(0.5)) with the mode's cohort rules."""
    is_async = mode in ("fedbuff", "fedasync")
    base = demo_job(workers, async_versions if is_async else sync_rounds, 0.5, seed,
                    mode="async" if is_async else "sync")
    spec = base.model_dump(mode="json", by_alias=True)
    if partition != "dirichlet":
        spec["task_params"] = {"model": "mlp", "partition": partition}
    quorum = max(1, round(0.7 * workers))
    if mode == "sync-full":
        # Wait for everyone: the deadline is far beyond a straggler's round.
        spec["cohort"].update(min_updates=workers, close_at_quorum=False)
        spec["round_deadline_s"] = 120.0
    elif mode == "quorum":
        spec["cohort"].update(min_updates=quorum, close_at_quorum=True)
        spec["late_updates"] = "drop"
    elif mode == "next-round":
        spec["cohort"].update(min_updates=quorum, close_at_quorum=True)
        spec["late_updates"] = "next_round"
    elif mode == "fedbuff":
        spec["async"].update(algorithm="fedbuff", buffer_size=min(buffer_size, workers))
    elif mode == "fedasync":
        spec["async"].update(algorithm="fedasync", buffer_size=1)
    else:
        raise ValueError(f"unknown mode {mode!r}; one of {MODES}")
    return JobSpec.model_validate(spec)


# ---- real processes --------------------------------------------------------------------------

def _ts(line: dict) -> float | None:
    text = line.get("timestamp")
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _json_lines(path: Path):
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


def commit_time(run_dir: Path, version: int) -> float | None:
    """Wall-clock time (epoch s) of the coordinator's log line closing ``version``."""
    for rec in _json_lines(run_dir / "logs" / "coordinator.log"):
        if rec.get("event") in ("round.closed", "version.committed") and \
                version in (rec.get("model_version"), rec.get("version"), rec.get("round")):
            return _ts(rec)
    return None


def updates_sent(run_dir: Path, until: float | None) -> int:
    """update.sent lines of every worker log, up to ``until`` (epoch s) when given."""
    total = 0
    for path in (run_dir / "logs").glob("w*.log"):
        for rec in _json_lines(path):
            if rec.get("event") == "update.sent":
                t = _ts(rec)
                if until is None or (t is not None and t <= until):
                    total += 1
    return total


def async_available(job: JobSpec) -> bool:
    """Whether the coordinator runs mode: async with the async machine (and not, silently,
    the sync one: sync results labelled async would be worse than none)."""
    from fedbus.coordinator.factory import machine_for
    from fedbus.coordinator.rounds import RoundStateMachine
    from fedbus.tasks import load_task

    if job.mode != "async":
        return True
    model = load_task(job.task).build_model(job.task_params)
    try:
        machine = machine_for(job, {k: v.detach().clone() for k, v in model.state_dict().items()}, WORKERS)
    except Exception:
        return False
    return type(machine) is not RoundStateMachine


def real_run(mode: str, seed: int, root: Path, timeout: float, target: float,
             buffer_size: int = DEMO_BUFFER_SIZE) -> dict:
    run_dir = root / f"{mode}-s{seed}"
    job = job_for(mode, seed, buffer_size=buffer_size)
    if not async_available(job):
        return {"mode": mode, "seed": seed, "to_target_s": None, "version": None, "final_acc": None, "used": None,
                "sent": None, "wasted": None, "rejected": {}, "versions": 0, "ok": False, "run_seconds": 0.0,
                "error": "the coordinator has no async machine yet (machine_for returned the sync one)"}
    federation = write_federation(run_dir, WORKERS)
    progress = Progress(job.rounds, quiet=True, target=target)
    run = run_local(run_dir, job, federation, stragglers=straggler_ids(federation, STRAGGLERS), slowdown=SLOWDOWN,
                    timeout=timeout, progress=progress, stop_at_target=True)
    summary = run.summary or {}
    rows = [r for r in summary.get("rounds", []) if r.get("status") == "aggregated"]
    hit = time_to_accuracy(rows, target)
    used = updates_folded(rows)
    cut = commit_time(run_dir, hit[1]) if hit else None
    sent = updates_sent(run_dir, cut)
    accs = [r["test_accuracy"] for r in rows if r.get("test_accuracy") is not None]
    return {"mode": mode, "seed": seed, "to_target_s": hit[0] if hit else None, "version": hit[1] if hit else None,
            "final_acc": accs[-1] if accs else None, "used": used, "sent": sent, "wasted": max(0, sent - used),
            "rejected": summary.get("updates_rejected") or {}, "versions": len(rows),
            "ok": bool(run.summary) and (run.code == 0 or run.stopped_at_target), "run_seconds": run.seconds,
            "error": summary.get("error", "") if run.summary else f"no summary (exit {run.coordinator.returncode})"}


# ---- the simulator ---------------------------------------------------------------------------

def sim_run(mode: str, seed: int, workers: int, sigma: float, target: float, sync_rounds: int,
            async_versions: int) -> dict:
    from fedbus.sim import simulate

    job = job_for(mode, seed, workers, partition="iid", sync_rounds=sync_rounds, async_versions=async_versions)
    spec = job.model_dump(mode="json", by_alias=True)
    # Every simulated update is trained for real (a few ms each on 1-2 images): sync rounds
    # sample SIM_COHORT of the workers (quorum 70 % of it) and async keeps as many training
    # at once (FedBuff's buffer 30 % of it), so each mode trains a bounded number of updates.
    cohort = min(SIM_COHORT, workers)
    spec["cohort"]["size"] = cohort
    if mode == "sync-full":
        spec["cohort"]["min_updates"] = cohort
    elif mode in ("quorum", "next-round"):
        spec["cohort"]["min_updates"] = max(1, round(0.7 * cohort))
    else:
        spec["cohort"]["min_updates"] = 1  # (async: no rounds, no quorum)
    spec["async"]["concurrency"] = cohort
    if mode == "fedbuff":
        spec["async"]["buffer_size"] = max(1, round(0.3 * cohort))
    if mode == "fedasync":
        spec["rounds"] = SIM_FEDASYNC_VERSIONS  # one update per version
    job = JobSpec.model_validate(spec)
    started = time.perf_counter()
    res = simulate(job, workers, stragglers=round(workers * STRAGGLERS / WORKERS), slowdown=SLOWDOWN,
                   speeds=f"lognormal:{sigma:g}")
    rows = [r for r in res.rounds if r.get("status") == "aggregated"]
    hit = time_to_accuracy(rows, target)
    accs = [r["test_accuracy"] for r in rows if r.get("test_accuracy") is not None]
    return {"mode": mode, "seed": seed, "to_target_s": hit[0] if hit else None, "version": hit[1] if hit else None,
            "final_acc": accs[-1] if accs else None, "used": res.updates_used, "sent": res.updates_trained,
            "wasted": res.updates_wasted, "rejected": res.rejected, "versions": len(rows), "ok": True,
            "run_seconds": time.perf_counter() - started, "peak_rss_mb": res.peak_rss_mb, "error": ""}


# ---- the table -------------------------------------------------------------------------------

def _median(values):
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(results: list[dict], modes: list[str], seeds: int, clock: str, target: float) -> str:
    by_mode = {m: [r for r in results if r["mode"] == m] for m in modes}
    med = {}
    for m, rs in by_mode.items():
        if not rs:
            continue
        reached = [r["to_target_s"] for r in rs if r["to_target_s"] is not None]
        rejected: dict[str, list[int]] = {}
        for r in rs:
            for reason, n in r["rejected"].items():
                rejected.setdefault(reason, []).append(n)
        med[m] = {"to": statistics.median(reached) if len(reached) * 2 > len(rs) else None,
                  "reached": len(reached), "runs": len(rs),
                  "version": _median(r["version"] for r in rs),
                  "final": _median(r["final_acc"] for r in rs), "used": _median(r["used"] for r in rs),
                  "wasted": _median(r["wasted"] for r in rs), "sent": _median(r["sent"] for r in rs),
                  "rejected": {k: statistics.median(v + [0] * (len(rs) - len(v))) for k, v in rejected.items()}}
    base = med.get(BASELINE, {}).get("to")
    tt = f"to-{target:g}"
    lines = [f"{'mode':<11} {tt + ' ' + clock:>17} {'reached':>7} {'version':>7} {'final acc':>9} {'used':>6} "
             f"{'sent':>6} {'wasted':>6} {'x sync-full':>11}  rejected (median)"]
    for m in modes:
        if m not in med:
            continue
        d = med[m]
        ratio = d["to"] / base if d["to"] is not None and base else None
        lines.append(f"{m:<11} {_fmt(d['to'], '.1f'):>17} {d['reached']:>3}/{d['runs']:<3} {_fmt(d['version'], '.0f'):>7} "
                     f"{_fmt(d['final'], '.4f'):>9} {_fmt(d['used'], '.0f'):>6} {_fmt(d['sent'], '.0f'):>6} "
                     f"{_fmt(d['wasted'], '.0f'):>6} {_fmt(ratio, '.2f'):>11}  "
                     f"{ {k: v for k, v in d['rejected'].items() if v} or ''}")
    lines.append(f"(medians over {seeds} seed(s); {tt} is a median only when most runs reached it; "
                 f"x sync-full = time to {target:g} / sync-full's, both from this run)")
    fb, q = med.get("fedbuff", {}).get("to"), med.get("quorum", {}).get("to")
    if fb is not None and base:
        lines.append(f"FedBuff reaches {target:g} {base / fb:.2f}x sooner than sync-full"
                     + (f"; FedBuff / close_at_quorum time to {target:g}: {fb / q:.2f} (<= 1: no later)" if q else ""))
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="seeds per mode (medians over them)")
    p.add_argument("--quick", action="store_true", help="one seed, and a smaller simulation (200 workers)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--target", type=float, default=TARGET_ACCURACY)
    p.add_argument("--timeout", type=float, default=180.0, help="per real run, seconds")
    p.add_argument("--buffer-size", type=int, default=DEMO_BUFFER_SIZE,
                   help="FedBuff's buffer in the real runs (default: the demo's)")
    p.add_argument("--no-real", action="store_true", help="skip the real-process runs")
    p.add_argument("--no-sim", action="store_true", help="skip the simulated table")
    p.add_argument("--sim-workers", type=int, default=1000)
    p.add_argument("--sim-sigma", type=float, default=0.5, help="lognormal speed spread of simulated workers")
    p.add_argument("--sim-target", type=float, default=TARGET_ACCURACY,
                   help="target accuracy of the simulated table (1,000 workers hold ~1.4 images each)")
    p.add_argument("--sim-seeds", type=int, default=1, help="the simulation is deterministic per seed")
    p.add_argument("--keep", help="keep run directories here (default: a temporary directory)")
    p.add_argument("--json", help="write every run's numbers here")
    args = p.parse_args()
    from fedbus.telemetry import configure_logging

    configure_logging(process="benchmark", level="warning")  # the harness's own nats/server lines are noise here
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        p.error(f"unknown modes {unknown}; choose from {MODES}")
    seeds = 1 if args.quick else args.seeds
    sim_workers = min(args.sim_workers, 200) if args.quick else args.sim_workers
    if seeds < 1 or seeds > 20:
        p.error("--seeds must lie in [1, 20]")
    all_results: dict[str, list[dict]] = {"real": [], "sim": []}
    started = time.perf_counter()
    if not args.no_real:
        print(f"real processes: {WORKERS} workers, {STRAGGLERS} slowed {SLOWDOWN:g}x, digits Dirichlet(0.5), "
              f"target {args.target}, seeds {list(range(seeds))}", flush=True)
        with tempfile.TemporaryDirectory(prefix="fedbus-stragglers-") as tmp:
            root = Path(args.keep).resolve() if args.keep else Path(tmp)
            for seed in range(seeds):
                for mode in modes:  # interleaved, so machine load drifts over all modes alike
                    r = real_run(mode, seed, root, args.timeout, args.target, args.buffer_size)
                    all_results["real"].append(r)
                    print(f"  {mode:<10} seed {seed}: to-target {_fmt(r['to_target_s'], '.2f')} s "
                          f"(v{r['version']}), final {_fmt(r['final_acc'], '.4f')}, used {r['used']}, "
                          f"sent {r['sent']}, wasted {r['wasted']}, rejected {r['rejected'] or 0}, "
                          f"run {r['run_seconds']:.0f} s{'' if r['ok'] else ' FAILED ' + r['error']}", flush=True)
        print()
        print(table(all_results["real"], modes, seeds, "wall s", args.target))
    if not args.no_sim:
        print(f"\nfedbus sim: {sim_workers} simulated workers, {STRAGGLERS * 10} % slowed {SLOWDOWN:g}x, "
              f"lognormal:{args.sim_sigma:g} speeds, IID digits, virtual clock; sync rounds sample "
              f"{min(SIM_COHORT, sim_workers)} workers, async keeps as many training", flush=True)
        try:
            for seed in range(args.sim_seeds):
                for mode in modes:
                    r = sim_run(mode, seed, sim_workers, args.sim_sigma, args.sim_target, sync_rounds=SIM_ROUNDS,
                                async_versions=SIM_VERSIONS)
                    all_results["sim"].append(r)
                    print(f"  {mode:<10} seed {seed}: to-target {_fmt(r['to_target_s'], '.1f')} virtual s "
                          f"(v{r['version']}), final {_fmt(r['final_acc'], '.4f')}, used {r['used']}, "
                          f"wasted {r['wasted']}, {r['run_seconds']:.0f} s wall, "
                          f"peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
            print()
            print(table(all_results["sim"], modes, args.sim_seeds, "virtual s", args.sim_target))
        except Exception as exc:  # the simulator's async support may not be there yet: say so, keep the rest
            print(f"SIMULATION NOT AVAILABLE: {type(exc).__name__}: {exc}")
    print(f"\n(benchmark took {time.perf_counter() - started:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(all_results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
