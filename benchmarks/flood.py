"""Bounded floods against a fedbus job, and what they cost the coordinator.

Publisher mode: one process, a bounded number of messages, then exit. It prints one
JSON line: {"kind", "sent", "seconds", "rate"}.

    python benchmarks/flood.py --nats URL --job J --kind junk-hb  --count N
    python benchmarks/flood.py --nats URL --job J --kind junk-upd --count N [--federation FED]
    python benchmarks/flood.py --nats URL --job J --kind signed-hb --count N --key w05.key --federation FED

Kinds:
- junk-hb: a client with no key. Random bytes and malformed envelopes (garbage
  header, truncated frames, well-formed envelopes signed by unlisted keys, and, with
  --federation, envelopes that claim a listed worker but carry a wrong signature) on
  `<prefix>.<job>.hb.<random worker id>`, over core NATS.
- junk-upd: the same on `<prefix>.<job>.upd.<region>.<random worker id>`. The update
  stream captures these subjects; they are published as core NATS messages on the
  stream's subjects (no ack awaited), flushed in bounded batches.
- Junk never goes on a listed worker's own subject unless --target-listed: in fedbus's
  threat model the subject names the sender and NATS permissions (deploy/nats) stop
  others from publishing on it. Without them, junk on `hb.w01` spends w01's heartbeat
  budget and junk on `upd.<region>.w01` can evict w01's unread updates (per-subject cap).
- signed-hb: a validly signed heartbeat storm from one listed worker (its key), fresh
  nonces and timestamps, as fast as this process can sign.

Measure mode runs its own small job (nats-server, coordinator, workers through the
CLI), floods it while it runs, and prints the coordinator's cost per 100k junk
messages (peak RSS increase, audit records, log bytes) and the job's outcome:

    python benchmarks/flood.py measure [--junk 200000] [--storm 100000] [--rounds 5]

Head-of-line mode shows why a coordinator should not receive heartbeats on the
connection it commits and publishes on: two processes flood one heartbeat subject
(with NATS headers, like signed heartbeats) at a subscriber whose callback costs
~60 us, while JetStream publishes with acks (5 s timeout) go out on the same
connection, then on a separate one:

    python benchmarks/flood.py headofline
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path

import nats

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, this file's directory is on sys.path, not the checkout it belongs to.
sys.path.insert(0, str(ROOT))

JUNK_KINDS = ("junk-hb", "junk-upd")
KINDS = (*JUNK_KINDS, "signed-hb")
# Flush after this many messages: the client's outgoing buffer stays bounded and the
# server sees a steady stream rather than one 100 MB burst.
FLUSH_EVERY = 500


def _random_token(rng: random.Random) -> str:
    return "x" + rng.getrandbits(48).to_bytes(6, "big").hex()


class JunkMaker:
    """Malformed and unauthenticated messages; signing is done once per template, so
    the publisher's rate is bounded by NATS, not by Ed25519."""

    def __init__(self, job: str, msg_type: str, listed: list[str], seed: int, templates: int = 64):
        from fedbus.crypto.envelopes import seal
        from fedbus.crypto.keys import Identity
        from fedbus.protocol.envelope import MAGIC

        self.rng = random.Random(seed)
        self.magic = MAGIC
        self.listed = listed
        rng = self.rng
        self.unknown: list[tuple[str, bytes]] = []  # (sender token, wire)
        self.forged: list[tuple[str, bytes]] = []
        for i in range(templates):
            mallory = Identity.generate(f"mallory{i}", "worker")
            body = rng.randbytes(rng.randrange(8, 200))
            wire, _ = seal(mallory, msg_type, job=job, round=rng.randrange(0, 8), body=body)
            self.unknown.append((mallory.id, wire))
            if listed:
                # A header that names a listed worker, signed with some other key.
                claimed = Identity(listed[i % len(listed)], "worker", "default", mallory.signing_key)
                wire, _ = seal(claimed, msg_type, job=job, round=rng.randrange(0, 8), body=body)
                self.forged.append((claimed.id, wire))

    def next(self) -> tuple[str | None, bytes]:
        """(sender token the subject should carry, or None for a random one; payload)."""
        rng = self.rng
        pick = rng.random()
        if pick < 0.35:
            return None, rng.randbytes(rng.randrange(0, 256))
        if pick < 0.55:  # right magic, nonsense header length and header
            return None, self.magic + rng.randbytes(2) + rng.randbytes(rng.randrange(0, 200))
        token, wire = self.unknown[rng.randrange(len(self.unknown))]
        if pick < 0.65:  # truncated somewhere in the header or signature
            return token, wire[: rng.randrange(1, len(wire))]
        if pick < 0.85 or not self.forged:
            return token, wire
        return self.forged[rng.randrange(len(self.forged))]


