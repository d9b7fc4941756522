"""Read a 100 MiB object three ways and compare: nats-py get(), get(writeinto=...), BlobStore.get.

Starts its own embedded nats-server on free 127.0.0.1 ports with a temporary store,
and stops it at the end. Usage: python benchmarks/blob_read.py [--mib 100] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import os
import statistics
import sys
import time

import structlog

from fedbus.bus import BlobStore, EmbeddedNatsServer, Subjects, connect, ensure_job_infrastructure

# nats-py's own get() can take minutes on big objects; don't let a run hang forever.
PER_READ_TIMEOUT = 180.0


async def _timed(read, repeats: int, expected: bytes) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        data = await asyncio.wait_for(read(), PER_READ_TIMEOUT)
        times.append(time.perf_counter() - start)
        if len(data) != len(expected) or data != expected:
            raise SystemExit("benchmark read returned wrong data")
        del data
    return times


async def run(url: str, mib: int, repeats: int) -> list[tuple[str, list[float]]]:
    nc = await connect(url, "bench-blob-read", first_connect_timeout=10)
    try:
        js = nc.jetstream()
        await ensure_job_infrastructure(js, Subjects("bench"))
        blobs = BlobStore(nc, js)
        payload = os.urandom(mib * 1024 * 1024)
        start = time.perf_counter()
        ref = await blobs.put("bench-object", payload)
        print(f"put {mib} MiB in {time.perf_counter() - start:.2f} s ({blobs.chunk_size} B chunks)", flush=True)
        obj = await js.object_store(blobs.bucket)

        async def nats_py_get() -> bytes:
            return (await obj.get("bench-object")).data

        async def nats_py_get_writeinto() -> bytes:
            sink = io.BytesIO()
            await obj.get("bench-object", writeinto=sink)
            return sink.getbuffer()

        async def blobstore_get() -> bytearray:
            return await blobs.get("bench-object", expected_size=ref.size, expected_digest=ref.digest)

        results = []
        for label, read in [
            ("nats-py ObjectStore.get()", nats_py_get),
            ("nats-py get(writeinto=BytesIO)", nats_py_get_writeinto),
            ("fedbus BlobStore.get()", blobstore_get),
        ]:
            times = await _timed(read, repeats, payload)
            results.append((label, times))
            print(f"  {label}: " + ", ".join(f"{t:.2f}" for t in times) + " s", flush=True)
        return results
    finally:
        await nc.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    with EmbeddedNatsServer() as server:
        results = asyncio.run(run(server.url, args.mib, args.repeats))

    fastest = min(statistics.median(t) for _, t in results)
    print(f"\n{args.mib} MiB object, median of {args.repeats} reads")
    print(f"{'reader':34s} {'median s':>9s} {'MiB/s':>8s} {'x fastest':>10s}")
    for label, times in results:
        med = statistics.median(times)
        print(f"{label:34s} {med:9.2f} {args.mib / med:8.0f} {med / fastest:10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
