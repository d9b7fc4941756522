"""RunSummary: what a coordinator run leaves behind in summary.json."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from fedbus.atomicfile import atomic_write_json


@dataclass
class RunSummary:
    job: str
    task: str
    rounds_planned: int
    reason: str = "running"
    rounds_completed: int = 0
    model_version: int = 0
    wall_seconds: float = 0.0
    updates_accepted: int = 0
    # Accepted updates whose body travelled sealed (fedbus.crypto.sealing), over every incarnation.
    updates_sealed: int = 0
    rejected: Counter = field(default_factory=Counter)
    rounds: list[dict] = field(default_factory=list)
    final: dict[str, float] = field(default_factory=dict)
    resumed_from_round: int | None = None
    run: str = ""
    incarnations: int = 1  # coordinator processes that worked on this run (1 + resumes)
    error: str = ""
    rejected_before: Counter = field(default_factory=Counter)  # by earlier incarnations
    # Longest time between two heartbeats of one live worker as the coordinator handled
    # them, and update messages delivered more than once: both show a starved event loop.
    max_heartbeat_gap_s: float = 0.0
    redeliveries: int = 0
    # Client-level DP (privacy.dp): ε at the target δ over the rounds accounted, and how.
    privacy: dict = field(default_factory=dict)
    # Body bytes (the signed length, inline or in the Object Store) of the updates accepted.
    update_bytes: int = 0
    # Heartbeats verified and fed to the machine, and the event loop's CPU time spent on every
    # heartbeat received (refused ones included): handled / cpu_s is how many one coordinator
    # core can take (benchmarks/participants.py), over every incarnation.
    heartbeats_handled: int = 0
    heartbeat_cpu_s: float = 0.0

    def set_rejections(self, this_incarnation: Counter) -> None:
        self.rejected = self.rejected_before + this_incarnation

    def add_wall(self, seconds: float) -> None:
        self.wall_seconds += seconds

    @classmethod
    def load(cls, path: Path, *, run: str) -> RunSummary | None:
        """The summary an earlier incarnation of ``run`` wrote, to be continued; None if absent
        or of another run."""
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(d, dict) or d.get("run") != run:
            return None
        s = cls(job=d["job"], task=d["task"], rounds_planned=d["rounds_planned"])
        s.run = run
        s.incarnations = int(d.get("incarnations", 1))
        s.wall_seconds = float(d.get("wall_seconds", 0.0))
        s.updates_accepted = int(d.get("updates_accepted", 0))
        s.updates_sealed = int(d.get("updates_sealed") or 0)
        s.rejected_before = Counter(d.get("updates_rejected", {}))
        s.rejected = Counter(s.rejected_before)
        s.rounds = list(d.get("rounds", []))
        s.rounds_completed = int(d.get("rounds_completed", 0))
        s.model_version = int(d.get("model_version", 0))
        s.resumed_from_round = d.get("resumed_from_round")
        s.max_heartbeat_gap_s = float(d.get("max_heartbeat_gap_s") or 0.0)
        s.redeliveries = int(d.get("redeliveries") or 0)
        s.privacy = dict(d.get("privacy") or {})
        s.update_bytes = int(d.get("update_bytes") or 0)
        beats = d.get("heartbeats") or {}
        s.heartbeats_handled = int(beats.get("handled") or 0)
        s.heartbeat_cpu_s = float(beats.get("cpu_s") or 0.0)
        return s

    def heartbeat(self, cpu_s: float, handled: bool) -> None:
        self.heartbeats_handled += handled
        self.heartbeat_cpu_s += cpu_s

    def count_rejection(self, reason: str) -> None:
        self.rejected[reason] += 1

    def add_round(self, row: dict) -> None:
        """Append a closed round (``rounds.close_row``); a round already listed is replaced,
        so a resumed coordinator that recovers the row from its commit never lists it twice."""
        self.rounds = [r for r in self.rounds if r.get("round") != row["round"]] + [dict(row)]

    def finish(self, reason: str, rounds_completed: int, version: int, metrics: dict[str, float]) -> None:
        self.reason = reason
        self.rounds_completed = rounds_completed
        self.model_version = version
        self.final = {k: float(v) for k, v in metrics.items()}

    def as_dict(self) -> dict:
        seconds = [r["seconds"] for r in self.rounds if r["status"] == "aggregated"]
        return {
            "job": self.job,
            "run": self.run,
            "incarnations": self.incarnations,
            "task": self.task,
            "reason": self.reason,
            "rounds_planned": self.rounds_planned,
            "rounds_completed": self.rounds_completed,
            "model_version": self.model_version,
            "final_accuracy": self.final.get("test_accuracy"),
            "final_loss": self.final.get("test_loss"),
            "final_metrics": self.final,
            "wall_seconds": round(self.wall_seconds, 3),
            "round_seconds": seconds,
            "median_round_seconds": statistics.median(seconds) if seconds else None,
            "resumed_from_round": self.resumed_from_round,
            "error": self.error,
            "updates_accepted": self.updates_accepted,
            "updates_sealed": self.updates_sealed,
            "update_bytes": self.update_bytes,
            "updates_rejected": dict(sorted(self.rejected.items())),
            "redeliveries": self.redeliveries,
            "max_heartbeat_gap_s": round(self.max_heartbeat_gap_s, 3),
            "heartbeats": {"handled": self.heartbeats_handled, "cpu_s": round(self.heartbeat_cpu_s, 6)},
            **({"privacy": self.privacy} if self.privacy else {}),
            "rounds": self.rounds,
        }

    def write(self, path: Path) -> None:
        """Replace summary.json atomically (a full disk never leaves it empty); NaN/inf become null
        so the file is valid JSON."""
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, self.as_dict())