def _listed_workers(federation: str | None) -> list[str]:
    if not federation:
        return []
    from fedbus.crypto.federation import Federation

    return [p.id for p in Federation.load(federation).workers()]


async def _connect(url: str, name: str):
    # Plain nats-py: a junk client needs nothing from fedbus's connection defaults.
    return await nats.connect(url, name=name, pending_size=8 * 1024 * 1024, max_reconnect_attempts=3,
                              connect_timeout=5)


async def _wait_for_go(args) -> None:
    """With --go-file: say we are ready (connected, templates built), then wait for the
    file, so that a harness can aim the flood at a moment of the job."""
    if args.go_file:
        print(json.dumps({"ready": args.kind, "pid": os.getpid()}), flush=True)
        give_up = time.monotonic() + args.max_wait
        while not Path(args.go_file).exists():
            if time.monotonic() > give_up:
                raise SystemExit(f"no {args.go_file} within {args.max_wait} s")
            await asyncio.sleep(0.02)
    args.started = time.monotonic()
    args.started_wall = time.time()


async def publish_junk(args) -> int:
    prefix, job = args.prefix, args.job
    listed = _listed_workers(args.federation)
    msg_type = "heartbeat" if args.kind == "junk-hb" else "update"
    maker = JunkMaker(job, msg_type, listed, args.seed)
    rng = random.Random(args.seed + 1)

    def junk() -> tuple[str, bytes, dict | None]:
        token, payload = maker.next()
        if token in listed and not args.target_listed:
            token = None  # a forged claim, but on a subject that is not the worker's
        token = token or _random_token(rng)
        family = "hb" if args.kind == "junk-hb" else f"upd.{args.region}"
        return f"{prefix}.{job}.{family}.{token}", payload, None

    return await _publish_bounded(args, f"flood-{args.kind}", junk)


async def publish_signed_heartbeats(args) -> int:
    from fedbus.crypto.envelopes import seal
    from fedbus.crypto.keys import Identity
    from fedbus.messaging import nats_headers
    from fedbus.protocol.messages import Heartbeat, encode_body

    if not args.key:
        raise SystemExit("signed-hb needs --key (a listed worker's key file)")
    me = Identity.load(args.key)
    listed = _listed_workers(args.federation)
    if listed and me.id not in listed:
        raise SystemExit(f"{me.id} is not a worker of {args.federation}")
    # Declare plenty of samples: the coordinator caps a worker's update claims by its last
    # heartbeat, and this storm is about rate, not about shrinking the real w01's claim.
    body = encode_body(Heartbeat(num_samples=args.declare_samples, partition=0))
    subject = f"{args.prefix}.{args.job}.hb.{me.id}"

    def signed() -> tuple[str, bytes, dict | None]:
        wire, header = seal(me, "heartbeat", job=args.job, round=0, body=body)
        return subject, wire, nats_headers(header)

    return await _publish_bounded(args, f"flood-signed-hb-{me.id}", signed)


