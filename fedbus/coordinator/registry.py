"""WorkerRegistry: who is alive and what each worker declared on its heartbeats.

Pure: time comes in with every call. Shared by the sync machine and (later) the async one.
The declared sample count is what bounds a worker's ``num_samples`` claim on its updates.
"""

from __future__ import annotations


class WorkerRegistry:
    def __init__(self, liveness_ms: int):
        self.liveness_ms = liveness_ms
        self._seen: dict[str, tuple[int, int]] = {}  # id -> (declared samples, last seen ms)

    def seen(self, worker: str, num_samples: int, now_ms: int) -> None:
        self._seen[worker] = (num_samples, now_ms)

    def forget(self, worker: str) -> None:
        """A revoked worker: out of every later cohort at once, not when its heartbeats lapse."""
        self._seen.pop(worker, None)

    def alive(self, now_ms: int) -> list[str]:
        return sorted(w for w, (_, seen) in self._seen.items() if now_ms - seen <= self.liveness_ms)

    def enough_alive(self, needed: int, now_ms: int) -> bool:
        """Whether at least ``needed`` workers are alive. Asked on every heartbeat while a job
        waits for its federation: O(1) while fewer have ever been seen, else one pass
        without sorting (``alive`` sorts: 1,000 workers beating would cost 1,000 sorts a second)."""
        if len(self._seen) < needed:
            return False
        return sum(1 for _, seen in self._seen.values() if now_ms - seen <= self.liveness_ms) >= needed

    def declared(self, worker: str) -> int | None:
        entry = self._seen.get(worker)
        return entry[0] if entry else None

    def __len__(self) -> int:
        return len(self._seen)
