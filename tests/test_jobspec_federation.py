"""Job spec (YAML) validation, key files and the federation file."""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path

import pytest
import yaml
from nacl.signing import SigningKey
from pydantic import ValidationError

from fedbus.crypto.federation import Federation, FederationFile
from fedbus.crypto.keys import Identity, InsecureKeyFileError, InsecureKeyFileWarning, b64, unb64
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


def write_key(tmp_path: Path, text: str, name: str = "bad.key") -> Path:
    """A key file as `fedbus keys gen` leaves it: owner-only."""
    path = write(tmp_path, text, name)
    os.chmod(path, 0o600)
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
    "id: [a\n",  # not YAML
])
def test_identity_load_rejects_bad_files(tmp_path, content):
    path = write_key(tmp_path, content)
    with pytest.raises(ValueError, match="not a fedbus key file"):
        Identity.load(path)


def test_identity_load_rejects_unknown_role(tmp_path):
    data = {"id": "a", "role": "admin", "private_key": b64(bytes(SigningKey.generate()))}
    with pytest.raises(ValueError, match="unknown role 'admin'"):
        Identity.load(write_key(tmp_path, yaml.safe_dump(data)))


def test_participant_entry_is_public_only():
    ident = Identity.generate("w", "worker")
    entry = ident.participant_entry()
    assert set(entry) == {"id", "role", "region", "public_key", "encryption_key"}
    secrets = {b64(bytes(ident.signing_key)), b64(bytes(ident.encryption_key))}
    assert not secrets & set(entry.values())


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


# ---- finite numbers and bounds -------------------------------------------------------------

@pytest.mark.parametrize("extra,where", [
    ("round_deadline_s: .inf\n", "round_deadline_s"),
    ("round_deadline_s: .nan\n", "round_deadline_s"),
    ("cohort: {wait_for_workers_s: .inf}\n", "cohort.wait_for_workers_s"),
    ("security: {max_age_s: .inf}\n", "security.max_age_s"),
    ("security: {max_future_s: .nan}\n", "security.max_future_s"),
    ("security: {audit_interval_s: .inf}\n", "security.audit_interval_s"),
    ("security: {rate: {heartbeats_per_s: .inf}}\n", "security.rate.heartbeats_per_s"),
    ("security: {rate: {updates_per_s: .nan}}\n", "security.rate.updates_per_s"),
    ("transport: {heartbeat_s: .inf}\n", "transport.heartbeat_s"),
    ("train: {lr: .inf}\n", "train.lr"),
    ("train: {lr: .nan}\n", "train.lr"),
    ("train: {momentum: .nan}\n", "train.momentum"),
    ("train: {weight_decay: .inf}\n", "train.weight_decay"),
    ("train: {proximal_mu: .inf}\n", "train.proximal_mu"),
    ("strategy: {name: trimmed_mean, beta: .nan}\n", "strategy.trimmed_mean.beta"),
    ("strategy: {name: fedprox, mu: .inf}\n", "strategy.fedprox.mu"),
    ("strategy: {name: scaffold, eta_g: .inf}\n", "strategy.scaffold.eta_g"),
    ("strategy: {name: fedavg, norm_bound: {max_norm: .inf}}\n", "strategy.fedavg.norm_bound.max_norm"),
    ("server_optimizer: {name: momentum, beta: .nan}\n", "server_optimizer.momentum.beta"),
    ("server_optimizer: {name: adam, beta1: .nan}\n", "server_optimizer.adam.beta1"),
    ("server_optimizer: {name: yogi, beta2: .nan}\n", "server_optimizer.yogi.beta2"),
    ("server_optimizer: {name: sgd, lr: .inf}\n", "server_optimizer.sgd.lr"),
])
def test_inf_and_nan_are_rejected_at_load(tmp_path, extra, where):
    message = load_error(tmp_path, MINIMAL + extra)
    assert where in message
    assert "Input should be a finite number" in message


@pytest.mark.parametrize("params,where", [
    ("{lr: .inf}", "task_params.lr"),
    ("{schedule: [1.0, {warmup: .nan}]}", "task_params.schedule.1.warmup"),
])
def test_non_finite_task_params_are_rejected(tmp_path, params, where):
    message = load_error(tmp_path, MINIMAL + f"task_params: {params}\n")
    assert f"{where} must be a finite number" in message


def test_deeply_nested_task_params_are_a_validation_question(tmp_path):
    nested: object = 1.0
    for _ in range(5000):
        nested = [nested]
    assert JobSpec(job="j", task="m:t", rounds=1, task_params={"x": nested}).task_params["x"]


