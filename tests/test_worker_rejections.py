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
