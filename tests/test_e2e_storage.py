"""Storage is bounded (issue 13, acceptance point 4): over a long job with retention, the
bytes in the nats-server store directory stop growing once the retention window is full.

3 workers and the coordinator run as CLI processes on a real nats-server; the digits MLP
has 2048 hidden units (~600 KiB), so the model, each round.open and every update travel
as claim-check blobs and each round writes at least (2 + workers) x 600 KiB to the store.
Without retention that is the store's growth per round; with it, old model objects,
committed rounds' blobs, acknowledged updates and dropped manifests are deleted, and the
server compacts its blocks: the size oscillates (block compaction is lazy) around a
plateau. The test fits a line to the second half of the job and requires its slope to be
below 15 % of what one round writes, and the second half's peak to stay within 1.25 x the
first half's. Measured: with retention 75 KiB/round and 1.04 x; keeping every version
(blobs and acknowledged updates still deleted) 603 KiB/round (20 %) and 1.45 x, so both
checks fail.
``benchmarks/storage_growth.py`` prints the curve of a 200-round job.
"""

from __future__ import annotations

import pytest

from tests.storage_support import run_sampled

pytestmark = pytest.mark.e2e

ROUNDS = 40
KEEP = 3
WORKERS = 3
HIDDEN = 2048
MODEL_BYTES = 4 * (64 * HIDDEN + HIDDEN + HIDDEN * 10 + 10)


def slope(points: list[tuple[int, int]]) -> float:
    """Least-squares bytes per round."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)


def test_store_stops_growing_after_the_retention_window(nats_server, tmp_path):
    samples, summary = run_sampled(tmp_path / "run", nats_server.url, nats_server.store_dir, rounds=ROUNDS,
                                   keep=KEEP, workers=WORKERS, hidden=HIDDEN, timeout=240)
    assert summary["reason"] == "completed" and summary["rounds_completed"] == ROUNDS, summary
    assert [r for r, _ in samples] == list(range(1, ROUNDS + 1))
    written_per_round = (2 + WORKERS) * MODEL_BYTES
    first = [s for s in samples if s[0] <= ROUNDS // 2]
    second = [s for s in samples if s[0] > ROUNDS // 2]
    growth = slope(second)
    curve = " ".join(f"{r}:{b // 1024}" for r, b in samples)
    print(f"store KiB by round: {curve}")
    peaks = max(b for _, b in second) / max(b for _, b in first)
    print(f"second-half slope {growth / 1024:+.1f} KiB/round; one round writes >= {written_per_round / 1024:.0f} KiB; "
          f"second-half peak {peaks:.2f} x the first half's")
    assert growth < 0.15 * written_per_round, curve
    assert peaks <= 1.25, curve
