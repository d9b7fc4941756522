"""What sealing adds to one update, end to end over a real nats-server, plain vs sealed in the same run.

End to end is the path a deployed update takes: the worker's ``Messenger.publish`` (encode,
seal to the coordinator's X25519 key when sealed, claim check into the Object Store, sign,
publish to the update stream and wait for JetStream's ack), then the coordinator's
``Messenger.receive`` (header and signature checks, the blob fetched with the fast reader,
digest, open when sealed, decode; offloaded to a thread as the coordinator does). Plain
and sealed alternate within each repeat, so both see the same machine load; medians of
``--repeats``. A second table times the same steps without the bus (the exact functions,
one call each), to show where the added time goes: sealing hashes the plaintext once
(the derived ephemeral key) and encrypts it; opening decrypts it.

"added" is the median over repeats of (sealed - plain) within the same repeat (paired, so a
load spike that hits one repeat moves both); one unmeasured warm-up repeat per size first.

Starts its own nats-server on free 127.0.0.1 ports with a temporary store and stops it.
Usage: python benchmarks/sealing.py [--sizes 20,200] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import time

import structlog
import torch

from fedbus.bus import EmbeddedNatsServer, Subjects, connect, ensure_job_infrastructure
from fedbus.crypto.envelopes import seal
from fedbus.crypto.federation import Federation, FederationFile, Participant
from fedbus.crypto.keys import Identity
from fedbus.crypto.sealing import open_body, seal_body, update_seal_target
from fedbus.jobspec import JobSpec
from fedbus.messaging import Messenger, verifier_for
from fedbus.protocol.messages import Update, decode_body, encode_body

MB = 1_000_000
FIELDS = Update(round=1, base_version=0, num_samples=100, num_steps=10)


def model_of(size_mb: int) -> dict[str, torch.Tensor]:
    """float32 tensors totalling ``size_mb`` MB, in 4 tensors like a model's layers."""
    n = size_mb * MB // 4
    g = torch.Generator().manual_seed(size_mb)
    return {f"layer{i}.weight": torch.randn(n // 4, generator=g) for i in range(4)}


def median(xs: list[float]) -> float:
    return statistics.median(xs)


async def end_to_end(url: str, sizes: list[int], repeats: int) -> dict[tuple[int, str], dict[str, list[float]]]:
    coord, worker = Identity.generate("coord", "coordinator"), Identity.generate("w01", "worker")
    fed = Federation(FederationFile(participants=[Participant(**i.participant_entry()) for i in (coord, worker)]))
    job = JobSpec(job="bench", task="fedbus.tasks.digits:task", rounds=1,
                  security={"max_message_bytes": 2 * max(sizes) * MB})
    subjects = Subjects("bench")
    target = update_seal_target("auto", fed, "w01", regional=False)
    assert target is not None
    nc = await connect(url, name="bench-sealing", first_connect_timeout=10)
    try:
        js = nc.jetstream()
        await ensure_job_infrastructure(js, subjects)
        sender = Messenger(nc, js, worker, subjects, inline_max_bytes=job.transport.inline_max_bytes)
        receiver = Messenger(nc, js, coord, subjects, inline_max_bytes=job.transport.inline_max_bytes)
        verifier = verifier_for(job, fed, max_tensors=16, receiver=coord)
        sub = await js.subscribe(subjects.upd_all, ordered_consumer=True)
        out: dict[tuple[int, str], dict[str, list[float]]] = {}
        for size in sizes:
            model = model_of(size)
            for rep in range(-1, repeats):  # repeat -1: warm-up, not recorded
                for mode in ("plain", "sealed"):
                    t0 = time.perf_counter()
                    header = await sender.publish(subjects.upd("default", "w01"), FIELDS, model, round=1,
                                                  seal_to=target if mode == "sealed" else None)
                    t1 = time.perf_counter()
                    msg = await sub.next_msg(timeout=300)
                    t2 = time.perf_counter()
                    got = await receiver.receive(verifier, msg.data, sender_token="w01", offload=True)
                    t3 = time.perf_counter()
                    if got.sealed != (mode == "sealed") or not torch.equal(got.tensors["layer3.weight"],
                                                                            model["layer3.weight"]):
                        raise SystemExit(f"{mode} update did not come back intact")
                    del got
                    await sender.blobs.delete(header.blob.name)  # keep the store small
                    if rep < 0:
                        continue
                    times = out.setdefault((size, mode), {"publish": [], "receive": [], "total": []})
                    times["publish"].append(t1 - t0)
                    times["receive"].append(t3 - t2)
                    times["total"].append((t1 - t0) + (t3 - t2))
                    print(f"  {size} MB {mode:6s} repeat {rep + 1}: publish {t1 - t0:.3f} s, "
                          f"receive {t3 - t2:.3f} s", flush=True)
        await sub.unsubscribe()
        return out
    finally:
        await nc.close()


def steps_without_bus(sizes: list[int], repeats: int) -> dict[int, dict[str, float]]:
    """Median seconds of each step the sealed path adds or changes, called directly."""
    coord, worker = Identity.generate("coord", "coordinator"), Identity.generate("w01", "worker")
    out = {}
    for size in sizes:
        model = model_of(size)
        times: dict[str, list[float]] = {k: [] for k in ("encode", "seal_body", "sign", "open_body", "decode")}
        for _ in range(repeats):
            t = time.perf_counter()
            body = encode_body(FIELDS, model)
            times["encode"].append(time.perf_counter() - t)
            t = time.perf_counter()
            box = seal_body(body, coord.encryption_public_key, sender_secret=worker.encryption_key)
            times["seal_body"].append(time.perf_counter() - t)
            t = time.perf_counter()
            seal(worker, "update", job="bench", round=1, body=box)  # digest + Ed25519 over the header
            times["sign"].append(time.perf_counter() - t)
            t = time.perf_counter()
            plain = open_body(box, coord.encryption_key)
            times["open_body"].append(time.perf_counter() - t)
            t = time.perf_counter()
            decode_body(Update, plain, max_tensors=16)
            times["decode"].append(time.perf_counter() - t)
            del body, box, plain
        out[size] = {k: median(v) for k, v in times.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="20,200", help="update sizes in MB (10^6 bytes), comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    torch.set_num_threads(1)

    server = EmbeddedNatsServer().start()
    try:
        print(f"end to end over nats-server {server.url}, {args.repeats} repeats, plain and sealed alternating")
        e2e = asyncio.run(end_to_end(server.url, sizes, args.repeats))
    finally:
        server.stop()
    print()
    print("End to end (worker publish -> coordinator receive), medians in seconds")
    print(f"{'size':>7} | {'plain':>7} | {'sealed':>7} | {'added':>7} | {'ratio':>6} | {'publish +':>9} | "
          f"{'receive +':>9} | {'added s/GB':>10}")
    for size in sizes:
        p, s = e2e[(size, "plain")], e2e[(size, "sealed")]

        def added(part: str) -> float:  # paired: sealed minus plain within each repeat
            return median([b - a for a, b in zip(p[part], s[part])])

        plain, sealed = median(p["total"]), median(s["total"])
        print(f"{size:>4} MB | {plain:7.3f} | {sealed:7.3f} | {added('total'):7.3f} | {sealed / plain:5.2f}x | "
              f"{added('publish'):9.3f} | {added('receive'):9.3f} | {added('total') / (size / 1000):10.2f}")
    print()
    steps = steps_without_bus(sizes, args.repeats)
    print("The steps alone (no bus), medians in seconds; sealing adds seal_body and open_body")
    print(f"{'size':>7} | {'encode':>7} | {'seal_body':>9} | {'sign':>7} | {'open_body':>9} | {'decode':>7}")
    for size in sizes:
        st = steps[size]
        print(f"{size:>4} MB | {st['encode']:7.3f} | {st['seal_body']:9.3f} | {st['sign']:7.3f} | "
              f"{st['open_body']:9.3f} | {st['decode']:7.3f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