async def _publish_bounded(args, client_name: str, next_message) -> int:
    """Publish ``next_message()``s until --count or --max-seconds, flushing every FLUSH_EVERY."""
    nc = await _connect(args.nats, client_name)
    await _wait_for_go(args)
    sent = 0
    deadline = time.monotonic() + args.max_seconds
    try:
        while sent < args.count and time.monotonic() < deadline:
            for _ in range(min(FLUSH_EVERY, args.count - sent)):
                subject, payload, headers = next_message()
                await nc.publish(subject, payload, headers=headers)
                sent += 1
            await nc.flush(timeout=30)
            await _pace(args, sent)
    finally:
        await nc.close()
    return sent


async def _pace(args, sent: int) -> None:
    """With --rate, never run ahead of rate x elapsed; otherwise yield only."""
    if args.rate <= 0:
        return
    ahead = sent / args.rate - (time.monotonic() - args.started)
    if ahead > 0:
        await asyncio.sleep(ahead)


def run_publisher(args) -> dict:
    if args.count < 0 or args.count > 10_000_000:
        raise SystemExit("--count must be between 0 and 10,000,000")
    publish = {"signed-hb": publish_signed_heartbeats, "header-hb": publish_header_heartbeats}.get(args.kind, publish_junk)
    sent = asyncio.run(publish(args))
    seconds = time.monotonic() - args.started
    return {"kind": args.kind, "sent": sent, "seconds": round(seconds, 3),
            "rate": round(sent / seconds) if seconds > 0 else None, "pid": os.getpid(),
            "start_wall": round(args.started_wall, 3), "end_wall": round(time.time(), 3)}


def run_measure(args) -> dict:
    from fedbus.bus.server import EmbeddedNatsServer
    from tests.flood_support import FloodPlan, run_flooded_job

    run_dir = Path(args.run_dir) if args.run_dir else Path(f"/tmp/fedbus-flood-{os.getpid()}")
    run_dir.mkdir(parents=True, exist_ok=True)
    server = EmbeddedNatsServer(store_dir=run_dir / "nats-store").start()
    try:
        junk_hb = args.junk_hb if args.junk_hb is not None else args.junk // 2
        junk_upd = args.junk_upd if args.junk_upd is not None else args.junk - args.junk // 2
        plan = FloodPlan(junk_hb=junk_hb, junk_upd=junk_upd, storm_count=args.storm,
                         storm_workers=tuple(w for w in args.storm_workers.split(",") if w),
                         rounds=args.rounds, deadline_s=args.deadline)
        return run_flooded_job(run_dir, server.url, plan)
    finally:
        server.stop()


def _busy(us: float) -> None:
    end = time.perf_counter() + us / 1e6
    while time.perf_counter() < end:
        pass


async def _headofline_once(url: str, separate: bool, floods: int, probes: int) -> dict:
    import subprocess
    import statistics

    from fedbus.bus import Subjects, connect, ensure_job_infrastructure

    subjects = Subjects("hol")
    ctl = await connect(url, "hol-control")
    js = ctl.jetstream()
    await ensure_job_infrastructure(js, subjects)
    hb_conn = await connect(url, "hol-heartbeats") if separate else ctl

    async def on_heartbeat(msg) -> None:
        _busy(60)  # verification work that never awaits, like a real handler

    await hb_conn.subscribe(subjects.hb_all, cb=on_heartbeat)
    procs = [subprocess.Popen([sys.executable, __file__, "--nats", url, "--job", "hol", "--kind", "header-hb",
                               "--count", "400000", "--max-seconds", "60"], stdout=subprocess.DEVNULL)
             for _ in range(floods)]
    try:
        await asyncio.sleep(1.0)
        latencies, timeouts = [], 0
        for _ in range(probes):
            started = time.perf_counter()
            try:
                await js.publish(subjects.ctl("probe"), b"1", timeout=5)
                latencies.append(time.perf_counter() - started)
            except Exception:
                timeouts += 1
            await asyncio.sleep(0.3)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        if separate:
            await hb_conn.close()
        await ctl.close()
    return {"connection": "separate" if separate else "shared", "probes": probes, "timeouts_5s": timeouts,
            "median_ack_s": round(statistics.median(latencies), 3) if latencies else None,
            "max_ack_s": round(max(latencies), 3) if latencies else None}


