"""What the signed audit chain costs: appending records (signed, published with
Nats-Expected-Last-Subject-Sequence, acknowledged one by one) against the unsigned,
unconditioned publish of the same JSON, and `verify` (read + check every signature and
link) per record.

Starts its own embedded nats-server on free 127.0.0.1 ports with a temporary store, and
stops it at the end. Usage: python benchmarks/audit_chain.py [--records 2000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import time

import structlog

from fedbus.audit import AuditTrail
from fedbus.audit.reader import verify_audit
from fedbus.bus import EmbeddedNatsServer, Subjects, connect, ensure_job_infrastructure, publish_with_retry
from fedbus.crypto.federation import Federation, FederationFile, Participant
from fedbus.crypto.keys import Identity

FIELDS = {"kind": "update", "sender": "w01", "reason": "bad_signature", "count": 3, "detail": "w01",
          "since_ms": 1_700_000_000_000, "until_ms": 1_700_000_005_000}


async def one(url: str, n: int, index: int) -> tuple[float, float, float]:
    me = Identity.generate("coordinator", "coordinator")
    federation = Federation(FederationFile(federation="b", participants=[Participant(**me.participant_entry())]))
    subjects = Subjects(f"bench-{index}")
    nc = await connect(url, "bench-audit", first_connect_timeout=10)
    try:
        js = nc.jetstream()
        await ensure_job_infrastructure(js, subjects)
        trail = AuditTrail(js, subjects, me)
        await trail.resume()
        start = time.perf_counter()
        for i in range(n):
            assert await trail.publish("rejections", i=i, **FIELDS)
        signed = (time.perf_counter() - start) / n
        start = time.perf_counter()
        verdict = await verify_audit(js, subjects, federation)
        checked = (time.perf_counter() - start) / verdict.records
        assert verdict.writers == {"coordinator": n}
        start = time.perf_counter()
        for i in range(n):  # the old way: unsigned JSON, no expected sequence
            await publish_with_retry(js, subjects.audit_of("plain"), json.dumps({"i": i, **FIELDS}).encode())
        plain = (time.perf_counter() - start) / n
        return signed, plain, checked
    finally:
        await nc.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    rows = []
    with EmbeddedNatsServer() as server:
        for r in range(args.repeats):
            rows.append(asyncio.run(one(server.url, args.records, r)))
    signed, plain, checked = (statistics.median(col) for col in zip(*rows))
    print(f"{args.records} records x {args.repeats} runs (medians):")
    print(f"  append signed + expected-sequence: {signed * 1e3:.3f} ms/record")
    print(f"  append unsigned JSON, no condition: {plain * 1e3:.3f} ms/record  (ratio {signed / plain:.2f}x)")
    print(f"  verify (read + signature + link):   {checked * 1e3:.3f} ms/record "
          f"({1 / checked:,.0f} records/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
