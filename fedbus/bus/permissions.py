"""Least-privilege NATS permissions for a federation, derived from its participants' roles.

Pure: participants and job specs in, subject lists out; `natsconfig.py` renders them
into a nats-server configuration. Every right below is one a role's process uses (the
JetStream API subjects are nats-py 2.16's against nats-server >= 2.10; the secured
end-to-end test runs a whole job under them and fails on any violation).

What each role may do, per job:

- **coordinator**: the job's administrator. It creates and purges the streams, the KV
  buckets (job state, model registry) and the object stores, runs durable consumers on updates, partials and metrics,
  publishes control events and its audit chain, reads heartbeats.
- **worker**: publishes only its own update, heartbeat, metrics and audit subjects
  (JetStream acks come back to its own inbox); reads the control stream through
  consumers it creates there (ordered push consumers; nats-py names them itself, so the
  right is per stream, and everything on that stream is readable by every participant
  anyway), and the models bucket. It cannot subscribe to, consume, direct-get or
  message-get the update streams, the blob bucket or anyone's inbox, cannot publish
  control events, and creates no stream.
- **aggregator** (region R): consumes its region's update stream (which it creates) with
  its own durable, reads the blob bucket (its workers' large updates; sealed updates
  are addressed to it), publishes `agg.R` and its audit chain, reads its workers'
  heartbeats.
- **operator**: publishes key events on `ctl.keys` and reads the control stream; for
  `fedbus status` also the jobs KV bucket (committed records) and the heartbeats.

Nobody but the coordinator gets `$JS.API.>`; nobody reads another participant's inbox.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .credentials import inbox_prefix
from .layout import BLOBS_BUCKET, KV_BUCKET, MODELS_BUCKET, REGISTRY_BUCKET, Subjects

API = "$JS.API"


@dataclass(frozen=True)
class JobScope:
    """What the permissions of one job depend on (from its job spec)."""

    job: str
    prefix: str = "fedbus"
    regional: bool = False

    @property
    def subjects(self) -> Subjects:
        return Subjects(self.job, prefix=self.prefix)


@dataclass
class Permissions:
    publish: list[str] = field(default_factory=list)
    subscribe: list[str] = field(default_factory=list)

    def add(self, other: "Permissions") -> None:
        self.publish += [s for s in other.publish if s not in self.publish]
        self.subscribe += [s for s in other.subscribe if s not in self.subscribe]


def _read_stream(stream: str) -> list[str]:
    """Look a stream up, read its last message on a subject (MSG.GET: the key watch's
    starting point, a bucket's meta) and follow it with nats-py's ordered push consumers
    (created without a name: a consumer nats-py recreates after a gap keeps no name the
    server could check)."""
    return [f"{API}.STREAM.INFO.{stream}", f"{API}.STREAM.MSG.GET.{stream}", f"{API}.CONSUMER.CREATE.{stream}"]


def _own_audit(s, me: str) -> list[str]:
    """Append to its own audit chain, and read back the chain's last record on restart
    (MSG.GET by subject: it may read other writers' records too; they hold no update)."""
    return [s.audit_of(me), f"{API}.STREAM.MSG.GET.{s.audit_stream}"]


def _read_bucket(bucket: str) -> list[str]:
    """Read objects of a bucket the way fedbus.bus.BlobStore.get does: bind, meta by
    subject (MSG.GET), chunk count (STREAM.INFO), chunks by an ordered consumer."""
    return _read_stream(f"OBJ_{bucket}")


def _write_bucket_once(bucket: str) -> list[str]:
    """Write new objects (BlobStore.put_new: chunks and meta, no lookup of what exists)."""
    return [f"$O.{bucket}.C.*", f"$O.{bucket}.M.*"]


# An ordered push consumer's flow-control replies; they carry no data.
FLOW_CONTROL = "$JS.FC.>"


def _coordinator(scope: JobScope, me: str, region_of: dict[str, str]) -> Permissions:
    s = scope.subjects
    return Permissions(
        publish=[
            s.ctl_all, s.audit_all,
            f"{API}.>",  # streams, consumers, KV, object stores: it is the job's administrator
            f"$KV.{KV_BUCKET}.>", f"$KV.{REGISTRY_BUCKET}.>", f"$O.{MODELS_BUCKET}.>", f"$O.{BLOBS_BUCKET}.>",
            "$JS.ACK.>", FLOW_CONTROL,
        ],
        subscribe=[s.hb_all],
    )


def _worker(scope: JobScope, me: str, region_of: dict[str, str]) -> Permissions:
    s = scope.subjects
    region = region_of[me]
    upd_stream = s.region_upd_stream(region) if scope.regional else s.upd_stream
    return Permissions(
        publish=[
            s.upd(region, me), s.hb(me), s.metrics(me), *_own_audit(s, me),
            *_read_stream(s.ctl_stream),
            f"{API}.STREAM.INFO.{upd_stream}",  # waits for it to exist; INFO shows counts, not messages
            *_read_bucket(MODELS_BUCKET),
            *_write_bucket_once(BLOBS_BUCKET),
            FLOW_CONTROL,
        ],
        subscribe=[],
    )


def _aggregator(scope: JobScope, me: str, region_of: dict[str, str]) -> Permissions:
    s = scope.subjects
    region = region_of[me]
    upd_stream = s.region_upd_stream(region)
    durable = f"aggregator-{region}"
    return Permissions(
        publish=[
            s.agg(region), *_own_audit(s, me),
            *_read_stream(s.ctl_stream),
            # Its region's update stream: it creates it and consumes it with its own durable.
            *(f"{API}.STREAM.{verb}.{upd_stream}" for verb in ("CREATE", "UPDATE", "INFO")),
            f"{API}.CONSUMER.DURABLE.CREATE.{upd_stream}.{durable}",
            *(f"{API}.CONSUMER.{verb}.{upd_stream}.{durable}" for verb in ("INFO", "DELETE", "MSG.NEXT")),
            f"$JS.ACK.{upd_stream}.>",
            # Its last partials (a restarted aggregator must not publish a round twice).
            f"{API}.STREAM.INFO.{s.agg_stream}", f"{API}.STREAM.MSG.GET.{s.agg_stream}",
            *_read_bucket(MODELS_BUCKET), *_read_bucket(BLOBS_BUCKET), *_write_bucket_once(BLOBS_BUCKET),
            FLOW_CONTROL,
        ],
        subscribe=[s.hb(w) for w, r in sorted(region_of.items()) if r == region and w != me],
    )


def _operator(scope: JobScope, me: str, region_of: dict[str, str]) -> Permissions:
    s = scope.subjects
    return Permissions(
        publish=[s.ctl("keys"), *_own_audit(s, me), *_read_stream(s.ctl_stream),
                 # fedbus status: the coordinator's committed record (a consumer on the jobs
                 # bucket's stream can name any job's key: the records are signed progress, no data)
                 *_read_stream(f"KV_{KV_BUCKET}"), FLOW_CONTROL],
        subscribe=[s.hb_all])  # fedbus status: who is alive and training


ROLES = {"coordinator": _coordinator, "worker": _worker, "aggregator": _aggregator, "operator": _operator}


def permissions_for(participant_id: str, role: str, scopes: list[JobScope], region_of: dict[str, str]) -> Permissions:
    """The rights of one participant over these jobs. ``region_of``: every worker's and
    aggregator's region (id -> region)."""
    try:
        rule = ROLES[role]
    except KeyError:
        raise ValueError(f"participant {participant_id}: no permissions defined for role {role!r}") from None
    granted = Permissions(subscribe=[f"{inbox_prefix(participant_id)}.>"])
    for scope in scopes:
        granted.add(rule(scope, participant_id, region_of))
    return granted
