"""JobStateStore: the coordinator's committed progress, in the KV bucket and Object Store.

Every commit stores the model of the record's version, together with the strategy's
server state (SCAFFOLD's c, the server optimizer's moments), as one object in
``fedbus-models``, then writes one record under the job id in the ``fedbus-jobs`` KV
bucket with compare-and-set on the revision it last wrote, so two coordinators of one job
cannot both advance it. The record is signed with the coordinator's key and names the
object by size and digest, so a restarted coordinator trusts neither the bucket nor the
store blindly. Encoding runs off the event loop.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field

import structlog
import torch

from fedbus.aggregation.base import State
from fedbus.bus import KV_BUCKET, MODELS_BUCKET, BlobStore
from fedbus.coordinator.records import JobRecord, SignedRecordError, open_signed_record, sign_record
from fedbus.crypto.keys import Identity
from fedbus.protocol.codec import decode_tensors, tensor_pieces
from fedbus.protocol.messages import MODEL_PREFIX

log = structlog.get_logger(__name__)

STRATEGY_PREFIX = "strategy/"


class JobStateError(RuntimeError):
    """The committed state is missing, forged, or does not fit this job."""


@dataclass(frozen=True)
class CommittedJob:
    run: str
    record: JobRecord
    model: State
    strategy_state: dict
    history: dict[int, State] = field(default_factory=dict)  # earlier versions' models still needed


def model_part(tensors: dict[str, torch.Tensor]) -> State:
    """The model's tensors in a decoded job-state object (which also holds the strategy's state)."""
    return {k[len(MODEL_PREFIX):]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}


def _escape_key(key: str) -> str:
    # "/" separates nesting levels; state_dict keys contain it too ("m/fc.weight"), so a
    # key's own "/" (and "%", the escape) are percent-encoded and come back as they were.
    return str(key).replace("%", "%25").replace("/", "%2F")


def _unescape_key(part: str) -> str:
    return part.replace("%2F", "/").replace("%25", "%")


def flatten_state(tree: dict, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Nested dicts of tensors and numbers -> flat tensors plus the kind of each leaf
    ("t" tensor, "i" int, "f" float), so numbers come back as the same Python type."""
    tensors: dict[str, torch.Tensor] = {}
    kinds: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{_escape_key(key)}"
        if isinstance(value, dict):
            sub_t, sub_k = flatten_state(value, f"{name}/")
            tensors.update(sub_t)
            kinds.update(sub_k)
        elif isinstance(value, torch.Tensor):
            tensors[name], kinds[name] = value.detach().contiguous(), "t"
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"strategy state {name!r}: cannot store {type(value).__name__}")
        elif isinstance(value, int):
            tensors[name], kinds[name] = torch.tensor(value, dtype=torch.int64), "i"
        else:
            tensors[name], kinds[name] = torch.tensor(value, dtype=torch.float64), "f"
    return tensors, kinds


def unflatten_state(tensors: dict[str, torch.Tensor], kinds: dict[str, str]) -> dict:
    tree: dict = {}
    for name, kind in kinds.items():
        value = tensors[name]
        leaf = value if kind == "t" else (int(value.item()) if kind == "i" else float(value.item()))
        node = tree
        *parents, last = (_unescape_key(part) for part in name.split("/"))
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf
    return tree


