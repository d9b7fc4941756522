"""The sealed-body construction alone (no bus): seal and open one body, medians of --repeats.

Times exactly what a worker and a recipient do per sealed update
(``fedbus/crypto/sealing.py``):

- ``hash``: the SHA-256 pass over the plaintext behind the deterministic ephemeral key
  (part of ``seal``, shown apart because it is not the cipher);
- ``seal``: ``seal_pieces`` over the body's pieces (4 tensor-like views and a small field
  header, as ``Messenger`` passes them), its chunks drained one at a time as
  ``BlobStore.put_stream`` drains them (hash included);
- ``open in place``: ``open_body(..., in_place=True)`` over a writable copy of the
  ciphertext, as the verifier opens a fetched blob;
- ``open``: ``open_body`` into a new buffer (inline bodies, callers keeping the ciphertext).

Reference, same machine, 200 MB. The cipher alone, 1 MiB chunks: libsodium secretstream
push 0.155 s (pull about the same), OpenSSL ChaCha20-Poly1305 0.056 s, AES-256-GCM 0.022 s.
This script on the secretstream code (format FBS2), quiet machine: hash 0.111 s, seal
0.272 s, open in place 0.167 s, open 0.284 s; on AES-256-GCM (FBS3): 0.111, 0.145, 0.029
and 0.133 s. (``open`` is mostly the new 200 MB buffer's page faults.)

Usage: python benchmarks/sealing_speed.py [--mb 200] [--repeats 3]   (keep --mb <= 200)
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time

import torch

from fedbus.crypto.keys import Identity
from fedbus.crypto.sealing import SEAL_HEADER, open_body, seal_body, seal_pieces


def body_pieces(mb: int) -> list[memoryview]:
    """A small field header and 4 float32 tensors totalling ``mb`` MB (chunks straddle them)."""
    n = mb * 1_000_000 // 4 // 4
    g = torch.Generator().manual_seed(mb)
    tensors = [torch.randn(n + i, generator=g) for i in range(4)]  # odd sizes: unaligned pieces
    return [memoryview(b"\x85" + bytes(200))] + [memoryview(t.numpy()).cast("B") for t in tensors]


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.mb > 200:
        parser.error("keep --mb at most 200 (shared machine)")
    coord, worker = Identity.generate("coord", "coordinator"), Identity.generate("w01", "worker")
    pieces = body_pieces(args.mb)
    size = sum(p.nbytes for p in pieces)
    times: dict[str, list[float]] = {k: [] for k in ("hash", "seal", "open in place", "open")}
    for _ in range(args.repeats):
        def hash_only():
            hasher = hashlib.sha256()
            for p in pieces:
                hasher.update(p)
            return hasher.digest()

        times["hash"].append(timed(hash_only)[0])

        def seal_drained() -> int:
            length, stream = seal_pieces(pieces, coord.encryption_public_key, sender_secret=worker.encryption_key)
            return sum(len(chunk) for chunk in stream)  # each chunk dropped once counted

        elapsed, length = timed(seal_drained)
        times["seal"].append(elapsed)
        box = seal_body(b"".join(pieces), coord.encryption_public_key, sender_secret=worker.encryption_key)
        assert len(box) == length
        fetched = bytearray(box)
        elapsed, plain = timed(lambda: open_body(fetched, coord.encryption_key, in_place=True))
        times["open in place"].append(elapsed)
        assert len(plain) == size and plain[:201] == pieces[0].tobytes()
        del plain, fetched
        times["open"].append(timed(lambda: open_body(box, coord.encryption_key))[0])
        del box
    mb = size / 1e6
    print(f"{mb:.0f} MB body ({size} bytes), header {SEAL_HEADER} bytes, medians of {args.repeats}:")
    for name, xs in times.items():
        m = statistics.median(xs)
        print(f"  {name:>14}: {m:.3f} s  ({mb / 1000 / m:.1f} GB/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
