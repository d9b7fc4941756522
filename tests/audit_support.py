"""Tampering with a job's audit stream the way someone with the stream's admin rights could,
and asking `fedbus audit verify` (the CLI, a separate process) what it finds.

JetStream cannot edit a stored message. Someone who may administer the stream can delete
one (the stream's delete-message API), or rebuild the whole stream: read every message,
delete the stream, create it again with the same configuration and publish the messages
back in order, with one changed. ``rebuild`` does the latter; publishing the unchanged
messages back is a control: it must still verify, so any failure after a change is the
change's doing.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from fedbus.audit.reader import stored_messages
from fedbus.bus import Subjects, connect
from fedbus.demo import cli_command


@dataclass(frozen=True)
class Stored:
    seq: int
    subject: str
    data: bytes


async def _read(url: str, subjects: Subjects) -> list[Stored]:
    nc = await connect(url, name="audit-tamper", first_connect_timeout=10)
    try:
        _, messages = await stored_messages(nc.jetstream(), subjects)
        return [Stored(seq, subject, data) async for seq, subject, data in messages]
    finally:
        await nc.close()


async def _rebuild(url: str, subjects: Subjects, messages: list[Stored], delete_seq: int | None) -> None:
    nc = await connect(url, name="audit-tamper", first_connect_timeout=10)
    try:
        js = nc.jetstream()
        config = (await js.stream_info(subjects.audit_stream)).config
        await js.delete_stream(subjects.audit_stream)
        await js.add_stream(config)
        for m in messages:
            await js.publish(m.subject, m.data)
        if delete_seq is not None:
            assert await js.delete_msg(subjects.audit_stream, delete_seq)
    finally:
        await nc.close()


def read(url: str, subjects: Subjects) -> list[Stored]:
    return asyncio.run(_read(url, subjects))


def rebuild(url: str, subjects: Subjects, messages: list[Stored], *, delete_seq: int | None = None) -> None:
    """The stream again, from sequence 1, holding ``messages`` in order (then without
    ``delete_seq``, removed with the delete-message API)."""
    asyncio.run(_rebuild(url, subjects, messages, delete_seq))


def verify_cli(url: str, job: str, federation: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command("audit", "verify", "--job", job, "--nats", url, "--federation", str(federation)),
                          capture_output=True, text=True, timeout=60)


def record_of(message: Stored) -> dict:
    """The JSON record inside a stored envelope (unverified: for picking what to tamper with)."""
    from fedbus.protocol.envelope import split_frame

    return json.loads(bytes(split_frame(message.data)[2]))
