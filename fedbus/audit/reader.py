"""Replaying a job's audit stream: every writer's chain, verified (``fedbus audit verify``)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from nats.js.api import DeliverPolicy

from fedbus.audit.records import ChainVerifier, RecordError, Verdict, open_record
from fedbus.bus import Subjects
from fedbus.crypto.federation import Federation

READ_TIMEOUT_S = 5.0  # per message: the stream is local to the server, a stall means trouble


async def stored_messages(js, subjects: Subjects) -> tuple[int, AsyncIterator[tuple[int, str, bytes]]]:
    """The stream's last sequence, and its messages as (stream sequence, subject, data) in
    stream order, up to that sequence (records written meanwhile are not waited for)."""
    state = (await js.stream_info(subjects.audit_stream)).state
    last_seq, count = int(state.last_seq), int(state.messages)

    async def messages() -> AsyncIterator[tuple[int, str, bytes]]:
        if count == 0:
            return
        sub = await js.subscribe(subjects.audit_all, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
        try:
            for _ in range(count):  # bounded: at most the messages the stream held when asked
                msg = await sub.next_msg(timeout=READ_TIMEOUT_S)
                seq = int(msg.metadata.sequence.stream)
                if seq > last_seq:
                    return
                yield seq, msg.subject, msg.data
                if seq == last_seq:
                    return
        finally:
            await sub.unsubscribe()

    return last_seq, messages()


async def verify_audit(js, subjects: Subjects, federation: Federation | None) -> Verdict:
    """Check every record of every writer in the job's audit stream (see ChainVerifier)."""
    verifier = ChainVerifier(subjects.job, subjects.prefix, federation)
    last_seq, messages = await stored_messages(js, subjects)
    async for seq, subject, data in messages:
        verifier.feed(seq, subject, data)
    return verifier.finish(last_seq)


async def read_chain(js, subjects: Subjects, writer: str, federation: Federation | None = None) -> list[dict]:
    """One writer's records (dicts with their hash), in order; records that do not open
    (altered, foreign) are left out. For tools and tests that look at what was recorded;
    ``verify_audit`` is what says whether the chain holds."""
    key = federation.verify_key(writer) if federation is not None else None
    subject = subjects.audit_of(writer)
    out = []
    _, messages = await stored_messages(js, subjects)
    async for _, msg_subject, data in messages:
        if msg_subject != subject:
            continue
        try:
            out.append(open_record(data, job=subjects.job, writer=writer, key=key).record)
        except RecordError:
            continue
    return out


def describe_verdict(verdict: Verdict) -> str:
    """What ``fedbus audit verify`` prints: OK with counts, or the first broken record first."""
    chains = ", ".join(f"{w} {n}" for w, n in sorted(verdict.writers.items())) or "none"
    signatures = "signatures checked" if verdict.signatures_checked else \
        "signatures NOT checked (no --federation: only links, numbering and removals)"
    if verdict.ok:
        return (f"audit OK: {verdict.records} records in {len(verdict.writers)} chains ({chains}); "
                f"every link holds; {signatures}")
    lines = [f"audit BROKEN: {verdict.problems_total} problem(s) in {verdict.records} records; {signatures}",
             f"first broken record: {verdict.problems[0].describe()}"]
    lines += [f"  then: {p.describe()}" for p in verdict.problems[1:]]
    if verdict.problems_total > len(verdict.problems):
        lines.append(f"  (and {verdict.problems_total - len(verdict.problems)} more)")
    return "\n".join(lines)