@pytest.mark.parametrize("extra,where,limit", [
    ("rounds: 1000001\n", "rounds", "1000000"),
    ("round_deadline_s: 86401\n", "round_deadline_s", "86400"),
    ("cohort: {wait_for_workers_s: 1.0e+9}\n", "cohort.wait_for_workers_s", "86400"),
    ("security: {max_age_s: 86401}\n", "security.max_age_s", "86400"),
    ("security: {max_future_s: 3601}\n", "security.max_future_s", "3600"),
    ("security: {max_message_bytes: 1073741825}\n", "security.max_message_bytes", "1073741824"),
    ("transport: {heartbeat_s: 61}\n", "transport.heartbeat_s", "60"),
    ("transport: {inline_max_bytes: 67108865}\n", "transport.inline_max_bytes", "67108864"),
    ("cohort: {min_workers: 1000001}\n", "cohort.min_workers", "1000000"),
    ("seed: -1\n", "seed", "greater than or equal to 0"),
    ("seed: 9223372036854775808\n", "seed", "9223372036854775807"),
])
def test_huge_values_are_rejected(tmp_path, extra, where, limit):
    text = MINIMAL.replace("rounds: 3\n", "") + ("" if extra.startswith("rounds") else "rounds: 3\n") + extra
    message = load_error(tmp_path, text)
    assert where in message and limit in message


def test_values_at_the_limits_are_accepted(tmp_path):
    spec = JobSpec.load(write(tmp_path, MINIMAL.replace("rounds: 3", "rounds: 1000000") + (
        "round_deadline_s: 86400\nseed: 9223372036854775807\n"
        "security: {max_age_s: 86400, max_message_bytes: 1073741824, max_samples_per_update: 9007199254740992}\n"
        "transport: {heartbeat_s: 60}\n")))
    assert spec.rounds == 1_000_000 and spec.round_deadline_s == 86400 and spec.transport.heartbeat_s == 60
    assert spec.security.max_message_bytes == 2**30 and spec.security.max_samples_per_update == 2**53


# ---- caps and rate limits the coordinator enforces ------------------------------------------

def test_security_caps_and_rates_defaults(tmp_path):
    security = JobSpec.load(write(tmp_path, MINIMAL)).security
    assert security.max_samples_per_update is None
    assert security.audit_interval_s == 5.0
    rate = security.rate
    assert (rate.heartbeats_per_s, rate.heartbeat_burst, rate.updates_per_s, rate.update_burst) == (5.0, 20, 20.0, 40)


def test_security_caps_and_rates_load(tmp_path):
    spec = JobSpec.load(write(tmp_path, MINIMAL + (
        "security: {max_samples_per_update: 5000, audit_interval_s: 0.5,\n"
        "           rate: {heartbeats_per_s: 1.5, heartbeat_burst: 3, updates_per_s: 0.25, update_burst: 2}}\n")))
    assert spec.security.max_samples_per_update == 5000 and spec.security.audit_interval_s == 0.5
    assert spec.security.rate.heartbeats_per_s == 1.5 and spec.security.rate.update_burst == 2
    spec.dump(tmp_path / "again.yaml")
    assert JobSpec.load(tmp_path / "again.yaml") == spec


@pytest.mark.parametrize("extra,where", [
    ("security: {max_samples_per_update: 0}\n", "security.max_samples_per_update"),
    ("security: {max_samples_per_update: 9007199254740993}\n", "security.max_samples_per_update"),
    ("security: {max_samples_per_update: 1.5}\n", "security.max_samples_per_update"),
    ("security: {rate: {heartbeats_per_s: 0}}\n", "security.rate.heartbeats_per_s"),
    ("security: {rate: {update_burst: 0}}\n", "security.rate.update_burst"),
    ("security: {rate: {updates_per_sec: 1}}\n", "security.rate.updates_per_sec"),
    ("security: {audit_interval_s: 0}\n", "security.audit_interval_s"),
])
def test_security_caps_and_rates_validated(tmp_path, extra, where):
    assert where in load_error(tmp_path, MINIMAL + extra)


def test_new_fields_are_documented_in_the_schema():
    schema = JobSpec.model_json_schema()
    security = schema["$defs"]["SecuritySpec"]["properties"]
    for name in ("max_samples_per_update", "rate", "audit_interval_s"):
        assert security[name]["description"]
    for name, prop in schema["$defs"]["RateLimitSpec"]["properties"].items():
        assert prop["description"], name
    participant = FederationFile.model_json_schema()["$defs"]["Participant"]["properties"]
    assert "excessive_samples" in participant["max_samples"]["description"]


