"""The `fedbus` command line for identities and schemas, run as a user would."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedbus.crypto.federation import Federation, FederationFile, Participant
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


# ---- bad input files: one line on stderr, exit code 2, no traceback --------------------------

GOOD_JOB = "job: j\ntask: fedbus.tasks.digits:task\nrounds: 2\n"


def _setup(tmp_path: Path) -> dict[str, Path]:
    """Owner-only keys for a coordinator and a worker, their federation file and a valid job."""
    keys = tmp_path / "keys"
    keys.mkdir()
    coord, worker = Identity.generate("coord", "coordinator"), Identity.generate("w1", "worker")
    coord.save(keys / "coord.key")
    worker.save(keys / "w1.key")
    Federation(FederationFile(participants=[Participant(**coord.participant_entry()),
                                            Participant(**worker.participant_entry())])).dump(tmp_path / "fed.yaml")
    (tmp_path / "job.yaml").write_text(GOOD_JOB)
    return {"coord": keys / "coord.key", "w1": keys / "w1.key", "fed": tmp_path / "fed.yaml",
            "job": tmp_path / "job.yaml"}


def _role_argv(role: str, files: dict[str, Path], *, job: Path, fed: Path | None = None,
               key: Path | None = None) -> list[str]:
    fed = fed or files["fed"]
    # An unreachable NATS URL: if validation let the file through, the process would fail differently.
    nats = ["--nats", "nats://127.0.0.1:9"]
    if role == "coordinator":
        return ["coordinator", "--job", str(job), "--federation", str(fed), "--key", str(key or files["coord"]), *nats]
    if role == "worker":
        return ["worker", "--job", str(job), "--federation", str(fed), "--key", str(key or files["w1"]), *nats]
    return ["sim", "--job", str(job), "--workers", "2"]


def _assert_one_line_error(result: subprocess.CompletedProcess, expected: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [expected], result.stderr


@pytest.mark.parametrize("role", ["coordinator", "worker", "sim"])
def test_invalid_job_spec_is_one_clear_line(tmp_path, role):
    files = _setup(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD_JOB + "round_deadline_s: .inf\n")
    result = fedbus(*_role_argv(role, files, job=bad), cwd=tmp_path)
    _assert_one_line_error(result, f"fedbus: job spec {bad}: round_deadline_s: Input should be a finite number")
    assert not (tmp_path / "runs").exists()  # nothing created for a job that never started


def test_job_spec_errors_are_listed_on_one_line(tmp_path):
    files = _setup(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD_JOB.replace("rounds: 2", "rounds: 0") + "train: {lr: .nan}\ncohort: {sizee: 2}\n")
    result = fedbus(*_role_argv("sim", files, job=bad), cwd=tmp_path)
    _assert_one_line_error(result, f"fedbus: job spec {bad}: rounds: Input should be greater than or equal to 1; "
                                   "cohort.sizee: Extra inputs are not permitted; "
                                   "train.lr: Input should be a finite number")


@pytest.mark.parametrize("content,detail", [
    (None, "No such file or directory"),
    ("job: [\n", "while parsing a flow node"),
    ("- a list\n", "Input should be a valid dictionary"),
    ("job: j\ntask: m:t\nrounds: 1\ncohort: {min_updates: 3}\n", "cohort.min_updates (3) exceeds cohort.min_workers"),
])
def test_unreadable_job_specs(tmp_path, content, detail):
    files = _setup(tmp_path)
    bad = tmp_path / "bad.yaml"
    if content is not None:
        bad.write_text(content)
    result = fedbus(*_role_argv("worker", files, job=bad), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"fedbus: job spec {bad}: ") and detail in line


@pytest.mark.parametrize("role", ["coordinator", "worker"])
def test_invalid_federation_file_is_one_clear_line(tmp_path, role):
    files = _setup(tmp_path)
    fed = tmp_path / "shared-key.yaml"
    entries = yaml.safe_load(files["fed"].read_text())
    twin = dict(entries["participants"][1], id="w2")
    entries["participants"].append(twin)
    fed.write_text(yaml.safe_dump(entries))
    result = fedbus(*_role_argv(role, files, job=files["job"], fed=fed), cwd=tmp_path)
    _assert_one_line_error(result, f"fedbus: federation file {fed}: participants share a public key "
                                   "(one could sign as the other): w1, w2")


@pytest.mark.parametrize("role", ["coordinator", "worker"])
def test_key_file_readable_by_others_is_refused(tmp_path, role):
    files = _setup(tmp_path)
    key = files["coord" if role == "coordinator" else "w1"]
    key.chmod(0o644)
    result = fedbus(*_role_argv(role, files, job=files["job"]), cwd=tmp_path)
    _assert_one_line_error(result, f"fedbus: {key}: private key file is accessible by group or others (mode 0644); "
                                   f"fix with `chmod 600 {key}`, or set FEDBUS_ALLOW_INSECURE_KEYS=1 to load it anyway")


def test_corrupt_key_file_is_one_clear_line(tmp_path):
    files = _setup(tmp_path)
    files["w1"].write_text("id: w1\nrole: worker\nprivate_key: AAAA\n")
    result = fedbus(*_role_argv("worker", files, job=files["job"]), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"fedbus: {files['w1']}: not a fedbus key file")


def test_insecure_keys_escape_hatch_warns_in_one_line(tmp_path):
    files = _setup(tmp_path)
    files["w1"].chmod(0o640)
    out = tmp_path / "again.yaml"
    refused = fedbus("keys", "federation", "--keys", str(files["w1"].parent), "--out", str(out), cwd=tmp_path)
    assert refused.returncode == 2 and "chmod 600" in refused.stderr and not out.exists()
    allowed = subprocess.run([sys.executable, "-m", "fedbus.cli", "keys", "federation", "--keys",
                              str(files["w1"].parent), "--out", str(out)], capture_output=True, text=True,
                             cwd=tmp_path, timeout=120, env=dict(os.environ, FEDBUS_ALLOW_INSECURE_KEYS="1"))
    assert allowed.returncode == 0, allowed.stderr
    assert allowed.stderr.strip().splitlines() == [
        f"fedbus: warning: {files['w1']}: private key file is accessible by group or others (mode 0640); "
        f"fix with `chmod 600 {files['w1']}` (loaded anyway: FEDBUS_ALLOW_INSECURE_KEYS=1)"]
    assert [p.id for p in Federation.load(out).spec.participants] == ["coord", "w1"]


@pytest.mark.parametrize("role", ["coordinator", "worker"])
def test_key_help_documents_permissions_and_escape_hatch(role):
    result = fedbus(role, "--help")
    text = " ".join(result.stdout.split())
    assert result.returncode == 0
    assert "chmod 600 FILE" in text and "FEDBUS_ALLOW_INSECURE_KEYS=1" in text


def test_keys_gen_force_replaces_with_a_private_file(tmp_path):
    keys = tmp_path / "keys"
    assert fedbus("keys", "gen", "--id", "w", "--role", "worker", "--out", str(keys)).returncode == 0
    first = Identity.load(keys / "w.key")
    (keys / "w.key").chmod(0o644)
    assert fedbus("keys", "gen", "--id", "w", "--role", "worker", "--out", str(keys), "--force").returncode == 0
    assert stat.S_IMODE((keys / "w.key").stat().st_mode) == 0o600
    assert bytes(Identity.load(keys / "w.key").signing_key) != bytes(first.signing_key)
    assert sorted(p.name for p in keys.iterdir()) == ["w.key"]


@pytest.mark.parametrize("extra,expected", [
    (["--rounds", "2000000"], "fedbus: --rounds 2000000: rounds: Input should be less than or equal to 1000000"),
    (["--attack", "0=teleport"], "fedbus: --attack 0=teleport: unknown attack 'teleport'"),
    (["--attack", "x=sign_flip"], "fedbus: --attack x=sign_flip: invalid literal for int() with base 10: 'x'"),
])
def test_sim_overrides_are_validated(tmp_path, extra, expected):
    job = tmp_path / "job.yaml"
    job.write_text(GOOD_JOB)
    result = fedbus("sim", "--job", str(job), "--workers", "2", *extra, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(expected), line


def test_coordinator_spill_options_are_checked_before_it_starts(tmp_path):
    files = _setup(tmp_path)
    argv = _role_argv("coordinator", files, job=files["job"])
    (tmp_path / "afile").write_text("")
    unusable = tmp_path / "afile" / "spill"
    result = fedbus(*argv, "--spill-above", "512M", "--spill-dir", str(unusable), cwd=tmp_path)
    _assert_one_line_error(result, f"fedbus: --spill-dir {unusable}: Not a directory")
    result = fedbus(*argv, "--spill-dir", str(tmp_path), cwd=tmp_path)
    _assert_one_line_error(result, "fedbus: --spill-dir needs --spill-above BYTES")
    result = fedbus(*argv, "--spill-above", "1.5G", cwd=tmp_path)
    assert result.returncode == 2 and "is not a byte count" in result.stderr
