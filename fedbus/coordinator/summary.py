"""RunSummary: what a coordinator run leaves behind in summary.json."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


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
    rejected: Counter = field(default_factory=Counter)
    rounds: list[dict] = field(default_factory=list)
    final: dict[str, float] = field(default_factory=dict)
    resumed_from_round: int | None = None

    def count_rejection(self, reason: str) -> None:
        self.rejected[reason] += 1

    def add_round(self, round_: int, version: int, status: str, seconds: float, accepted: int,
                  rejected: dict[str, int], metrics: dict[str, float]) -> None:
        self.rounds.append({"round": round_, "model_version": version, "status": status,
                            "seconds": round(seconds, 6), "accepted": accepted,
                            "rejected": dict(rejected), **{k: float(v) for k, v in metrics.items()}})

    def finish(self, reason: str, rounds_completed: int, version: int, metrics: dict[str, float]) -> None:
        self.reason = reason
        self.rounds_completed = rounds_completed
        self.model_version = version
        self.final = {k: float(v) for k, v in metrics.items()}

    def as_dict(self) -> dict:
        seconds = [r["seconds"] for r in self.rounds if r["status"] == "aggregated"]
        return {
            "job": self.job,
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
            "updates_accepted": self.updates_accepted,
            "updates_rejected": dict(sorted(self.rejected.items())),
            "rounds": self.rounds,
        }

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.as_dict(), indent=2) + "\n", encoding="utf-8")
