"""`fedbus keys revoke|rotate`: build, check and publish one key event for a running job.

The tool first replays the job's key events like any participant (``KeyWatch``), so it
signs with a key that is current, names the target's current key in a rotation, and
refuses locally what every process would refuse (the rules of ``fedbus.crypto.keyevents``)
instead of publishing an event that changes nothing. It returns once JetStream
acknowledged the event; every running process applies it on receipt.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from pathlib import Path

from fedbus.bus import NatsCredentials, Subjects, connect
from fedbus.crypto.federation import Federation
from fedbus.crypto.keyevents import KeyEventRefused
from fedbus.crypto.keys import Identity, b64, unb64
from fedbus.jobspec import JobSpec, SecuritySpec
from fedbus.keywatch import KeyWatch, own_key_problem, publish_key_event
from fedbus.protocol.messages import KeyEvent

CONNECT_TIMEOUT_S = 10.0


class KeyToolError(Exception):
    """Something the user can fix: one line, no traceback."""


def job_subjects(job_arg: str, prefix: str, load_job: Callable[[str], JobSpec]) -> tuple[Subjects, SecuritySpec]:
    """``--job`` is a job spec file (its id, prefix and security settings) or a bare job id."""
    if Path(job_arg).is_file():
        job = load_job(job_arg)
        return Subjects(job.job, prefix=job.transport.prefix), job.security
    try:
        return Subjects(job_arg, prefix=prefix), SecuritySpec()
    except ValueError as exc:
        raise KeyToolError(f"--job {job_arg!r} is neither a job spec file nor a valid job id: {exc}") from None


def build_event(federation: Federation, signer: Identity, participant: str, *, new_key: Identity | None,
                reason: str) -> KeyEvent:
    """The event, checked against the federation as amended so far (raises KeyToolError, or
    pydantic's ValidationError for a bad --reason)."""
    if signer.role not in KeyEvent.SENDER_ROLES:
        raise KeyToolError(f"{signer.id} is a {signer.role}: key events are signed by the coordinator or an operator")
    problem = own_key_problem(federation, signer)
    if problem is not None:
        raise KeyToolError(f"signer: {problem}")
    target = federation.get(participant)
    if target is None:
        raise KeyToolError(f"{participant} is not listed in the federation file")
    try:
        if new_key is None:
            event = KeyEvent(action="revoke", participant=participant, reason=reason)
        else:
            if new_key.id != participant or new_key.role != target.role:
                raise KeyToolError(f"the new key file is for {new_key.id} ({new_key.role}), "
                                   f"not {participant} ({target.role})")
            if bytes(new_key.public_key) == unb64(target.public_key):
                raise KeyToolError(f"the new key is already {participant}'s current key")
            # The new key file's encryption key travels along: updates are then sealed to a
            # key the rotated process can open (an aggregator's, or the coordinator's).
            sealing = new_key.participant_entry().get("encryption_key")
            event = KeyEvent(action="rotate", participant=participant, old_key=target.public_key,
                             new_key=b64(bytes(new_key.public_key)), new_encryption_key=sealing, reason=reason)
        # Dry run on a copy: what every process would refuse is refused here, before publishing.
        if copy.deepcopy(federation.overlay).apply(event, signer.id) is None:
            raise KeyToolError(f"{participant} is already revoked")
    except KeyEventRefused as exc:
        raise KeyToolError(str(exc)) from None
    return event


async def send_key_event(nats_url: str, subjects: Subjects, security: SecuritySpec, federation: Federation,
                         signer: Identity, participant: str, *, new_key: Identity | None = None,
                         reason: str = "", credentials: NatsCredentials | None = None) -> tuple[int, KeyEvent]:
    """Replay the job's key events, check, sign and publish one; returns (stream sequence, event)."""
    try:
        nc = await connect(nats_url, name=f"fedbus-keys-{signer.id}", first_connect_timeout=CONNECT_TIMEOUT_S,
                           credentials=credentials, participant=signer.id)
    except Exception as exc:
        raise KeyToolError(f"cannot connect to {nats_url}: {exc}") from None
    try:
        js = nc.jetstream()
        try:
            await js.stream_info(subjects.ctl_stream)
        except Exception:
            raise KeyToolError(f"job {subjects.job} has no control stream ({subjects.ctl_stream}) on {nats_url}: "
                               "start its coordinator first") from None
        watch = KeyWatch(js, subjects, federation, security)
        await watch.start()
        await watch.stop()
        event = build_event(federation, signer, participant, new_key=new_key, reason=reason)
        return await publish_key_event(js, subjects, signer, event), event
    finally:
        with contextlib.suppress(Exception):
            await nc.close()
