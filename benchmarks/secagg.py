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

Over NATS (``--nats-params``, default 1M, ``--nats-workers``, default 5): an embedded
nats-server and real processes. ``plain``: each worker process publishes its vector as a
signed float32 update (a claim check in the Object Store, as any large update) and the
benchmark process verifies and sums them; timed from the go signal (every worker
connected) to the sum. ``secagg``: ``fedbus secure-sum`` with the same vectors, timed
by the server from the setup message to the unmasked sum (the sum of its phase times;
every worker is listening before the server starts). Bytes: what the server sent and
received (NATS payloads plus claim-checked bodies).

Training rounds over NATS (``--train-rounds``, default 4; ``--train-hidden``, default
13333, a 1M-parameter digits MLP): the same job twice, without and with
``privacy.secure_aggregation`` (clip 1.0), coordinator and ``--nats-workers`` worker
processes through the CLI on one embedded nats-server. Seconds per round: the median of
summary.json's round seconds (round.open to close, training included) over rounds 2..R.
Bytes per round: the nats-server's in + out bytes (``/varz``) from round 1's close to the
job's end, over R - 1 rounds (everything on the wire: model downloads, updates or the
SecAgg+ phases, heartbeats, control).

    python benchmarks/secagg.py [--params 100000] [--clients 10 50 100] [--repeats 3] [--dropout 0.1]
                                [--nats-params 1000000] [--nats-workers 5] [--train-rounds 4] [--train-hidden 13333]

Medians over ``--repeats``; ratios are taken within the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

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


# ---- over NATS: real processes --------------------------------------------------------

