"""StatusReader: what `fedbus status` reads off the bus, verified, fed to a ``StatusModel``.

Read only, and only what an operator may read (fedbus.bus.permissions, role operator):

- the job's entry in the ``fedbus-jobs`` KV bucket (the coordinator's committed record,
  signed with the coordinator's key; the bucket keeps a few past revisions, so recent
  closes are known at once), followed by an ordered consumer;
- ``ctl.round.close`` (the last 32), the last ``ctl.round.open`` (its signed header only:
  the body, which carries the model, is never fetched or decoded) and ``ctl.job.done``;
  key events first, so a rotated worker's heartbeats verify;
- heartbeats (core NATS).

Nothing is published, no stream or consumer is created but ordered ones, and every
message is verified against the federation file; what fails is counted by reason and
shown, never displayed as fact.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from fedbus.bus import KV_BUCKET, Subjects, connect
from fedbus.bus.follower import ControlFollower
from fedbus.coordinator.records import SignedRecordError, open_signed_record
from fedbus.crypto.envelopes import Rejection
from fedbus.crypto.federation import Federation
from fedbus.crypto.signing import now_ms
from fedbus.jobspec import SecuritySpec
from fedbus.keywatch import KeyWatch, stored_ms_of
from fedbus.messaging import security_verifier
from fedbus.protocol.messages import Heartbeat, JobDone, RoundClose
from fedbus.status.model import Close, StatusModel

log = structlog.get_logger(__name__)

CONNECT_TIMEOUT_S = 10.0
# How often to look again for the job's streams and KV bucket when they do not exist yet
# (a status started before the coordinator).
RETRY_S = 1.0
KV_STREAM = f"KV_{KV_BUCKET}"


def kv_subject(job: str) -> str:
    return f"$KV.{KV_BUCKET}.{job}"


class StatusReader:
    def __init__(self, nats_url: str, subjects: Subjects, federation: Federation, security: SecuritySpec,
                 model: StatusModel, *, credentials=None, participant: str | None = None):
        self.nats_url = nats_url
        self.subjects = subjects
        self.federation = federation
        self.security = security
        self.model = model
        self.credentials = credentials
        self.participant = participant
        self.verifier = security_verifier(subjects.job, security, federation)
        self.changed = asyncio.Event()  # set whenever the model took something in
        self.nc = None
        self._followers: dict[str, ControlFollower] = {}
        self._keys: KeyWatch | None = None
        self._hb = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        async def on_reconnected() -> None:
            for follower in self._followers.values():
                follower.on_reconnected()
            if self._keys is not None:
                self._keys.on_reconnected()

        self.nc = await connect(self.nats_url, name="fedbus-status", first_connect_timeout=CONNECT_TIMEOUT_S,
                                credentials=self.credentials, participant=self.participant,
                                reconnected_cb=on_reconnected)
        self._hb = await self.nc.subscribe(self.subjects.hb_all, cb=self._on_heartbeat)
        await self._attach()
        if not self.attached:
            self._task = asyncio.create_task(self._attach_later())

    @property
    def attached(self) -> bool:
        return {"kv", "round.close", "round.open", "job.done"} <= set(self._followers)

    async def _attach_later(self) -> None:
        while not self.attached:
            await asyncio.sleep(RETRY_S)
            await self._attach()

    async def _attach(self) -> None:
        """Follow what exists of the job's KV entry and control stream (each once)."""
        js = self.nc.jetstream()
        wanted = [("kv", kv_subject(self.subjects.job), KV_STREAM, self._on_record, True)]
        if self._keys is None:
            keys = KeyWatch(js, self.subjects, self.federation, self.security,
                            on_reject=lambda rej, subject: self._problem(f"key_event_{rej.reason}"))
            try:
                await keys.start()  # every key event applied before anything else is verified
                self._keys = keys
            except Exception as exc:  # no control stream yet
                log.debug("status.keys_not_yet", error=repr(exc))
        if self._keys is not None:
            ctl = self.subjects.ctl_stream
            wanted += [("round.close", self.subjects.ctl("round.close"), ctl, self._on_close, True),
                       ("round.open", self.subjects.ctl("round.open"), ctl, self._on_open, False),
                       ("job.done", self.subjects.ctl("job.done"), ctl, self._on_done, False)]
        await self._follow(js, wanted)

    async def _follow(self, js, wanted) -> None:
        for name, subject, stream, deliver, from_start in wanted:
            if name in self._followers:
                continue
            follower = ControlFollower(js, subject, deliver, stream=stream, from_start=from_start)
            try:
                await follower.start()
            except Exception as exc:  # the stream or bucket does not exist yet
                log.debug("status.follow_not_yet", what=name, error=repr(exc))
                continue
            self._followers[name] = follower

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        for follower in self._followers.values():
            await follower.stop()
        if self._keys is not None:
            await self._keys.stop()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()

    # ---- handlers: verify, then feed the model ------------------------------------------

    def _problem(self, reason: str) -> None:
        self.model.problem(reason)
        self.changed.set()

    async def _on_record(self, msg) -> None:
        op = (msg.headers or {}).get("KV-Operation")
        if op in ("DEL", "PURGE"):
            self.model.record_purged()
            self.changed.set()
            return
        try:
            coordinator = self.federation.coordinator()
            doc = open_signed_record(bytes(msg.data), self.federation.verify_key(coordinator.id).verify)
        except (SignedRecordError, ValueError, KeyError) as exc:
            log.warning("status.record_refused", error=str(exc)[:200])
            return self._problem("record_not_verified")
        if doc.get("job") != self.subjects.job:
            return self._problem("record_wrong_job")
        self.model.record_committed(doc)
        self.changed.set()

    def _open(self, msg, *, body: bool):
        """(header, fields) of a verified control message; fields None when ``body`` is False."""
        _, stored_ms = stored_ms_of(msg)
        try:
            opened = self.verifier.open(bytes(msg.data), stored_ms=stored_ms)
            if opened.header.sender != self.federation.coordinator().id:
                raise Rejection("role_not_allowed", opened.header.sender, opened.header)
            if not body:
                return opened.header, None
            if opened.header.blob is not None:
                raise Rejection("oversize", "status reads only inline control bodies", opened.header)
            fields, _ = self.verifier.decode_body(opened, opened.inline_body)
            return opened.header, fields
        except Rejection as rej:
            self._problem(rej.reason)
            return None, None

    async def _on_open(self, msg) -> None:
        header, _ = self._open(msg, body=False)
        if header is not None and header.type == "round.open":
            self.model.round_opened(header.round, header.ts, header.run)
            self.changed.set()

    async def _on_close(self, msg) -> None:
        header, rc = self._open(msg, body=True)
        if isinstance(rc, RoundClose):
            self.model.round_closed(Close(round=rc.round, model_version=rc.model_version, status=rc.status,
                                          seconds=rc.seconds, accepted=tuple(rc.accepted),
                                          rejected=dict(rc.rejected), metrics=dict(rc.metrics)), header.run)
            self.changed.set()

    async def _on_done(self, msg) -> None:
        header, done = self._open(msg, body=True)
        if isinstance(done, JobDone):
            self.model.job_done(done.reason, header.run)
            self.changed.set()

    async def _on_heartbeat(self, msg) -> None:
        try:
            opened = self.verifier.open(msg.data, sender_token=msg.subject.rsplit(".", 1)[-1])
            fields, _ = self.verifier.accept_body(opened, opened.inline_body)
        except Rejection as rej:
            return self._problem(f"heartbeat_{rej.reason}")
        if isinstance(fields, Heartbeat):
            self.model.heartbeat(opened.header.sender, fields.status, fields.region, now_ms())
            self.changed.set()
