"""Retention decisions (pure: names and numbers in, what to delete out).

The coordinator's service calls these after each commit and performs the deletions; it
decides nothing itself. What is kept:

* model versions: the ``keep`` newest up to the current one, every tagged version, and
  the versions the job state still needs (``pinned``: the bases of late or stale updates);
* model objects of the job: only those a kept version's manifest or the job state names
  (objects of earlier runs, of dropped versions and of failed commit attempts go);
* claim-check blobs of the job: those of rounds not yet committed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class VersionPlan:
    keep: frozenset[int]
    drop: tuple[int, ...]


def plan_versions(versions: Iterable[int], *, current: int, keep: int, tagged: Iterable[int] = (),
                  pinned: Iterable[int] = ()) -> VersionPlan:
    """Which of ``versions`` (those with a manifest) to keep and which to drop."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1 (the current version), got {keep}")
    known = sorted(set(int(v) for v in versions))
    newest = [v for v in known if v <= current][-keep:]
    # Versions above the current one exist only after a rival's commit or a crash between
    # the manifest and the job state: they are not ours to judge, keep them.
    kept = set(newest) | set(tagged) | set(pinned) | {v for v in known if v >= current}
    return VersionPlan(frozenset(v for v in known if v in kept), tuple(v for v in known if v not in kept))


def blob_round(name: str, job: str) -> int | None:
    """The round of a claim-check blob of ``job`` (``Messenger.seal`` names them
    ``<job>/<sender>/<type>/<round>/<random>``); None for anything else."""
    parts = name.split("/")
    if len(parts) != 5 or parts[0] != job or not parts[3].isdigit():
        return None
    return int(parts[3])


def blobs_to_delete(names: Iterable[str], job: str, through_round: int) -> list[str]:
    """Blobs of ``job`` whose round is at most ``through_round`` (committed, not needed)."""
    return sorted(n for n in names if (r := blob_round(n, job)) is not None and r <= through_round)


def model_objects_to_delete(names: Iterable[str], job: str, keep_names: Iterable[str]) -> list[str]:
    """Objects of ``job`` in the models bucket (``<job>/v<version>/<random>``) that no kept
    version or job state record names."""
    keep = set(keep_names)
    prefix = f"{job}/v"
    return sorted(n for n in names if n.startswith(prefix) and n.count("/") == 2 and n not in keep)


def stream_retention(job) -> dict:
    """The stream limits a job's spec sets (``retention``), as keyword arguments of
    ``ensure_job_infrastructure`` / ``ensure_region_updates``: every participant that
    creates a stream of the job passes the same ones, so their settings never flap."""
    return {"max_age_s": job.retention.stream_max_age_s, "max_bytes": job.retention.stream_max_bytes}
