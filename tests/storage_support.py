"""A job run through the CLI while the nats-server's store directory is measured after
every closed round (the storage-growth test and benchmarks/storage_growth.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.e2e_support import LocalFederation, small_job


def store_bytes(store_dir: Path) -> int:
    """Bytes of every file under the server's store directory (apparent sizes)."""
    total = 0
    for path in store_dir.rglob("*"):
        try:
            if path.is_file():
                total += path.stat().st_size
        except FileNotFoundError:  # a block file the server just removed
            continue
    return total


def sample_rounds(fed: LocalFederation, store_dir: Path, timeout: float) -> list[tuple[int, int]]:
    """(round, store bytes) right after each round.closed line of the coordinator, until it
    exits (bounded by ``timeout``)."""
    try:
        return sample_log_rounds(fed.run_dir / "logs" / "coordinator.log", fed.group.procs["coordinator"],
                                 store_dir, timeout)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}:\n{fed.tail_logs()}") from None


def sample_log_rounds(log: Path, process, store_dir: Path, timeout: float) -> list[tuple[int, int]]:
    """(round, store bytes) right after each round.closed line of the JSON log ``log``, until
    ``process`` (the coordinator, or a demo that runs one) exits; bounded by ``timeout``."""
    samples: list[tuple[int, int]] = []
    offset, pending = 0, ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        exited = process.poll() is not None
        if log.exists():
            with log.open("r", errors="replace") as fh:
                fh.seek(offset)
                chunk = fh.read()
                offset = fh.tell()
            lines = (pending + chunk).split("\n")
            pending = lines.pop()
            for line in lines:
                if '"round.closed"' in line:
                    samples.append((int(json.loads(line)["round"]), store_bytes(store_dir)))
        if exited:
            return samples
        time.sleep(0.02)
    raise TimeoutError(f"the job did not finish within {timeout} s")


def run_sampled(run_dir: Path, nats_url: str, store_dir: Path, *, rounds: int, keep: int, workers: int = 3,
                hidden: int = 128, timeout: float = 600) -> tuple[list[tuple[int, int]], dict]:
    """A flat sync job of ``rounds`` short rounds of the digits MLP (``hidden`` units: 2048
    makes the model ~600 KiB, so models and updates travel as claim-check blobs) keeping
    ``keep`` versions; returns the samples and summary.json."""
    job = small_job(f"storage-{rounds}", rounds=rounds, min_workers=workers, min_updates=workers, deadline_s=30,
                    evaluation={"final_round": False, "server_test": False}, retention={"keep_versions": keep})
    job.task_params["hidden"] = hidden
    fed = LocalFederation(run_dir, nats_url, job, workers)
    try:
        fed.start_coordinator()
        fed.start_workers()
        samples = sample_rounds(fed, store_dir, timeout)
        assert fed.wait_coordinator(timeout=30) == 0, fed.tail_logs()
    finally:
        fed.stop()
    return samples, fed.summary()
