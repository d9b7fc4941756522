"""The shipped NATS configurations parse with the real server binary (`nats-server -t`)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from fedbus.bus import find_nats_server_binary

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "nats"


@pytest.mark.parametrize("name", ["single.conf", "cluster-node1.conf", "cluster-node2.conf", "cluster-node3.conf"])
def test_config_is_valid(name, tmp_path):
    out = subprocess.run([find_nats_server_binary(), "-c", str(DEPLOY / name), "-t"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "is valid" in out.stdout + out.stderr
