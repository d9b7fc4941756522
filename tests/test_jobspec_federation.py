"""Job spec (YAML) validation, key files and the federation file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import yaml
from nacl.signing import SigningKey
from pydantic import ValidationError

from fedbus.crypto.federation import Federation, FederationFile
from fedbus.crypto.keys import Identity, b64
from fedbus.jobspec import JobSpec
from fedbus.tasks.base import TrainSettings

MINIMAL = "job: digits-1\ntask: fedbus.tasks.digits:task\nrounds: 3\n"

FULL = """\
job: hospitals_2024
task: mypkg.tasks:xray
task_params: {resolution: 224, classes: [a, b]}
seed: 42
rounds: 10
round_deadline_s: 60
cohort: {min_workers: 4, size: 3, min_updates: 2, wait_for_workers_s: 30}
strategy: {name: fedavg}
train: {epochs: 2, batch_size: 16, lr: 0.01}
evaluation: {server_test: false, federated: true, final_round: false}
security: {max_age_s: 60, max_future_s: 5, max_message_bytes: 1048576}
transport: {prefix: fl, replicas: 3, inline_max_bytes: 1024, heartbeat_s: 0.5}
"""


def write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ValidationError) as info:
        JobSpec.load(write(tmp_path, text))
    return str(info.value)


# ---- JobSpec --------------------------------------------------------------------------

def test_minimal_job_spec_gets_defaults(tmp_path):
    spec = JobSpec.load(write(tmp_path, MINIMAL))
    assert (spec.job, spec.task, spec.rounds) == ("digits-1", "fedbus.tasks.digits:task", 3)
    assert spec.cohort.min_workers == 1 and spec.cohort.size is None and spec.cohort.min_updates == 1
    assert spec.strategy.name == "fedavg" and spec.late_updates == "drop"
    assert spec.train == TrainSettings()
    assert spec.transport.prefix == "fedbus" and spec.seed == 0


def test_full_job_spec(tmp_path):
    spec = JobSpec.load(write(tmp_path, FULL))
    assert spec.task_params == {"resolution": 224, "classes": ["a", "b"]}
    assert spec.cohort.size == 3 and spec.cohort.min_updates == 2 and spec.cohort.wait_for_workers_s == 30
    assert spec.train.epochs == 2 and spec.train.lr == 0.01
    assert spec.evaluation.server_test is False and spec.evaluation.final_round is False
    assert spec.security.max_future_s == 5
    assert spec.transport.replicas == 3 and spec.transport.prefix == "fl"


def test_dump_and_load_round_trip(tmp_path):
    spec = JobSpec.load(write(tmp_path, FULL))
    spec.dump(tmp_path / "again.yaml")
    assert JobSpec.load(tmp_path / "again.yaml") == spec


@pytest.mark.parametrize("extra,where", [
    ("roundz: 3\n", "roundz"),
    ("cohort: {sizee: 2}\n", "cohort.sizee"),
    ("security: {max_age: 5}\n", "security.max_age"),
    ("transport: {replica: 2}\n", "transport.replica"),
    ("evaluation: {final: true}\n", "evaluation.final"),
    ("train: {epoch: 2}\n", "train.epoch"),
    ("strategy: {name: fedavg, lr: 1}\n", "strategy.fedavg.lr"),
])
def test_unknown_keys_are_rejected_by_name(tmp_path, extra, where):
    message = load_error(tmp_path, MINIMAL + extra)
    assert where in message
    assert "Extra inputs are not permitted" in message


@pytest.mark.parametrize("job_id", ["has space", "a/b", "job.1", "job*", "", "x" * 65, "ünï", "a>b"])
def test_bad_job_ids(tmp_path, job_id):
    message = load_error(tmp_path, yaml.safe_dump({"job": job_id, "task": "m:t", "rounds": 1}))
    assert "job" in message and "should match pattern" in message


@pytest.mark.parametrize("job_id", ["a", "A-b_9", "x" * 64])
def test_good_job_ids(tmp_path, job_id):
    assert JobSpec.load(write(tmp_path, yaml.safe_dump({"job": job_id, "task": "m:t", "rounds": 1}))).job == job_id


def test_min_updates_larger_than_cohort_size(tmp_path):
    message = load_error(tmp_path, MINIMAL + "cohort: {size: 2, min_updates: 3}\n")
    assert "min_updates (3) exceeds the cohort size (2)" in message
    # equal is fine, and without a size every live worker is in the cohort
    assert JobSpec.load(write(tmp_path, MINIMAL + "cohort: {size: 3, min_updates: 3}\n")).cohort.size == 3
    assert JobSpec.load(write(tmp_path, MINIMAL + "cohort: {min_workers: 9, min_updates: 9}\n")).cohort.min_updates == 9
    # without a size, the quorum cannot exceed the workers round 1 waits for
    assert "exceeds cohort.min_workers" in load_error(tmp_path, MINIMAL + "cohort: {min_updates: 9}\n")


@pytest.mark.parametrize("text,field", [
    (MINIMAL.replace("rounds: 3", "rounds: 0"), "rounds"),
    (MINIMAL + "round_deadline_s: 0\n", "round_deadline_s"),
    (MINIMAL + "cohort: {min_workers: 0}\n", "min_workers"),
    (MINIMAL + "late_updates: fold\n", "late_updates"),
    (MINIMAL + "strategy: {name: fedfoo}\n", "strategy"),
    (MINIMAL + "transport: {prefix: 'a.b'}\n", "transport.prefix"),
    (MINIMAL + "transport: {replicas: 7}\n", "transport.replicas"),
    (MINIMAL + "train: {lr: -1}\n", "train.lr"),
    ("task: m:t\nrounds: 1\n", "job"),
    ("job: j\nrounds: 1\n", "task"),
])
def test_invalid_values_name_the_field(tmp_path, text, field):
    assert field in load_error(tmp_path, text)


@pytest.mark.parametrize("text", ["", "- just\n- a list\n", "plain string\n"])
def test_not_a_mapping(tmp_path, text):
    load_error(tmp_path, text)


# ---- Identity ----------------------------------------------------------------------

def test_identity_save_and_load(tmp_path):
    ident = Identity.generate("site-1", "worker", "eu")
    path = tmp_path / "site-1.key"
    ident.save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    text = path.read_text()
    assert text.startswith("# fedbus private key")
    loaded = Identity.load(path)
    assert (loaded.id, loaded.role, loaded.region) == ("site-1", "worker", "eu")
    assert bytes(loaded.signing_key) == bytes(ident.signing_key)
    assert bytes(loaded.public_key) == bytes(ident.public_key)
    sig = loaded.sign(b"hello")
    ident.public_key.verify(b"hello", sig)


def test_identity_save_tightens_an_existing_files_mode(tmp_path):
    path = tmp_path / "k.key"
    path.write_text("old")
    os.chmod(path, 0o644)
    Identity.generate("c", "coordinator").save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert Identity.load(path).role == "coordinator"


def test_identity_generate_rejects_unknown_role():
    with pytest.raises(ValueError, match="role must be one of"):
        Identity.generate("x", "admin")


@pytest.mark.parametrize("content", [
    "",
    "- a list\n",
    "id: a\nrole: worker\n",  # no private key
    "id: a\nrole: worker\nprivate_key: AAAA\n",  # 3 bytes, not 32
    "id: a\nrole: worker\nprivate_key: '***'\n",  # not base64
    "id: a\nrole: worker\nprivate_key: 12345\n",  # not a string
    "id: a\nrole: worker\nprivate_key: 'é'\n",
])
def test_identity_load_rejects_bad_files(tmp_path, content):
    path = write(tmp_path, content, "bad.key")
    with pytest.raises(ValueError, match="not a fedbus key file"):
        Identity.load(path)


def test_identity_load_rejects_unknown_role(tmp_path):
    data = {"id": "a", "role": "admin", "private_key": b64(bytes(SigningKey.generate()))}
    with pytest.raises(ValueError, match="unknown role 'admin'"):
        Identity.load(write(tmp_path, yaml.safe_dump(data), "bad.key"))


def test_participant_entry_is_public_only():
    entry = Identity.generate("w", "worker").participant_entry()
    assert set(entry) == {"id", "role", "region", "public_key"}


# ---- Federation --------------------------------------------------------------------

def make_federation(*identities, revoked=()) -> dict:
    return {"federation": "test", "participants": [
        dict(i.participant_entry(), **({"revoked": True} if i.id in revoked else {})) for i in identities]}


C = Identity.generate("coord", "coordinator")
W = [Identity.generate(f"w{i}", "worker", "eu" if i % 2 else "us") for i in range(3)]
A = Identity.generate("agg", "aggregator", "eu")


def test_federation_load_and_lookups(tmp_path):
    # file order: w0, coord, w1, agg, w2 -- partitions follow worker order only
    data = make_federation(W[0], C, W[1], A, W[2], revoked=("w1",))
    path = write(tmp_path, yaml.safe_dump(data, sort_keys=False), "federation.yaml")
    fed = Federation.load(path)
    assert fed.spec.federation == "test"
    assert [p.id for p in fed.workers()] == ["w0", "w1", "w2"]
    assert [fed.partition_of(w) for w in ("w0", "w1", "w2")] == [0, 1, 2]
    assert fed.coordinator().id == "coord"
    assert fed.get("w1").revoked and not fed.get("w0").revoked
    assert fed.get("agg").region == "eu" and fed.get("agg").role == "aggregator"
    assert fed.get("nobody") is None
    sig = W[2].sign(b"msg")
    fed.verify_key("w2").verify(b"msg", sig)
    assert bytes(fed.verify_key("coord")) == bytes(C.public_key)


def test_partition_of_non_workers(tmp_path):
    fed = Federation(FederationFile.model_validate(make_federation(C, W[0], A)))
    for pid in ("coord", "agg", "nobody"):
        with pytest.raises(KeyError):
            fed.partition_of(pid)


def test_federation_dump_round_trip(tmp_path):
    fed = Federation(FederationFile.model_validate(make_federation(C, *W, revoked=("w2",))))
    fed.dump(tmp_path / "f.yaml")
    again = Federation.load(tmp_path / "f.yaml")
    assert again.spec == fed.spec


def test_duplicate_ids_rejected():
    other = Identity.generate("w0", "aggregator")
    with pytest.raises(ValidationError, match=r"duplicate participant ids: \['w0'\]"):
        FederationFile.model_validate(make_federation(C, W[0], other))


@pytest.mark.parametrize("key,message", [
    ("not base64!", "public_key is not base64"),
    (b64(b"\x01" * 31), "public_key must be 32 bytes"),
    (b64(b"\x01" * 64), "public_key must be 32 bytes"),
    ("", "public_key must be 32 bytes"),
    ("ü" * 44, "public_key is not base64"),
])
def test_bad_public_keys_rejected(key, message):
    entry = dict(W[0].participant_entry(), public_key=key)
    with pytest.raises(ValidationError, match=message):
        FederationFile.model_validate({"participants": [entry]})


@pytest.mark.parametrize("change", [
    {"id": "w.0"}, {"id": ""}, {"id": "x" * 65}, {"role": "admin"}, {"region": "eu west"}, {"colour": "red"},
])
def test_bad_participant_fields_rejected(change):
    with pytest.raises(ValidationError):
        FederationFile.model_validate({"participants": [dict(W[0].participant_entry(), **change)]})


def test_exactly_one_active_coordinator():
    two = Federation(FederationFile.model_validate(make_federation(C, Identity.generate("c2", "coordinator"))))
    with pytest.raises(ValueError, match="exactly one active coordinator, found 2"):
        two.coordinator()
    none = Federation(FederationFile.model_validate(make_federation(W[0])))
    with pytest.raises(ValueError, match="found 0"):
        none.coordinator()
    # a revoked coordinator stays listed but no longer counts
    c2 = Identity.generate("c2", "coordinator")
    rotated = Federation(FederationFile.model_validate(make_federation(C, c2, revoked=("coord",))))
    assert rotated.coordinator().id == "c2"


def test_federation_file_rejects_non_mapping(tmp_path):
    with pytest.raises(ValidationError):
        Federation.load(write(tmp_path, "- a\n", "f.yaml"))
