"""A junk flood on the control stream costs each worker one log line per sender and reason
per interval, not one per message."""

from __future__ import annotations

import structlog

from fedbus.crypto.envelopes import Rejection
from fedbus.crypto.keys import Identity
from fedbus.demo import write_federation
from fedbus.jobspec import JobSpec
from fedbus.worker.service import WorkerService


def test_control_junk_is_logged_in_aggregate(tmp_path):
    job = JobSpec(job="junk", task="fedbus.tasks.digits:task", rounds=1, task_params={"model": "mlp"},
                  security={"audit_interval_s": 1.0})
    federation = write_federation(tmp_path, 2)
    service = WorkerService(job, federation, Identity.load(tmp_path / "keys" / "w01.key"), "nats://127.0.0.1:1",
                            state_dir=tmp_path / "state")
    with structlog.testing.capture_logs() as logs:
        for _ in range(10_000):
            service._control_rejected(Rejection("malformed_header", "bad magic"), "fedbus.junk.ctl.round.open")
            service._control_rejected(Rejection("unknown_sender", "mallory"), "fedbus.junk.ctl.job.done")
    events = [e["event"] for e in logs]
    assert events.count("control.rejected") == 2  # the first of each reason, nothing more
    assert service.rejections.totals == {"malformed_header": 10_000, "unknown_sender": 10_000}


def test_control_junk_is_audited_on_the_workers_own_chain(tmp_path, nats_server):
    import asyncio

    from fedbus.audit.queue import AuditQueue
    from fedbus.audit.reader import read_chain, verify_audit
    from fedbus.audit.trail import AuditTrail
    from fedbus.bus import Subjects, connect, ensure_job_infrastructure
    from fedbus.crypto.envelopes import now_ms

    job = JobSpec(job="junk-audit", task="fedbus.tasks.digits:task", rounds=1, task_params={"model": "mlp"},
                  security={"audit_interval_s": 0.2})
    federation = write_federation(tmp_path, 2)
    identity = Identity.load(tmp_path / "keys" / "w01.key")
    service = WorkerService(job, federation, identity, nats_server.url, state_dir=tmp_path / "state")
    subjects = Subjects(job.job)

    async def scenario():
        nc = await connect(nats_server.url, name="w01-audit", first_connect_timeout=10)
        try:
            js = nc.jetstream()
            await ensure_job_infrastructure(js, subjects)
            service.audit = AuditQueue(AuditTrail(js, subjects, identity))
            writing = asyncio.create_task(service.audit.run())
            flushing = asyncio.create_task(service._audit_rejections())
            for _ in range(5_000):
                service._control_rejected(Rejection("malformed_header", "bad magic"), "fedbus.junk-audit.ctl.x")
                service._control_rejected(Rejection("unknown_sender", "mallory"), "fedbus.junk-audit.ctl.y")
            deadline = now_ms() + 10_000
            while len(await read_chain(js, subjects, "w01", federation)) < 2 and now_ms() < deadline:
                await asyncio.sleep(0.2)
            flushing.cancel()
            writing.cancel()
            return await read_chain(js, subjects, "w01", federation), await verify_audit(js, subjects, federation)
        finally:
            await nc.close()

    records, verdict = asyncio.run(scenario())
    # 10,000 rejections: two records, one per (sender, reason) with its count, on w01's own chain.
    assert sorted((r["reason"], r["sender"], r["count"]) for r in records) == [
        ("malformed_header", "<unlisted>", 5_000), ("unknown_sender", "<unlisted>", 5_000)]
    assert verdict.ok and verdict.writers == {"w01": 2}