def run_headofline(args) -> list[dict]:
    from fedbus.bus.server import EmbeddedNatsServer

    server = EmbeddedNatsServer().start()
    try:
        return [asyncio.run(_headofline_once(server.url, separate, floods=2, probes=10)) for separate in (False, True)]
    finally:
        server.stop()


async def publish_header_heartbeats(args) -> int:
    """Unsigned heartbeat-sized messages with the NATS headers a signed one carries."""
    nc = await _connect(args.nats, "flood-header-hb")
    subject = f"{args.prefix}.{args.job}.hb.w01"
    sent = 0
    args.started, args.started_wall = time.monotonic(), time.time()
    try:
        while sent < args.count and time.monotonic() - args.started < args.max_seconds:
            for _ in range(FLUSH_EVERY):
                await nc.publish(subject, b"x" * 200, headers={"Nats-Msg-Id": f"{sent:032x}", "Fedbus-Type": "heartbeat"})
                sent += 1
            await nc.flush(timeout=30)
    finally:
        await nc.close()
    return sent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", choices=("publish", "measure", "headofline"), default="publish")
    parser.add_argument("--nats", help="server URL (publish mode)")
    parser.add_argument("--job", help="job id (publish mode)")
    parser.add_argument("--prefix", default="fedbus")
    parser.add_argument("--region", default="default")
    parser.add_argument("--kind", choices=(*KINDS, "header-hb"))
    parser.add_argument("--count", type=int, default=100_000, help="messages to publish (bounded)")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="stop after this long even if not done")
    parser.add_argument("--rate", type=float, default=0.0, help="messages per second; 0 = as fast as possible")
    parser.add_argument("--key", help="signed-hb: the listed worker's key file")
    parser.add_argument("--federation", help="federation file: listed worker ids (forged claims, key check)")
    parser.add_argument("--target-listed", action="store_true",
                        help="also put junk on listed workers' own subjects (attacker not stopped by permissions)")
    parser.add_argument("--declare-samples", type=int, default=10_000, help="signed-hb: num_samples declared")
    parser.add_argument("--go-file", help="print a ready line, then start publishing once this file exists")
    parser.add_argument("--max-wait", type=float, default=300.0, help="longest wait for --go-file (s)")
    parser.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(4), "big"))
    # measure mode
    parser.add_argument("--junk", type=int, default=200_000, help="measure: junk messages, half hb, half upd")
    parser.add_argument("--junk-hb", type=int, help="measure: junk on heartbeat subjects (overrides --junk half)")
    parser.add_argument("--junk-upd", type=int, help="measure: junk on update subjects (overrides --junk half)")
    parser.add_argument("--storm", type=int, default=100_000, help="measure: signed heartbeats per storm process")
    parser.add_argument("--storm-workers", default="w05,w01",
                        help="measure: listed workers whose keys storm (w05 idle, w01 running); '' for none")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--deadline", type=float, default=4.0, help="measure: round deadline (s)")
    parser.add_argument("--run-dir", help="measure: where logs and results go")
    args = parser.parse_args(argv)
    if args.mode == "headofline":
        for row in run_headofline(args):
            print(json.dumps(row))
        return 0
    if args.mode == "measure":
        result = run_measure(args)
        print(json.dumps(result, indent=2))
        return 0 if result.get("job_ok") else 1
    if not (args.nats and args.job and args.kind):
        parser.error("publish mode needs --nats, --job and --kind")
    print(json.dumps(run_publisher(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
