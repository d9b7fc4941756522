"""The worker pool's pure parts (ids, heartbeat schedule), the CLI's refusals, and the
coordinator-side lookups a 1,000-worker federation leans on. The pool on the bus:
tests/test_e2e_pool.py; at scale: benchmarks/participants.py."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from fedbus.cli import main
from fedbus.coordinator.registry import WorkerRegistry
from fedbus.crypto.federation import Federation, FederationFile, Participant
from fedbus.crypto.keys import Identity
from fedbus.crypto.sealing import unsealed_recipients
from fedbus.worker.pool import MAX_POOL, HeartbeatSchedule, PoolError, parse_ids


def test_ids_are_listed_and_ranges_expand_in_order():
    assert parse_ids("a,b, c") == ["a", "b", "c"]
    assert parse_ids("w0098..w0101,x") == ["w0098", "w0099", "w0100", "w0101", "x"]
    assert parse_ids("site-7..site-9") == ["site-7", "site-8", "site-9"]


@pytest.mark.parametrize("text, detail", [
    ("", "no worker ids"),
    ("a,b,a", "listed twice"),
    ("w01..w1", "same prefix and number width"),
    ("a01..b02", "same prefix"),
    ("w09..w01", "is empty"),
    ("w..w5", "does not end in a number"),
    (f"w000000..w{MAX_POOL:06d}", f"more than {MAX_POOL}"),  # refused before it is expanded
    ("w00001..w09000,v00001..v02000", f"more than {MAX_POOL}"),
])
def test_bad_id_lists_are_refused_by_name(text, detail):
    with pytest.raises(PoolError, match=detail):
        parse_ids(text)


def test_heartbeats_keep_the_interval_and_spread_over_it():
    ids = [f"w{i:04d}" for i in range(1000)]
    schedule = HeartbeatSchedule(ids, 1.0, now=0.0, rng=random.Random(7))
    beats: Counter[str] = Counter()
    per_tenth: Counter[int] = Counter()
    t = 0.0
    while t < 10.0:
        t = min(schedule.next_at(), 10.0)
        for worker in schedule.due(t):
            beats[worker] += 1
            per_tenth[int(t * 10)] += 1
    # Every worker beats about once a second (±10% jitter), none more often than that allows ...
    assert set(beats) == set(ids)
    assert all(9 <= n <= 12 for n in beats.values()), sorted(beats.values())[:3] + sorted(beats.values())[-3:]
    # ... and 1,000 of them never arrive together: each tenth of a second carries about a tenth.
    assert max(per_tenth.values()) < 160, max(per_tenth.values())


def test_a_stalled_pool_beats_once_per_worker_not_a_backlog():
    ids = [f"w{i}" for i in range(50)]
    schedule = HeartbeatSchedule(ids, 1.0, now=0.0, rng=random.Random(1))
    assert len(schedule.due(30.0)) == 50  # 30 s without a turn: one beat each
    assert schedule.next_at() > 30.0 and schedule.due(30.0) == []


def test_enough_alive_counts_without_sorting_and_honours_liveness():
    reg = WorkerRegistry(liveness_ms=5_000)
    for i in range(999):
        reg.seen(f"w{i}", 1, now_ms=1_000)
    assert not reg.enough_alive(1000, 1_000)  # fewer ever seen
    reg.seen("w999", 1, now_ms=4_000)
    assert reg.enough_alive(1000, 5_000)
    assert not reg.enough_alive(1000, 6_500)  # the first 999 lapsed
    assert reg.enough_alive(1, 6_500) and len(reg.alive(6_500)) == 1


def _federation(n: int, regional: bool = False) -> Federation:
    coord = Identity.generate("coord", "coordinator")
    parts = [Participant(**coord.participant_entry())]
    for i in range(n):
        worker = Identity.generate(f"w{i:04d}", "worker", "eu" if regional and i % 2 else "default")
        parts.append(Participant(**worker.participant_entry()))
    return Federation(FederationFile(participants=parts))


def test_lookups_by_role_and_position_match_the_file():
    fed = _federation(1000)
    assert fed.coordinator().id == "coord"
    assert [w.id for w in fed.workers()][:2] == ["w0000", "w0001"] and len(fed.workers()) == 1000
    assert fed.partition_of("w0999") == 999
    with pytest.raises(KeyError):
        fed.partition_of("coord")
    # One check per recipient: every worker's updates go to the coordinator, which has a key.
    assert unsealed_recipients("auto", fed, regional=False) == []
    assert unsealed_recipients("auto", _federation(10, regional=True), regional=True) == [
        "aggregator of default", "aggregator of eu"]


def _pool_files(tmp_path: Path, n: int) -> tuple[Path, Path, Path]:
    """(key dir, federation file, job spec) for a coordinator and workers w1..wn."""
    keys = tmp_path / "keys"
    keys.mkdir()
    identities = [Identity.generate("coord", "coordinator")] + [Identity.generate(f"w{i + 1}", "worker")
                                                                  for i in range(n)]
    for identity in identities[1:]:
        identity.save(keys / f"{identity.id}.key")
    Federation(FederationFile(participants=[Participant(**i.participant_entry()) for i in identities])).dump(
        tmp_path / "fed.yaml")
    (tmp_path / "job.yaml").write_text("job: j\ntask: fedbus.tasks.digits:task\nrounds: 2\n")
    return keys, tmp_path / "fed.yaml", tmp_path / "job.yaml"


@pytest.mark.parametrize("extra, message", [
    (["--ids", "w1,w2"], "--ids needs --key-dir"),
    (["--key-dir", "KEYS", "--ids", "w1,w3"], "no key file"),
    (["--key-dir", "KEYS", "--ids", "w1..w"], "--ids: range end"),
    (["--key-dir", "KEYS", "--ids", "w1", "--partition", "3"], "--partition applies to a single worker"),
    (["--key-dir", "KEYS", "--ids", "w1..w2", "--key", "x.key"], "--key applies to a single worker"),
    ([], "--key is required"),
])
def test_pool_options_are_checked_before_anything_starts(tmp_path, capsys, extra, message):
    keys, fed, job = _pool_files(tmp_path, 2)
    argv = ["worker", "--job", str(job), "--federation", str(fed), "--nats", "nats://127.0.0.1:9",
            *[str(keys) if a == "KEYS" else a for a in extra]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_pool_of_a_secure_aggregation_job_is_refused(tmp_path, capsys):
    keys, fed, job = _pool_files(tmp_path, 3)
    job.write_text("job: j\ntask: fedbus.tasks.digits:task\nrounds: 2\ncohort: {min_workers: 3, min_updates: 3}\n"
                   "privacy: {secure_aggregation: {clip: 1.0}}\n")
    argv = ["worker", "--job", str(job), "--federation", str(fed), "--nats", "nats://127.0.0.1:9",
            "--key-dir", str(keys)]
    assert main(argv) == 2
    assert "does not run privacy.secure_aggregation jobs" in capsys.readouterr().err


def test_a_key_event_stops_only_the_hosted_worker_it_revokes(tmp_path):
    from fedbus.jobspec import JobSpec
    from fedbus.protocol.messages import KeyEvent
    from fedbus.worker.pool import WorkerPool

    coord = Identity.generate("coord", "coordinator")
    workers = [Identity.generate(f"w{i}", "worker") for i in range(1, 4)]
    fed = Federation(FederationFile(participants=[Participant(**i.participant_entry()) for i in [coord, *workers]]))
    job = JobSpec(job="j", task="fedbus.tasks.digits:task", rounds=2, task_params={"partition": "iid"})
    pool = WorkerPool(job, fed, workers, "nats://127.0.0.1:9", state_root=tmp_path)
    # One module for all of them, and at most one stored update each.
    assert len({id(w.trainer.model) for w in pool.workers.values()}) == 1
    assert all(w.core.keep_sent == 1 for w in pool.workers.values())
    change = fed.apply_key_event(KeyEvent(action="revoke", participant="w2", reason="test"), "coord")
    pool._on_key_change(change)
    assert [w for w, svc in pool.workers.items() if svc.stopped] == ["w2"]
    assert pool.workers["w2"].exit_code == 4


class PoolAndLoneWorker:
    """Three hosted workers (w1..w3) in a pool sharing one module, a lone worker with w2's
    key and its own module, and one global model to train from."""

    def __init__(self, tmp_path):
        from fedbus.jobspec import JobSpec
        from fedbus.worker.pool import WorkerPool
        from fedbus.worker.service import WorkerService

        coord = Identity.generate("coord", "coordinator")
        workers = [Identity.generate(f"w{i}", "worker") for i in range(1, 4)]
        fed = Federation(FederationFile(participants=[Participant(**i.participant_entry())
                                                      for i in [coord, *workers]]))
        self.job = JobSpec(job="j", task="fedbus.tasks.digits:task", rounds=2, task_params={"partition": "iid"})
        self.pool = WorkerPool(self.job, fed, workers, "nats://127.0.0.1:9", state_root=tmp_path / "pool")
        self.alone = WorkerService(self.job, fed, workers[1], "nats://127.0.0.1:9", state_dir=tmp_path / "alone")
        self.model = {k: v.detach().clone() for k, v in self.alone.trainer.model.state_dict().items()}

    def train(self, service):
        from fedbus.worker.core import Train

        action = Train(service.core.context("r0-00000000", 1), self.model, {}, self.job.train.model_dump(),
                       False, 0, 0)
        return service.trainer.run_train(action)


def test_a_hosted_worker_sends_the_update_a_worker_of_its_own_would(tmp_path):
    """The shared module is only a workspace: whatever another hosted worker trained into it
    before, a hosted worker's update is bit for bit what its own process would send."""
    import torch

    setup = PoolAndLoneWorker(tmp_path)
    setup.train(setup.pool.workers["w1"])  # leaves its training in the shared module
    hosted, own = setup.train(setup.pool.workers["w2"]), setup.train(setup.alone)
    assert hosted.fields == own.fields
    assert hosted.tensors.keys() == own.tensors.keys()
    for name in own.tensors:
        assert torch.equal(torch.as_tensor(hosted.tensors[name]), torch.as_tensor(own.tensors[name])), name


def test_a_hosted_workers_update_does_not_alias_the_shared_module(tmp_path, monkeypatch):
    """Large updates alias the trainer's module (no copy) only in a worker of its own: in a
    pool the next hosted worker trains into the same module while the first one's update is
    still to be sent (or kept for a resend)."""
    import torch

    import fedbus.worker.trainer as trainer

    monkeypatch.setattr(trainer, "UPDATE_ALIAS_MIN_BYTES", 0)  # every update counts as large
    setup = PoolAndLoneWorker(tmp_path)
    assert setup.alone.trainer.owns_model and not setup.pool.workers["w1"].trainer.owns_model
    first = setup.train(setup.pool.workers["w1"])
    kept = {k: torch.as_tensor(v).clone() for k, v in first.tensors.items()}
    setup.train(setup.pool.workers["w2"])  # trains into the shared module
    for name, value in kept.items():
        assert torch.equal(torch.as_tensor(first.tensors[name]), value), name