def _wait_logged(paths: list[Path], event: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(p.exists() and f'"{event}"' in p.read_text(errors="replace") for p in paths):
            return
        time.sleep(0.1)
    raise RuntimeError(f"not every process logged {event} within {timeout_s} s")


async def _plain_worker(args) -> None:
    """One process publishing its float32 vector as a signed update (claim check when large)."""
    from fedbus.bus import Subjects, connect
    from fedbus.crypto.federation import Federation
    from fedbus.crypto.keys import Identity
    from fedbus.jobspec import JobSpec
    from fedbus.messaging import Messenger
    from fedbus.protocol.messages import Update

    job, federation = JobSpec.load(args.job), Federation.load(args.federation)
    identity = Identity.load(args.key)
    subjects = Subjects(job.job, prefix=job.transport.prefix)
    nc = await connect(args.nats_url, name=identity.id, first_connect_timeout=30)
    go = asyncio.Event()

    async def on_go(msg) -> None:
        go.set()

    sub = await nc.subscribe("bench.go", cb=on_go)
    await nc.publish("bench.ready", identity.id.encode())
    await asyncio.wait_for(go.wait(), 120)
    messenger = Messenger(nc, nc.jetstream(), identity, subjects, inline_max_bytes=job.transport.inline_max_bytes)
    values = torch.from_numpy(np.load(args.input).astype(np.float32))
    await messenger.publish(subjects.upd(federation.get(identity.id).region, identity.id),
                            Update(round=1, base_version=0, num_samples=1, num_steps=1), {"values": values}, round=1)
    await sub.unsubscribe()
    await nc.close()


async def _plain_server(url: str, fed_dir: Path, job, workers: int, group) -> tuple[float, int]:
    """Start the plain workers, say go once all are connected, and time until every update
    is verified and summed. Returns (seconds, bytes received)."""
    from fedbus.bus import Subjects, connect
    from fedbus.bus.layout import ensure_job_infrastructure
    from fedbus.crypto.federation import Federation
    from fedbus.messaging import Messenger, verifier_for

    federation = Federation.load(fed_dir / "federation.yaml")
    subjects = Subjects(job.job, prefix=job.transport.prefix)
    nc = await connect(url, name="plain-server", first_connect_timeout=30)
    js = nc.jetstream()
    await ensure_job_infrastructure(js, subjects)
    ready: set[bytes] = set()

    async def on_ready(msg) -> None:
        ready.add(msg.data)

    await nc.subscribe("bench.ready", cb=on_ready)
    ids = [w.id for w in federation.workers()]
    for w in ids:
        group.start(f"plain-{w}", [sys.executable, str(Path(__file__).resolve()), "--plain-worker", "--job",
                                   str(fed_dir / "job.yaml"), "--federation", str(fed_dir / "federation.yaml"),
                                   "--key", str(fed_dir / "keys" / f"{w}.key"), "--nats-url", url,
                                   "--input", str(fed_dir / f"{w}.npy")])
    psub = await js.pull_subscribe(subjects.upd_all, durable="plain-bench", stream=subjects.upd_stream)
    deadline = time.monotonic() + 180
    while len(ready) < workers and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    messenger = Messenger(nc, js, None, subjects, inline_max_bytes=job.transport.inline_max_bytes)
    verifier = verifier_for(job, federation)
    start = time.perf_counter()
    await nc.publish("bench.go", b"")
    total, received, nbytes = None, 0, 0
    while received < workers and time.monotonic() < deadline:
        try:
            msgs = await psub.fetch(batch=workers, timeout=1)
        except (TimeoutError, asyncio.TimeoutError):
            continue
        for msg in msgs:
            got = await messenger.receive(verifier, msg.data)
            nbytes += len(msg.data) + (got.header.length if got.header.blob else 0)
            values = got.tensors["values"].numpy().astype(np.float64)
            total = values if total is None else total + values
            received += 1
            await msg.ack()
    seconds = time.perf_counter() - start
    await nc.close()
    return seconds, nbytes


def over_nats(params: int, workers: int) -> None:
    """The same vectors summed over a real nats-server by ``workers`` + 1 processes: plain
    signed float32 updates, then ``fedbus secure-sum`` (one SecAgg+ round)."""
    import json
    import tempfile

    from fedbus.bus.server import EmbeddedNatsServer
    from fedbus.demo import ProcessGroup, cli_command, write_federation
    from tests.e2e_support import small_job

    with tempfile.TemporaryDirectory(prefix="secagg-bench-") as tmp:
        tmp = Path(tmp)
        server = EmbeddedNatsServer(store_dir=tmp / "nats").start()
        group = ProcessGroup(tmp, dict(os.environ, FEDBUS_LOG_JSON="1"))
        try:
            job = small_job("secagg-bench", rounds=1, min_workers=1, min_updates=1)
            write_federation(tmp, workers)
            job.dump(tmp / "job.yaml")
            rng = np.random.default_rng(1)
            ids = [f"w{i + 1:02d}" for i in range(workers)]
            for w in ids:
                np.save(tmp / f"{w}.npy", np.clip(rng.normal(0, 0.05, params), -1, 1))
            plain_s, plain_bytes = asyncio.run(_plain_server(server.url, tmp, job, workers, group))
            common = ["--job", str(tmp / "job.yaml"), "--federation", str(tmp / "federation.yaml"),
                      "--nats", server.url, "--round", "2"]
            for w in ids:
                group.start(f"secagg-{w}", cli_command("secure-sum", "worker", *common, "--key",
                                                       str(tmp / "keys" / f"{w}.key"), "--input", str(tmp / f"{w}.npy")))
            _wait_logged([tmp / f"secagg-{w}.log" for w in ids], "secagg.listening", 180)
            sv = group.start("secagg-server", cli_command(
                "secure-sum", "server", *common, "--key", str(tmp / "keys" / "coordinator.key"),
                "--length", str(params), "--phase-timeout", "120", "--out", str(tmp / "out")))
            if sv.wait(timeout=600) != 0:
                raise RuntimeError((tmp / "secagg-server.log").read_text()[-2000:])
            result = json.loads((tmp / "out" / "result.json").read_text())
        finally:
            group.stop_all(grace=5)
            server.stop()
    phases = result["phase_seconds"]
    secagg_s = sum(phases.values())
    secagg_bytes = result["bytes_in"] + result["bytes_out"]
    print(f"\nover NATS: {params:,} parameters, {workers} worker processes + 1 server, one round")
    print(f"{'mode':<8} {'seconds':>8} {'MB':>8} {'x plain s':>10} {'x plain MB':>11}  phases (s)")
    print(f"{'plain':<8} {plain_s:>8.2f} {plain_bytes / 1e6:>8.2f} {1:>10.1f} {1:>11.2f}")
    print(f"{'secagg':<8} {secagg_s:>8.2f} {secagg_bytes / 1e6:>8.2f} {secagg_s / plain_s:>10.1f} "
          f"{secagg_bytes / plain_bytes:>11.2f}  " + " ".join(f"{k}={v:.2f}" for k, v in phases.items()))
    print(f"secagg: k={result['degree']}, t={result['threshold']}, bits={result['bits']} "
          f"(residues sent as uint{32 if result['bits'] <= 32 else 64})")


def _varz_bytes(server) -> int:
    import json
    import urllib.request

    with urllib.request.urlopen(f"{server.monitor_url}/varz", timeout=10) as r:
        varz = json.loads(r.read())
    return int(varz["in_bytes"]) + int(varz["out_bytes"])


def training_job(workers: int, rounds: int, hidden: int, secure: bool):
    from fedbus.jobspec import EvaluationSpec
    from fedbus.privacy.spec import PrivacySpec
    from fedbus.secagg.spec import SecureAggregationSpec
    from tests.e2e_support import small_job

    privacy = PrivacySpec(secure_aggregation=SecureAggregationSpec(clip=1.0, phase_timeout_s=30.0)) if secure \
        else PrivacySpec()
    job = small_job("secagg-train-bench", rounds=rounds, min_workers=workers, min_updates=workers, deadline_s=120.0,
                    evaluation=EvaluationSpec(server_test=False, federated=False, final_round=False), privacy=privacy)
    job.task_params["hidden"] = hidden
    return job


def training_over_nats(workers: int, rounds: int, hidden: int, secure: bool) -> dict:
    """One job over a fresh nats-server; seconds and bytes per round (see the module docstring)."""
    import json
    import tempfile

    from fedbus.bus.server import EmbeddedNatsServer
    from fedbus.demo import ProcessGroup, cli_command, write_federation

    with tempfile.TemporaryDirectory(prefix="secagg-train-bench-") as tmp:
        tmp = Path(tmp)
        server = EmbeddedNatsServer(store_dir=tmp / "nats").start()
        group = ProcessGroup(tmp, dict(os.environ, FEDBUS_LOG_JSON="1"))
        try:
            job = training_job(workers, rounds, hidden, secure)
            federation = write_federation(tmp, workers)
            job.dump(tmp / "job.yaml")
            common = ["--job", str(tmp / "job.yaml"), "--federation", str(tmp / "federation.yaml"),
                      "--nats", server.url]
            coordinator = group.start("coordinator", cli_command(
                "coordinator", *common, "--key", str(tmp / "keys" / "coordinator.key"), "--run-dir", str(tmp / "run")))
            for w in federation.workers():
                group.start(w.id, cli_command("worker", *common, "--key", str(tmp / "keys" / f"{w.id}.key"),
                                              "--id", w.id, "--state-dir", str(tmp / "state" / w.id)))
            log = tmp / "coordinator.log"
            deadline = time.monotonic() + 600
            while '"round.closed"' not in (log.read_text(errors="replace") if log.exists() else ""):
                if time.monotonic() > deadline or coordinator.poll() is not None:
                    raise RuntimeError(log.read_text(errors="replace")[-3000:])
                time.sleep(0.05)
            after_first = _varz_bytes(server)
            if coordinator.wait(timeout=600) != 0:
                raise RuntimeError(log.read_text(errors="replace")[-3000:])
            total = _varz_bytes(server) - after_first
            summary = json.loads((tmp / "run" / "summary.json").read_text())
        finally:
            group.stop_all(grace=5)
            server.stop()
    rows = summary["rounds"]
    assert [r["status"] for r in rows] == ["aggregated"] * rounds, rows
    params = sum(p.numel() for p in __import__("fedbus.tasks", fromlist=["load_task"]).load_task(
        job.task).build_model(job.task_params).parameters())
    out = {"params": params, "seconds": statistics.median(r["seconds"] for r in rows[1:]),
           "bytes": total / (rounds - 1)}
    if secure:
        phases = [r["phase_seconds"] for r in summary["privacy"]["secure_aggregation"][1:]]
        out["phases"] = {k: statistics.median(p[k] for p in phases) for k in phases[0]}
        out["bits"] = summary["privacy"]["secure_aggregation"][0]["bits"]
    return out


def training_table(workers: int, rounds: int, hidden: int) -> None:
    plain = training_over_nats(workers, rounds, hidden, secure=False)
    secure = training_over_nats(workers, rounds, hidden, secure=True)
    print(f"\ntraining rounds over NATS: digits MLP of {plain['params']:,} parameters, {workers} worker processes "
          f"+ coordinator, medians over rounds 2..{rounds}")
    print(f"{'mode':<8} {'s/round':>8} {'MB/round':>9} {'x plain s':>10} {'x plain MB':>11}  secagg phases (s)")
    print(f"{'plain':<8} {plain['seconds']:>8.2f} {plain['bytes'] / 1e6:>9.2f} {1:>10.1f} {1:>11.2f}")
    print(f"{'secagg':<8} {secure['seconds']:>8.2f} {secure['bytes'] / 1e6:>9.2f} "
          f"{secure['seconds'] / plain['seconds']:>10.1f} {secure['bytes'] / plain['bytes']:>11.2f}  "
          + " ".join(f"{k}={v:.2f}" for k, v in secure["phases"].items()) + f"  (bits={secure['bits']})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=int, default=100_000, help="model size (float coordinates)")
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 50, 100])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dropout", type=float, default=0.1, help="fraction dropped before the masked input")
    ap.add_argument("--nats-params", type=int, default=1_000_000, help="model size of the over-NATS run (0: skip it)")
    ap.add_argument("--nats-workers", type=int, default=5)
    ap.add_argument("--train-rounds", type=int, default=4, help="rounds of the training jobs over NATS (0: skip)")
    ap.add_argument("--train-hidden", type=int, default=13_333, help="hidden units of their digits MLP (13333: 1M)")
    # internal: one plain-update worker process of the over-NATS baseline
    ap.add_argument("--plain-worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("--job", "--federation", "--key", "--nats-url", "--input"):
        ap.add_argument(name, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plain_worker:
        asyncio.run(_plain_worker(args))
        return
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
    if args.nats_params:
        over_nats(args.nats_params, args.nats_workers)
    if args.train_rounds:
        training_table(args.nats_workers, args.train_rounds, args.train_hidden)


if __name__ == "__main__":
    main()
