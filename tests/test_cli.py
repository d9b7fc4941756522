"""The `fedbus` command line for identities and schemas, run as a user would."""

from __future__ import annotations

import stat
import subprocess
import sys

from fedbus.crypto.federation import Federation
from fedbus.crypto.keys import Identity


def fedbus(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedbus.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_keys_gen_and_federation(tmp_path):
    keys = tmp_path / "keys"
    assert fedbus("keys", "gen", "--id", "coord", "--role", "coordinator", "--out", str(keys)).returncode == 0
    out = fedbus("keys", "gen", "--id", "site-a", "--role", "worker", "--region", "eu", "--out", str(keys))
    assert out.returncode == 0 and "public_key" in out.stdout and "private" not in out.stdout.split("public entry")[1]
    assert stat.S_IMODE((keys / "site-a.key").stat().st_mode) == 0o600
    again = fedbus("keys", "gen", "--id", "site-a", "--role", "worker", "--out", str(keys))
    assert again.returncode == 2 and "exists" in again.stderr  # never silently replaces a key
    assert fedbus("keys", "federation", "--keys", str(keys), "--out", str(tmp_path / "fed.yaml")).returncode == 0
    federation = Federation.load(tmp_path / "fed.yaml")
    assert [p.id for p in federation.spec.participants] == ["coord", "site-a"]
    site = Identity.load(keys / "site-a.key")
    assert federation.listed_as(site, "worker").region == "eu"
    assert "private" not in (tmp_path / "fed.yaml").read_text()


def test_schemas_check_passes_here_and_fails_on_drift(tmp_path):
    assert fedbus("schemas", "--check").returncode == 0
    assert fedbus("schemas", "--out", str(tmp_path)).returncode == 0
    target = tmp_path / "job-spec.schema.json"
    target.write_text(target.read_text().replace('"rounds"', '"roundz"'))
    drift = fedbus("schemas", "--check", "--out", str(tmp_path))
    assert drift.returncode == 1 and "job-spec.schema.json" in drift.stdout
