"""The model registry's pure parts: signed manifests, retention decisions, and the round
machine's rollback transition (driven event by event, nothing sleeps)."""

from __future__ import annotations

import json

import pytest
import torch

from fedbus.coordinator.inline import drive
from fedbus.coordinator.records import JobRecord
from fedbus.coordinator.rounds import (
    AckThrough,
    Aggregate,
    Aggregated,
    CloseRound,
    Commit,
    Committed,
    OpenRound,
    RollbackRefused,
    RollbackRequested,
    Tick,
)
from fedbus.crypto.federation import Federation, FederationFile, Participant
from fedbus.crypto.keys import Identity
from fedbus.registry.manifest import (
    ManifestError,
    ModelManifest,
    ObjectRef,
    check_model,
    model_digest,
    open_manifest,
    sign_manifest,
)
from fedbus.registry.retention import blob_round, blobs_to_delete, model_objects_to_delete, plan_versions
from tests.test_rounds import policy, started, state, update

COORD = Identity.generate("coordinator", "coordinator")
WORKER = Identity.generate("w1", "worker")
OPS = Identity.generate("ops", "operator")
FEDERATION = Federation(FederationFile(federation="t", participants=[
    Participant(**i.participant_entry()) for i in (COORD, WORKER, OPS)]))
MODEL = {"fc.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "fc.bias": torch.zeros(2)}


def manifest(**kw) -> ModelManifest:
    base = dict(job="j", run="r1", version=3, parent_version=2, kind="aggregated", round=3, created_ms=1,
                metrics={"test_accuracy": 0.9}, strategy={"name": "fedavg"}, model_digest=model_digest(MODEL),
                model_object=ObjectRef(bucket="fedbus-models", name="j/v3/ab", size=10, digest="SHA-256=x"),
                coordinator="coordinator")
    base.update(kw)
    return ModelManifest(**base)


# ---- manifests ---------------------------------------------------------------------

def test_a_signed_manifest_opens_and_its_model_verifies():
    m = manifest()
    assert open_manifest(sign_manifest(m, COORD), FEDERATION) == m
    check_model(m, {k: v.clone() for k, v in reversed(MODEL.items())})  # order does not matter


def test_the_digest_covers_every_value_name_and_dtype():
    m = manifest()
    for changed in ({**MODEL, "fc.bias": torch.tensor([0.0, 1e-7])},
                    {**MODEL, "fc.bias": torch.zeros(2, dtype=torch.float64)},
                    {"fc.w": MODEL["fc.weight"], "fc.bias": MODEL["fc.bias"]}):
        with pytest.raises(ManifestError, match="does not match"):
            check_model(m, changed)


def test_a_tampered_or_foreign_manifest_is_refused():
    raw = json.loads(sign_manifest(manifest(), COORD))
    raw["doc"]["parent_version"] = 0
    with pytest.raises(ManifestError, match="bad signature"):
        open_manifest(json.dumps(raw).encode(), FEDERATION)
    for signer in (WORKER, OPS):  # only a coordinator signs manifests
        with pytest.raises(ManifestError, match="not a current coordinator"):
            open_manifest(sign_manifest(manifest(), signer), FEDERATION)
    with pytest.raises(ManifestError, match="names coordinator"):
        open_manifest(sign_manifest(manifest(coordinator="other"), COORD), FEDERATION)
    with pytest.raises(ManifestError, match="not a signed document"):
        open_manifest(b"\xff{", FEDERATION)


# ---- retention decisions -----------------------------------------------------------

def test_plan_keeps_the_newest_the_tagged_and_the_pinned():
    plan = plan_versions(range(0, 11), current=10, keep=3, tagged=[2], pinned=[7])
    assert plan.keep == {2, 7, 8, 9, 10} and plan.drop == (0, 1, 3, 4, 5, 6)
    # A version above the current one (a rival's commit) is not ours to drop.
    assert 12 in plan_versions([9, 10, 12], current=10, keep=1).keep
    with pytest.raises(ValueError):
        plan_versions([1], current=1, keep=0)


def test_blobs_of_committed_rounds_of_this_job_only():
    names = ["j/w1/update/3/aa", "j/w1/update/4/bb", "j/coordinator/round.open/2/cc", "k/w1/update/1/dd",
             "j/w1/update/x/ee", "j/../update/1", "j/v3/ff"]
    assert blob_round("j/w1/update/3/aa", "j") == 3 and blob_round("j/v3/ff", "j") is None
    assert blobs_to_delete(names, "j", through_round=3) == ["j/coordinator/round.open/2/cc", "j/w1/update/3/aa"]


def test_model_objects_not_named_by_a_kept_version_go():
    names = ["j/v1/aa", "j/v2/bb", "j/v2/cc", "jj/v1/dd", "j/w1/update/1/ee"]
    assert model_objects_to_delete(names, "j", keep_names={"j/v2/cc"}) == ["j/v1/aa", "j/v2/bb"]


def test_a_jobs_retention_settings_limit_only_the_streams_it_may_cut():
    from fedbus.bus.layout import DAY_S, stream_limits
    from fedbus.jobspec import JobSpec
    from fedbus.registry.retention import stream_retention

    job = JobSpec(job="j", task="t:t", rounds=1, retention={"stream_max_age_s": 3600, "stream_max_bytes": 2**24})
    limits = stream_limits(**stream_retention(job))
    for family in ("UPD", "AGG", "METRICS"):
        assert limits[family].max_age_s == 3600 and limits[family].max_bytes == 2**24
    # Key events (CTL) and the audit chain keep theirs.
    assert limits["CTL"] == stream_limits()["CTL"] and limits["CTL"].max_age_s == 7 * DAY_S
    assert limits["AUDIT"] == stream_limits()["AUDIT"]
    assert stream_limits(**stream_retention(JobSpec(job="j", task="t:t", rounds=1))) == stream_limits()


# ---- rollback in the round machine -------------------------------------------------

def close_round_1(m, opened, now=10):
    for w in ("w1", "w2", "w3"):
        drive(m, update(w, 1, now, value=1.0))
    assert m.model_version == 1 and m.round == 2


def test_rollback_abandons_the_open_round_and_commits_a_child_of_the_chosen_version():
    m, opened = started(policy(rounds=3))
    close_round_1(m, opened)
    drive(m, update("w1", 2, 20, value=3.0))  # trained from v1: abandoned with the round
    chosen = state(5.0)
    [commit] = m.handle(RollbackRequested(0, chosen, 30))
    assert isinstance(commit, Commit)
    assert commit.record.model_version == 2 and commit.record.parent_version == 0
    assert commit.record.round == 3 and commit.record.phase == "round_open"
    assert torch.equal(commit.model["w"], chosen["w"])
    ack, close, opened3 = m.handle(Committed(commit.seq, 31))
    assert isinstance(ack, AckThrough) and ack.round == 2  # the abandoned round's updates are released
    assert isinstance(close, CloseRound) and close.status == "rolled_back" and close.model_version == 2
    assert isinstance(opened3, OpenRound) and opened3.round == 3 and opened3.model_version == 2
    assert torch.equal(opened3.state["w"], chosen["w"])
    # The next trained version is the rollback version's child, as usual.
    for w in ("w1", "w2", "w3"):
        actions = m.handle(update(w, 3, 40, value=6.0))
    [agg] = [a for a in actions if isinstance(a, Aggregate)]
    [commit] = m.handle(Aggregated(3, agg.compute(), 41, {}))
    assert commit.record.model_version == 3 and commit.record.parent_version is None
    assert m.rounds_completed == 2  # the rollback version is not a trained round


def test_rollback_waits_while_a_commit_is_in_flight():
    m, opened = started(policy(rounds=3))
    for w in ("w1", "w2"):
        drive(m, update(w, 1, 10))
    actions = m.handle(update("w3", 1, 10))  # aggregation starts: nothing may move under it
    assert m.handle(RollbackRequested(0, state(5.0), 11)) == []
    assert m.model_version == 0
    [agg] = [a for a in actions if isinstance(a, Aggregate)]
    [commit] = m.handle(Aggregated(1, agg.compute(), 12, {}))
    assert commit.record.model_version == 1 and commit.record.parent_version is None
    m.handle(Committed(commit.seq, 13))  # round 2 opens on v1 ...
    [rollback] = m.handle(Tick(14))  # ... and the next tick applies the rollback
    assert rollback.record.model_version == 2 and rollback.record.parent_version == 0


def test_rollbacks_that_cannot_apply_are_refused_by_name():
    m, _ = started(policy(rounds=3))
    assert m.handle(RollbackRequested(5, state(1.0), 1)) == [
        RollbackRefused(5, "unknown_version", "version 5 is not in 0..0")]
    [refused] = m.handle(RollbackRequested(0, {"w": torch.zeros(3)}, 1))
    assert refused.reason == "model_mismatch" and m.model_version == 0


def test_the_parent_survives_the_job_record():
    record = JobRecord(round=3, phase="round_open", model_version=2, rounds_completed=1, parent_version=0)
    assert JobRecord.from_dict(json.loads(json.dumps(record.as_dict()))) == record
    old = record.as_dict()
    del old["parent_version"]  # a record written before the registry existed
    assert JobRecord.from_dict(old).parent_version is None


# ---- the coordinator's manifest of a commit ------------------------------------------

def test_the_manifest_of_a_closed_round_names_who_was_folded_and_with_what():
    from fedbus.coordinator.registrar import Registrar
    from fedbus.jobspec import JobSpec

    job = JobSpec(job="j", task="t:t", rounds=5, late_updates="next_round")
    registrar = Registrar(None, None, job, FEDERATION, COORD, jobstate=None)
    for round_, worker, byte in ((3, "w1", 1), (3, "w2", 2), (2, "w3", 3), (3, "w9", 4)):
        registrar.note_update(round_, worker, bytes([byte]) * 32)
    row = {"round": 3, "model_version": 3, "status": "aggregated", "seconds": 1.5, "accepted": 2,
           "accepted_workers": ["w1", "w2"], "late_workers": ["w3"], "folded": 3, "staleness": [0, 0, 1],
           "rejected": {"bad_signature": 1}, "test_accuracy": 0.8, "train_loss": 0.3, "dp_epsilon": 1.5}
    ref = {"bucket": "fedbus-models", "name": "j/v3/ab", "size": 10, "digest": "SHA-256=x"}
    record = JobRecord(round=4, phase="round_open", model_version=3, rounds_completed=3, last_close=row)
    m = registrar.manifest_for(record, "r1", model_digest(MODEL), ref, None, 7)
    assert (m.kind, m.version, m.parent_version, m.round, m.dp_epsilon) == ("aggregated", 3, 2, 3, 1.5)
    assert [(c.participant, c.round, c.update_digest) for c in m.contributors] == [
        ("w1", 3, "01" * 32), ("w2", 3, "02" * 32), ("w3", 2, "03" * 32)]  # w9's update was not folded
    assert m.metrics == {"test_accuracy": 0.8, "train_loss": 0.3}
    assert m.strategy["name"] == "fedavg" and m.coordinator == "coordinator"

    rolled = JobRecord(round=5, phase="round_open", model_version=4, rounds_completed=3, parent_version=1,
                       last_close={**row, "round": 4, "model_version": 4, "status": "rolled_back"})
    m = registrar.manifest_for(rolled, "r1", model_digest(MODEL), ref, None, 8)
    assert (m.kind, m.parent_version, m.contributors, m.metrics) == ("rollback", 1, [], {})
    first = registrar.manifest_for(JobRecord(round=1, phase="round_open", model_version=0, rounds_completed=0),
                                   "r1", model_digest(MODEL), ref, None, 1)
    assert (first.kind, first.parent_version) == ("initial", None)
