"""The model registry on a real nats-server with the coordinator and workers as CLI
processes (issue 13, acceptance point 3).

* Every committed version has a manifest signed by the coordinator; `fedbus models list`
  shows the kept ones.
* `fedbus models rollback` (signed by an operator) during the running job: the next
  version's parent is the chosen version, its manifest says so (kind rollback), and its
  model is bit-for-bit the chosen version's; the job goes on from it and completes.
* `fedbus models export` of a kept version writes a state_dict (and safetensors) that
  verifies against the manifest and equals the coordinator's final model; a tampered file
  and a tampered manifest are refused.
* Retention: only the newest ``keep_versions`` versions and the tagged one (the rollback's
  target) keep a manifest and a model object.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest
import torch

from fedbus.bus import MODELS_BUCKET, BlobStore, Subjects, connect
from fedbus.bus.layout import REGISTRY_BUCKET
from fedbus.crypto.federation import Federation, FederationFile, Participant
from fedbus.crypto.keys import Identity
from fedbus.demo import cli_command
from fedbus.registry import tool
from fedbus.registry.store import ModelRegistry
from tests.e2e_support import LocalFederation, small_job, wait_for_round

pytestmark = pytest.mark.e2e

ROUNDS = 10
KEEP = 4
TARGET = 2  # the version tagged, then rolled back to (the tag keeps it past the retention window)


def models_cli(fed: LocalFederation, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command("models", *args[:1], "--job", str(fed.run_dir / "job.yaml"),
                                      "--federation", str(fed.run_dir / "federation.yaml"), "--nats", fed.nats_url,
                                      *args[1:]), capture_output=True, text=True, timeout=timeout)


def show(fed: LocalFederation, version: int) -> dict:
    """What `fedbus models show` prints, in process (each CLI call costs seconds of imports)."""
    federation = Federation.load(fed.run_dir / "federation.yaml")
    return asyncio.run(tool.show_version(fed.nats_url, Subjects(fed.job.job), federation, version))["manifest"]


def add_operator(fed: LocalFederation) -> Path:
    op = Identity.generate("ops", "operator")
    path = fed.run_dir / "keys" / "ops.key"
    op.save(path)
    spec = FederationFile.model_validate(fed.federation.spec.model_dump())
    spec.participants.append(Participant(**op.participant_entry()))
    Federation(spec).dump(fed.run_dir / "federation.yaml")
    return path


async def registry_state(url: str, job: str, federation: Federation) -> tuple[list[int], list[str], list[str]]:
    """(versions with a manifest, tags, the job's objects in the models bucket)."""
    nc = await connect(url, name="registry-check", first_connect_timeout=10)
    try:
        js = nc.jetstream()
        registry = ModelRegistry(js, job, federation)
        objects = sorted(n for n in await BlobStore(nc, js, MODELS_BUCKET).names() if n.startswith(f"{job}/"))
        return await registry.versions(), [f"{t.name}=v{t.version}" for t in await registry.tags()], objects
    finally:
        await nc.close()


async def forge_manifest(url: str, job: str, version: int) -> None:
    """Change the stored manifest's model digest, keeping the coordinator's signature."""
    nc = await connect(url, name="forger", first_connect_timeout=10)
    try:
        kv = await nc.jetstream().key_value(REGISTRY_BUCKET)
        entry = await kv.get(f"{job}.v.{version}")
        outer = json.loads(entry.value)
        outer["doc"]["model_digest"] = "sha256:" + "0" * 64
        await kv.put(f"{job}.v.{version}", json.dumps(outer).encode())
    finally:
        await nc.close()


def test_rollback_during_a_running_job_and_verified_exports(nats_server, tmp_path):
    job = small_job("e2e-registry", rounds=ROUNDS, min_workers=3, min_updates=3, deadline_s=20,
                    evaluation={"final_round": False}, retention={"keep_versions": KEEP})
    fed = LocalFederation(tmp_path, nats_server.url, job, 3)
    operator_key = add_operator(fed)
    try:
        fed.start_coordinator()
        # Slowed down so the job is still running, and version 2 still kept, after each CLI start
        # (seconds of imports): at 8x on an idle machine retention dropped v2 before the tag came.
        for w in fed.federation.workers():
            fed.start_worker(w.id, "--simulate-slowdown", "30")
        wait_for_round(fed, TARGET, timeout=120)

        tag = models_cli(fed, "tag", "--version", str(TARGET), "--tag", "golden", "--key", str(operator_key))
        assert tag.returncode == 0, tag.stderr
        target = show(fed, TARGET)
        assert target["kind"] == "aggregated" and target["parent_version"] == TARGET - 1
        assert target["contributors"] and all(len(c["update_digest"]) == 64 for c in target["contributors"])

        back = models_cli(fed, "rollback", "--version", str(TARGET), "--key", str(operator_key),
                          "--reason", "bad model")
        assert back.returncode == 0, back.stderr + fed.tail_logs()
        rolled = int(back.stdout.split("rolled back: v", 1)[1].split()[0])
        assert rolled > TARGET + 1  # at least one version was committed after the target
        manifest = show(fed, rolled)
        assert manifest["parent_version"] == TARGET and manifest["kind"] == "rollback", manifest
        assert manifest["model_digest"] == target["model_digest"]  # it continues from exactly that model
        assert fed.wait_coordinator(timeout=180) == 0, fed.tail_logs()
    finally:
        fed.stop()

    summary = fed.summary()
    assert summary["reason"] == "completed" and summary["rounds_completed"] == ROUNDS, summary
    statuses = [r["status"] for r in summary["rounds"]]
    assert statuses.count("aggregated") == ROUNDS and statuses.count("failed") == 0, statuses
    # The round open when the rollback arrived was abandoned; its close carries the new version.
    [abandoned] = [r for r in summary["rounds"] if r["status"] == "rolled_back"]
    assert abandoned["model_version"] == rolled and abandoned["folded"] == 0
    final_version = summary["model_version"]
    # The version after the rollback one was trained from it.
    assert show(fed, final_version)["parent_version"] == final_version - 1

    # Retention: the newest KEEP versions and the tagged one, nothing else.
    kept, tags, objects = asyncio.run(registry_state(fed.nats_url, job.job,
                                                     Federation.load(tmp_path / "federation.yaml")))
    assert kept == sorted({TARGET, *range(final_version - KEEP + 1, final_version + 1)}), kept
    assert tags == [f"golden=v{TARGET}"]
    assert len(objects) == len(kept), objects
    listed = asyncio.run(tool.list_versions(fed.nats_url, Subjects(job.job),
                                            Federation.load(tmp_path / "federation.yaml")))
    assert [line.split()[0] for line in listed] == [f"v{v}" for v in kept]
    assert "tags=golden" in listed[0], listed

    # Export of a kept version verifies, and is the coordinator's final model.
    out = tmp_path / "export" / "final.pt"
    exported = models_cli(fed, "export", "--version", str(final_version), "--out", str(out))
    assert exported.returncode == 0, exported.stderr
    state = torch.load(out, weights_only=True)
    final = torch.load(tmp_path / "final_model.pt", weights_only=True)
    assert state.keys() == final.keys() and all(torch.equal(state[k], final[k]) for k in state)
    assert "verified against its manifest" in exported.stdout and out.with_suffix(".safetensors").exists()
    # A tampered file fails.
    name = next(iter(state))
    state[name] = state[name] + 1e-3
    torch.save(state, tmp_path / "tampered.pt")
    bad = models_cli(fed, "verify", "--version", str(final_version), "--file", str(tmp_path / "tampered.pt"))
    assert bad.returncode == 1 and "does not match" in bad.stderr, bad.stderr
    # So does a tampered manifest (the coordinator's signature no longer covers it).
    asyncio.run(forge_manifest(fed.nats_url, job.job, TARGET))
    forged = models_cli(fed, "export", "--version", str(TARGET), "--out", str(tmp_path / "forged.pt"))
    assert forged.returncode == 1 and "bad signature" in forged.stderr, forged.stderr
    assert not (tmp_path / "forged.pt").exists()