# ---- key file permissions -----------------------------------------------------------------

@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o620])
def test_key_files_accessible_to_others_are_refused(tmp_path, monkeypatch, mode):
    monkeypatch.delenv("FEDBUS_ALLOW_INSECURE_KEYS", raising=False)
    path = tmp_path / "w.key"
    Identity.generate("w", "worker").save(path)
    os.chmod(path, mode)
    with pytest.raises(InsecureKeyFileError) as info:
        Identity.load(path)
    assert str(path) in str(info.value) and f"chmod 600 {path}" in str(info.value)
    assert f"{mode:04o}" in str(info.value) and "FEDBUS_ALLOW_INSECURE_KEYS=1" in str(info.value)


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_owner_only_key_files_load(tmp_path, monkeypatch, mode):
    monkeypatch.delenv("FEDBUS_ALLOW_INSECURE_KEYS", raising=False)
    path = tmp_path / "w.key"
    Identity.generate("w", "worker").save(path)
    os.chmod(path, mode)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Identity.load(path).id == "w"


def test_insecure_keys_escape_hatch_warns(tmp_path, monkeypatch):
    path = tmp_path / "w.key"
    Identity.generate("w", "worker").save(path)
    os.chmod(path, 0o644)
    monkeypatch.setenv("FEDBUS_ALLOW_INSECURE_KEYS", "1")
    with pytest.warns(InsecureKeyFileWarning, match=f"chmod 600 {path}"):
        assert Identity.load(path).id == "w"
    monkeypatch.setenv("FEDBUS_ALLOW_INSECURE_KEYS", "yes")  # only "1" opens the hatch
    with pytest.raises(InsecureKeyFileError):
        Identity.load(path)


def test_saved_key_is_never_readable_by_others(tmp_path):
    # Created 0600 from the first byte (os.open with the mode), whatever the umask lets through.
    old = os.umask(0)
    try:
        path = tmp_path / "k.key"
        Identity.generate("k", "worker").save(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["k.key"]  # no temporary file left behind


# ---- federation: keys and sample caps --------------------------------------------------------

def test_duplicate_public_keys_rejected():
    twin = dict(W[1].participant_entry(), id="w9")
    with pytest.raises(ValidationError, match="share a public key.*w1, w9"):
        FederationFile.model_validate({"participants": [C.participant_entry(), W[1].participant_entry(), twin]})


def test_duplicate_public_keys_rejected_when_spelled_differently():
    raw = bytes(W[0].public_key)
    canonical = b64(raw)
    # Same 32 bytes, another base64 spelling: the last character's unused low bits set.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = alphabet.index(canonical[-2])
    respelled = canonical[:-2] + alphabet[last | 0b11] + "="
    assert respelled != canonical and unb64(respelled) == raw
    twin = dict(W[0].participant_entry(), id="w9", public_key=respelled)
    with pytest.raises(ValidationError, match="share a public key"):
        FederationFile.model_validate({"participants": [W[0].participant_entry(), twin]})


def test_a_revoked_participant_still_owns_its_key():
    old = dict(W[2].participant_entry(), revoked=True)
    new = dict(W[2].participant_entry(), id="w2-new")
    with pytest.raises(ValidationError, match="share a public key"):
        FederationFile.model_validate({"participants": [old, new]})


def test_worker_max_samples(tmp_path):
    data = make_federation(C, *W)
    data["participants"][1]["max_samples"] = 600
    fed = Federation(FederationFile.model_validate(data))
    assert fed.get("w0").max_samples == 600 and fed.get("w1").max_samples is None
    fed.dump(tmp_path / "f.yaml")
    text = (tmp_path / "f.yaml").read_text()
    assert text.count("max_samples") == 1 and "null" not in text  # unset caps stay out of the file
    assert Federation.load(tmp_path / "f.yaml").spec == fed.spec


@pytest.mark.parametrize("entry,message", [
    (dict(C.participant_entry(), max_samples=10), "max_samples applies to workers only"),
    (dict(A.participant_entry(), max_samples=10), "max_samples applies to workers only"),
    (dict(W[0].participant_entry(), max_samples=0), "greater than or equal to 1"),
    (dict(W[0].participant_entry(), max_samples=2**53 + 1), "less than or equal to 9007199254740992"),
])
def test_max_samples_validated(entry, message):
    with pytest.raises(ValidationError, match=message):
        FederationFile.model_validate({"participants": [entry]})
