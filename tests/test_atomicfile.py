"""Atomic file replacement: readers see the old file or the new one, never a torn or empty one.

A full disk is simulated by making ``os.write`` fail part-way (ENOSPC after some bytes went
out), ``os.fsync`` fail, or ``os.replace`` fail; a unit test of file handling, so patching
the OS calls is the honest way to get those failures on demand.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest
import torch

from fedbus import atomicfile
from fedbus.atomicfile import atomic_torch_save, atomic_write_bytes, atomic_write_json, atomic_write_text
from fedbus.coordinator.summary import RunSummary
from fedbus.crypto.keys import Identity


def _umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


def _disk_full_after(monkeypatch, budget: int) -> None:
    """os.write accepts ``budget`` bytes in total (in short writes), then fails with ENOSPC."""
    real_write = os.write
    left = [budget]

    def write(fd, data):
        if left[0] <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = real_write(fd, bytes(memoryview(data)[: min(len(data), left[0], 7)]))  # short writes, too
        left[0] -= n
        return n

    monkeypatch.setattr(atomicfile.os, "write", write)


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_write_new_file(tmp_path):
    target = tmp_path / "out.bin"
    atomic_write_bytes(target, b"\x00\x01" * 5000)
    assert target.read_bytes() == b"\x00\x01" * 5000
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~_umask()  # like open(): the umask applies
    assert _names(tmp_path) == ["out.bin"]


def test_replace_existing_file_and_mode(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    os.chmod(target, 0o644)
    atomic_write_text(target, "néw\n", mode=0o600)
    assert target.read_bytes() == "néw\n".encode()
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert _names(tmp_path) == ["out.txt"]


def test_short_writes_are_completed(tmp_path, monkeypatch):
    _disk_full_after(monkeypatch, 10**9)  # never full, but at most 7 bytes per write call
    target = tmp_path / "out.bin"
    atomic_write_bytes(target, bytes(range(256)) * 3)
    assert target.read_bytes() == bytes(range(256)) * 3


@pytest.mark.parametrize("budget", [0, 1, 100])
def test_disk_full_mid_write_keeps_the_old_file(tmp_path, monkeypatch, budget):
    target = tmp_path / "summary.json"
    target.write_text('{"old": true}\n')
    _disk_full_after(monkeypatch, budget)
    with pytest.raises(OSError) as info:
        atomic_write_text(target, json.dumps({"new": "x" * 1000}))
    assert info.value.errno == errno.ENOSPC
    assert target.read_text() == '{"old": true}\n'
    assert _names(tmp_path) == ["summary.json"]  # the temporary file is gone


def test_disk_full_mid_write_creates_no_file(tmp_path, monkeypatch):
    _disk_full_after(monkeypatch, 3)
    with pytest.raises(OSError):
        atomic_write_bytes(tmp_path / "final_model.pt", b"x" * 1000)
    assert _names(tmp_path) == []  # in particular no 0-byte final_model.pt


@pytest.mark.parametrize("call", ["fsync", "replace"])
def test_failing_fsync_or_rename_keeps_the_old_file(tmp_path, monkeypatch, call):
    target = tmp_path / "a.json"
    target.write_text("old")

    def fail(*args, **kwargs):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(atomicfile.os, call, fail)
    with pytest.raises(OSError, match="I/O error"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert _names(tmp_path) == ["a.json"]


def test_interrupt_mid_write_cleans_up(tmp_path, monkeypatch):
    def interrupted(fd, data):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomicfile.os, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(tmp_path / "x", b"data")
    assert _names(tmp_path) == []


def test_atomic_torch_save_round_trip_and_failure(tmp_path, monkeypatch):
    target = tmp_path / "final_model.pt"
    state = {"w": torch.arange(1000, dtype=torch.float32), "b": torch.zeros(3)}
    atomic_torch_save(state, target)
    loaded = torch.load(target, weights_only=True)
    assert torch.equal(loaded["w"], state["w"]) and torch.equal(loaded["b"], state["b"])
    _disk_full_after(monkeypatch, 50)
    with pytest.raises(OSError):
        atomic_torch_save({"w": torch.ones(5000)}, target)
    assert torch.equal(torch.load(target, weights_only=True)["w"], state["w"])  # the old model, intact
    assert _names(tmp_path) == ["final_model.pt"]


def test_key_save_that_fails_keeps_the_old_key(tmp_path, monkeypatch):
    path = tmp_path / "w.key"
    old = Identity.generate("w", "worker")
    old.save(path)
    _disk_full_after(monkeypatch, 20)
    with pytest.raises(OSError):
        Identity.generate("w", "worker").save(path)  # like `fedbus keys gen --force` on a full disk
    monkeypatch.undo()
    assert bytes(Identity.load(path).signing_key) == bytes(old.signing_key)
    assert _names(tmp_path) == ["w.key"]


# ---- summary.json -------------------------------------------------------------------------

def _summary() -> RunSummary:
    summary = RunSummary(job="j", task="m:t", rounds_planned=2)
    summary.add_round({"round": 1, "model_version": 1, "status": "aggregated", "seconds": 0.5, "accepted": 3,
                       "rejected": {}, "test_loss": float("nan"), "test_accuracy": 0.5})
    summary.add_round({"round": 2, "model_version": 2, "status": "aggregated", "seconds": 0.25, "accepted": 3,
                       "rejected": {}, "test_loss": float("inf"), "test_accuracy": 0.75})
    summary.finish("completed", 2, 2, {"test_loss": float("-inf"), "test_accuracy": 0.75})
    return summary


def _strict_json(text: str):
    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_summary_json_is_strict_json_with_null_for_non_finite(tmp_path):
    path = tmp_path / "run" / "summary.json"
    _summary().write(path)
    data = _strict_json(path.read_text())
    assert data["final_loss"] is None and data["final_metrics"] == {"test_loss": None, "test_accuracy": 0.75}
    assert [r["test_loss"] for r in data["rounds"]] == [None, None]
    assert [r["test_accuracy"] for r in data["rounds"]] == [0.5, 0.75]
    assert data["final_accuracy"] == 0.75 and data["reason"] == "completed"


def test_summary_write_on_a_full_disk_keeps_the_previous_summary(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    first = RunSummary(job="j", task="m:t", rounds_planned=2)
    first.finish("completed", 2, 2, {"test_accuracy": 0.9})
    first.write(path)
    before = path.read_text()
    _disk_full_after(monkeypatch, 64)
    with pytest.raises(OSError):
        _summary().write(path)
    assert path.read_text() == before and _strict_json(before)["final_accuracy"] == 0.9
    assert _names(tmp_path) == ["summary.json"]


def test_atomic_write_json_is_strict(tmp_path):
    path = tmp_path / "report.json"
    atomic_write_json(path, {"final": {"loss": float("nan"), "acc": 0.5}, "rows": [float("inf"), 1, "x", None]})
    assert _strict_json(path.read_text()) == {"final": {"loss": None, "acc": 0.5}, "rows": [None, 1, "x", None]}
    assert path.read_text().endswith("\n")
