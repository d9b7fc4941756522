"""JobStateStore: the coordinator's committed progress, in the KV bucket and Object Store.

After every round the coordinator stores the global model in ``fedbus-models`` and then
writes one record under the job id in the ``fedbus-jobs`` KV bucket with compare-and-set
on the revision it last wrote, so two coordinators of one job cannot both advance it.
The record is signed with the coordinator's key and names the model by size and digest,
so a restarted coordinator trusts neither the bucket nor the store blindly.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import structlog
from nacl.exceptions import BadSignatureError

from fedbus.aggregation.base import State
from fedbus.bus import KV_BUCKET, MODELS_BUCKET, BlobStore
from fedbus.crypto.keys import Identity, b64, unb64
from fedbus.protocol.codec import decode_tensors, encode_tensors

log = structlog.get_logger(__name__)


class JobStateError(RuntimeError):
    """The committed state is missing, forged, or does not fit this job."""


@dataclass(frozen=True)
class CommittedRound:
    round: int
    model_version: int
    rounds_completed: int
    failed_in_a_row: int
    phase: str  # "running" | "done"
    model: State


class JobStateStore:
    def __init__(self, nc, js, job_id: str, identity: Identity):
        self.nc = nc
        self.js = js
        self.job_id = job_id
        self.identity = identity
        self.models = BlobStore(nc, js, MODELS_BUCKET)
        self.revision: int | None = None
        self._model_ref: dict | None = None
        self._model_version: int | None = None

    async def _kv(self):
        return await self.js.key_value(KV_BUCKET)

    async def reset(self) -> None:
        """A fresh run of the job: forget what an earlier run committed."""
        kv = await self._kv()
        try:
            await kv.purge(self.job_id)
        except Exception as exc:  # nothing to purge is fine
            log.debug("jobstate.purge_skipped", error=repr(exc))
        self.revision = None

    async def commit(self, *, round_: int, model_version: int, rounds_completed: int, failed_in_a_row: int,
                     phase: str, model: State, now_ms: int) -> None:
        if self._model_version != model_version:
            # A unique name per commit: a rival writer whose compare-and-set is about to fail
            # must not overwrite the object the current record points at.
            name = f"{self.job_id}/v{model_version}/{os.urandom(6).hex()}"
            ref = await self.models.put(name, encode_tensors(model))
            self._model_ref = {"bucket": ref.bucket, "name": ref.name, "size": ref.size, "digest": ref.digest}
            self._model_version = model_version
        record = {"job": self.job_id, "round": round_, "model_version": model_version,
                  "rounds_completed": rounds_completed, "failed_in_a_row": failed_in_a_row, "phase": phase,
                  "model": self._model_ref, "coordinator": self.identity.id, "updated_ms": now_ms}
        value = self._signed(record)
        kv = await self._kv()
        if self.revision is None:
            self.revision = await kv.create(self.job_id, value)
        else:
            # Compare-and-set: fails if anyone else wrote the key since our last commit.
            self.revision = await kv.update(self.job_id, value, last=self.revision)

    async def load(self) -> CommittedRound | None:
        kv = await self._kv()
        try:
            entry = await kv.get(self.job_id)
        except Exception:
            return None
        if entry is None or not entry.value:
            return None
        record = self._verified(entry.value)
        if record.get("job") != self.job_id:
            raise JobStateError(f"the KV record names job {record.get('job')!r}")
        ref = record["model"]
        data = await self.models.get(ref["name"], expected_size=ref["size"], expected_digest=ref["digest"])
        self.revision = entry.revision
        self._model_ref = ref
        self._model_version = record["model_version"]
        return CommittedRound(record["round"], record["model_version"], record["rounds_completed"],
                              record["failed_in_a_row"], record["phase"], dict(decode_tensors(data)))

    def _signed(self, record: dict) -> bytes:
        body = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
        return json.dumps({"record": record, "signature": b64(self.identity.sign(body))}).encode()

    def _verified(self, raw: bytes) -> dict:
        try:
            outer = json.loads(raw)
            record = outer["record"]
            body = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
            self.identity.public_key.verify(body, unb64(outer["signature"]))
        except (ValueError, KeyError, TypeError, BadSignatureError) as exc:
            raise JobStateError(f"job state record for {self.job_id!r} is not signed by this coordinator: {exc!r}") from None
        return record