class JobStateStore:
    def __init__(self, nc, js, job_id: str, identity: Identity, *, keep_versions: int = 0):
        self.nc = nc
        # Earlier versions whose models the record keeps pointing at (async: the bases of
        # stale updates; sync with late_updates: next_round: the last round's base).
        self.keep_versions = keep_versions
        self._history: list[tuple[int, dict]] = []
        self.js = js
        self.job_id = job_id
        self.identity = identity
        self.models = BlobStore(nc, js, MODELS_BUCKET)
        self.revision: int | None = None
        self._attempted: bytes | None = None  # the value of a commit attempt that raised
        self._model_ref: dict | None = None
        self._strategy_ref: dict | None = None
        self._kinds: dict[str, str] = {}
        self._model_version: int | None = None

    async def _kv(self):
        return await self.js.key_value(KV_BUCKET)

    @property
    def model_ref(self) -> dict | None:
        """{bucket, name, size, digest} of the object of the last committed version."""
        return self._model_ref

    @property
    def kept_refs(self) -> list[tuple[int, dict]]:
        """(version, object ref) of the earlier versions the committed record still names."""
        return list(self._history)

    async def reset(self) -> None:
        """A fresh run of the job: forget what an earlier run committed."""
        kv = await self._kv()
        try:
            await kv.purge(self.job_id)
        except Exception as exc:  # nothing to purge is fine
            log.debug("jobstate.purge_skipped", error=repr(exc))
        self.revision = None

    def model_ref_for(self, version: int) -> dict | None:
        """The object ref of ``version``'s model if the committed record names it (the
        current version or a kept earlier one): announcements point at it instead of
        carrying the model again."""
        if version == self._model_version and self._model_ref is not None:
            return self._model_ref
        return dict(self._history).get(version)

    @property
    def strategy_ref(self) -> dict | None:
        """{bucket, name, size, digest} of the current version's strategy-state object (None: no tensors)."""
        return self._strategy_ref

    async def _put(self, name: str, tensors: dict[str, torch.Tensor]) -> dict:
        # Written from the tensors' own memory (no encoded copy of the model).
        ref = await self.models.put_stream(name, tensor_pieces(tensors))
        return {"bucket": ref.bucket, "name": ref.name, "size": ref.size, "digest": ref.digest}

    async def commit(self, *, run: str, record: JobRecord, model: State, strategy_state: dict, now_ms: int) -> None:
        if self._model_version != record.model_version or self._model_ref is None:
            # Two objects: the model alone (workers and aggregators read it: round.open points at
            # it), and the strategy's server state (momenta: as large as the model, read only by a
            # resuming coordinator). A unique name per commit: a rival writer whose
            # compare-and-set is about to fail must not overwrite the object the current record
            # points at.
            name = f"{self.job_id}/v{record.model_version}/{os.urandom(6).hex()}"
            model_ref = await self._put(name, {f"{MODEL_PREFIX}{k}": v for k, v in model.items()})
            tensors, kinds = flatten_state(strategy_state, STRATEGY_PREFIX)
            strategy_ref = await self._put(f"{name}.strategy", tensors) if tensors else None
            if self._model_ref is not None and self._model_version is not None and self.keep_versions > 0:
                self._history.append((self._model_version, self._model_ref))
                self._history = [(v, r) for v, r in self._history
                                 if v >= record.model_version - self.keep_versions][-self.keep_versions:]
            self._model_ref, self._strategy_ref = model_ref, strategy_ref
            self._kinds = kinds
            self._model_version = record.model_version
        doc = {"job": self.job_id, "run": run, "record": record.as_dict(), "model": self._model_ref,
               "strategy": self._strategy_ref, "strategy_kinds": self._kinds, "coordinator": self.identity.id, "updated_ms": now_ms,
               "history": [[v, r] for v, r in self._history]}
        value = self._signed(doc)
        kv = await self._kv()
        try:
            if self.revision is None:
                self.revision = await kv.create(self.job_id, value)
            else:
                # Compare-and-set: fails if anyone else wrote the key since our last commit.
                self.revision = await kv.update(self.job_id, value, last=self.revision)
        except Exception as exc:
            if await self._earlier_attempt_landed(kv, exc):
                return
            self._attempted = value
            raise
        self._attempted = None

    async def _earlier_attempt_landed(self, kv, exc: Exception) -> bool:
        """After a timed-out attempt (a stream leader died mid-request), a retry may find the
        key moved on: if what is stored is exactly that earlier attempt, it was ours and it
        landed (only its ack was lost); take its revision instead of failing the job."""
        if self._attempted is None or "wrong last sequence" not in repr(exc).lower():
            return False
        try:
            entry = await kv.get(self.job_id)
        except Exception:
            return False
        if entry is None or entry.value != self._attempted:
            return False
        self.revision = entry.revision
        self._attempted = None
        log.warning("commit.ack_lost_but_stored", revision=entry.revision)
        return True

    async def load(self) -> CommittedJob | None:
        kv = await self._kv()
        try:
            entry = await kv.get(self.job_id)
        except Exception:
            return None
        if entry is None or not entry.value:
            return None
        doc = self._verified(entry.value)
        if doc.get("job") != self.job_id:
            raise JobStateError(f"the KV record names job {doc.get('job')!r}")
        try:
            record = JobRecord.from_dict(doc["record"])
            ref = doc["model"]
            strategy_ref = doc.get("strategy")  # (records before the split kept both in one object)
            kinds = {str(k): str(v) for k, v in doc.get("strategy_kinds", {}).items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise JobStateError(f"job state record for {self.job_id!r} is malformed: {exc!r}") from None
        tensors = await self._get(ref)
        if strategy_ref is not None:
            tensors.update(await self._get(strategy_ref))
        model = model_part(tensors)
        strategy = unflatten_state(tensors, kinds)
        history: dict[int, State] = {}
        kept: list[tuple[int, dict]] = []
        for item in doc.get("history", [])[-max(self.keep_versions, 0):] if self.keep_versions else []:
            try:
                version, old = int(item[0]), item[1]
                raw = await self.models.get(old["name"], expected_size=old["size"], expected_digest=old["digest"])
            except Exception as exc:  # a lost old model only makes its stale updates unusable
                log.warning("jobstate.history_unavailable", version=item[0] if item else None, error=repr(exc))
                continue
            old_tensors = await asyncio.to_thread(lambda raw=raw: dict(decode_tensors(raw)))
            history[version] = model_part(old_tensors)
            kept.append((version, old))
        self.revision = entry.revision
        self._model_ref, self._strategy_ref = ref, strategy_ref
        self._kinds = kinds
        self._model_version = record.model_version
        self._history = kept
        return CommittedJob(doc["run"], record, model, strategy.get("strategy", {}), history)

    async def _get(self, ref: dict) -> dict[str, torch.Tensor]:
        data = await self.models.get(ref["name"], expected_size=ref["size"], expected_digest=ref["digest"])
        return await asyncio.to_thread(lambda: dict(decode_tensors(data)))

    def _signed(self, doc: dict) -> bytes:
        return sign_record(doc, self.identity.sign)

    def _verified(self, raw: bytes) -> dict:
        try:
            return open_signed_record(raw, self.identity.public_key.verify)
        except SignedRecordError as exc:
            raise JobStateError(f"job state record for {self.job_id!r} is not signed by this coordinator: {exc}") from None
