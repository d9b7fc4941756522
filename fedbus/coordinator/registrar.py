"""Registrar: the coordinator's side of the model registry and of retention.

After each commit the service hands it the committed record and model. It writes the
signed manifest of every new version (``fedbus.registry.manifest``), and once per closed
round it applies the retention decisions of ``fedbus.registry.retention``: manifests and
model objects of versions out of the window (tagged ones stay), claim-check blobs of
committed rounds, and update messages the coordinator's consumer has acknowledged. It
decides nothing on its own and never fails the job: a registry or retention step that
fails is logged (``registry.manifest_failed``, ``retention.failed``) and retried at the
next commit.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import structlog

from fedbus.bus import BLOBS_BUCKET, MODELS_BUCKET, BlobStore
from fedbus.coordinator.factory import history_versions
from fedbus.coordinator.records import JobRecord
from fedbus.crypto.keys import Identity
from fedbus.jobspec import JobSpec
from fedbus.registry.manifest import Contributor, ModelManifest, ObjectRef, model_digest
from fedbus.registry.retention import blobs_to_delete, model_objects_to_delete, plan_versions
from fedbus.registry.store import ModelRegistry

log = structlog.get_logger("fedbus.registry")

# Keys of a closed round's row that are not metrics (fedbus.coordinator.rounds.close_row).
ROW_FIELDS = frozenset({"round", "model_version", "status", "seconds", "accepted", "accepted_workers", "late_workers",
                        "folded", "staleness", "rejected", "elapsed_s", "tickets", "via_region", "dp_epsilon"})
# Update digests remembered per (round, sender) until the round's version is manifested;
# more than this many pending means rounds that never close: the oldest are forgotten.
MAX_PENDING_DIGESTS = 200_000


class Registrar:
    def __init__(self, nc, js, job: JobSpec, federation, identity: Identity, jobstate):
        self.job = job
        self.identity = identity
        self.jobstate = jobstate
        self.registry = ModelRegistry(js, job.job, federation)
        self.models = BlobStore(nc, js, MODELS_BUCKET)
        self.blobs = BlobStore(nc, js, BLOBS_BUCKET)
        self.js = js
        # The window covers the versions the job state itself keeps (late or stale updates' bases).
        self.keep = max(job.retention.keep_versions, history_versions(job) + 1)
        self._digests: dict[tuple[int, str], str] = {}
        self._objects: dict[int, str] = {}  # version -> its object's name, for kept versions
        self.manifested: int | None = None
        self.last: ModelManifest | None = None  # the latest manifest this process wrote (the run report's)
        self.deleted: Counter[str] = Counter()  # what retention removed, by kind (summary / logs)

    def note_update(self, round_: int, sender: str, digest: bytes) -> None:
        """An accepted update (or regional partial): its digest goes into the manifest of the
        version that folds it."""
        self._digests[(round_, sender)] = digest.hex()
        while len(self._digests) > MAX_PENDING_DIGESTS:
            del self._digests[next(iter(self._digests))]

    # ---- manifests ---------------------------------------------------------------

    def manifest_for(self, record: JobRecord, run: str, digest: str, ref: dict, epsilon: float | None,
                     now_ms: int) -> ModelManifest:
        version = record.model_version
        row = record.last_close if record.last_close and record.last_close.get("model_version") == version else None
        if record.parent_version is not None:
            kind, parent = "rollback", record.parent_version
        else:
            kind, parent = ("aggregated", version - 1) if version > 0 else ("initial", None)
        contributors: list[Contributor] = []
        metrics: dict[str, float] = {}
        round_ = record.round
        if row is not None and row.get("status") == "aggregated":
            round_ = int(row["round"])
            accepted = list(row.get("accepted_workers", []))
            tickets = list(row.get("tickets", []))  # async: each update's ticket, the round its envelope carries
            rounds_of = list(zip(accepted, tickets)) if len(tickets) == len(accepted) else [(w, round_) for w in accepted]
            rounds_of += [(w, round_ - 1) for w in row.get("late_workers", [])]
            rounds_of += [(s, r) for (r, s) in self._digests if r == round_ and s in row.get("via_region", {}).values()]
            contributors = [Contributor(participant=w, round=max(r, 0), update_digest=self._digests.get((r, w), ""))
                            for w, r in rounds_of]
            metrics = {k: float(v) for k, v in row.items()
                       if k not in ROW_FIELDS and isinstance(v, (int, float)) and not isinstance(v, bool)}
            if row.get("dp_epsilon") is not None:
                epsilon = float(row["dp_epsilon"])
        return ModelManifest(
            job=self.job.job, run=run, version=version, parent_version=parent, kind=kind, round=max(round_, 0),
            created_ms=now_ms, metrics=dict(list(metrics.items())[:64]), contributors=contributors,
            strategy=self.job.strategy.model_dump(mode="json"),
            server_optimizer=self.job.server_optimizer.model_dump(mode="json"),
            dp_epsilon=epsilon, model_digest=digest, model_object=ObjectRef(**ref), coordinator=self.identity.id)

    async def record(self, record: JobRecord, model, run: str, epsilon: float | None, now_ms: int) -> None:
        """Write the manifest of ``record``'s version if it has none yet."""
        ref = self.jobstate.model_ref
        if record.model_version == self.manifested or ref is None:
            return
        digest = await asyncio.to_thread(model_digest, model)
        manifest = self.manifest_for(record, run, digest, ref, epsilon, now_ms)
        await self.registry.put_manifest(manifest, self.identity)
        self.manifested = record.model_version
        self.last = manifest
        self._objects[manifest.version] = manifest.model_object.name
        if self.job.mode == "sync":  # (async tickets are not ordered by version: they go when folded)
            for key in [k for k in self._digests if k[0] <= manifest.round]:
                del self._digests[key]
        for c in manifest.contributors:
            self._digests.pop((c.round, c.participant), None)
        log.info("model.registered", version=manifest.version, parent=manifest.parent_version, kind=manifest.kind,
                 contributors=len(manifest.contributors), digest=manifest.model_digest[:20])

    async def recover(self, record: JobRecord, model, run: str, now_ms: int) -> bool:
        """On resume: the committed version keeps a manifest. One that a crash between the
        commit and the manifest write lost is written again (True), from the committed record
        and model; its contributors' update digests were held only in memory, so they read
        '' (unknown). A manifest that is there (or unreadable: not ours to overwrite) stays."""
        version = record.model_version
        try:
            await self.registry.manifest(version)
        except KeyError:
            await self.record(record, model, run, None, now_ms)
            log.warning("model.manifest_recovered", version=version, note="written on resume; update digests unknown")
            return True
        except Exception as exc:
            log.warning("registry.manifest_unreadable", version=version, error=repr(exc)[:200])
        self.manifested = version
        return False

    # ---- retention ---------------------------------------------------------------

    async def _object_of(self, version: int) -> str | None:
        if version not in self._objects:
            try:
                self._objects[version] = (await self.registry.manifest(version)).model_object.name
            except Exception as exc:  # unreadable or forged: it protects nothing
                log.warning("retention.manifest_unreadable", version=version, error=repr(exc)[:200])
                return None
        return self._objects[version]

    async def retain(self, current: int, blobs_through_round: int | None) -> None:
        """Delete what the window no longer needs (see fedbus.registry.retention)."""
        tagged = [t.version for t in await self.registry.tags()]
        pinned = [v for v, _ in self.jobstate.kept_refs]
        plan = plan_versions(await self.registry.versions(), current=current, keep=self.keep, tagged=tagged,
                             pinned=pinned)
        for version in plan.drop:
            await self.registry.drop_manifest(version)
            self._objects.pop(version, None)
            self.deleted["manifests"] += 1
        keep_names = {name for v in sorted(plan.keep) if (name := await self._object_of(v)) is not None}
        keep_names |= {r["name"] for _, r in self.jobstate.kept_refs}
        for current_ref in (self.jobstate.model_ref, self.jobstate.strategy_ref):
            if current_ref is not None:
                keep_names.add(current_ref["name"])
        for name in model_objects_to_delete(await self.models.names(), self.job.job, keep_names):
            await self.models.delete_completely(name)
            self.deleted["model_objects"] += 1
        if blobs_through_round is not None:
            for name in blobs_to_delete(await self.blobs.names(), self.job.job, blobs_through_round):
                await self.blobs.delete_completely(name)
                self.deleted["blobs"] += 1
        if plan.drop:
            log.info("retention.applied", current=current, kept=sorted(plan.keep), dropped=list(plan.drop),
                     deleted=dict(self.deleted))


async def purge_acknowledged(js, stream: str, durable: str) -> None:
    """Remove the messages of ``stream`` up to ``durable``'s ack floor: every one of them is
    acknowledged, and the durable is their only reader (flat topology's update stream)."""
    info = await js.consumer_info(stream, durable)
    floor = int(info.ack_floor.stream_seq or 0)
    if floor > 0:
        await js.purge_stream(stream, seq=floor + 1)  # purges below seq
