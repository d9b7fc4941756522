"""ModelRegistry: the job's manifests and tags in the ``fedbus-registry`` KV bucket.

Keys (per job ``J``): ``J.v.<version>`` holds the signed manifest of a kept version;
``J.tag.<name>`` a signed tag naming a version (signed by the coordinator or an
operator: tags protect versions from retention, so a forged tag could only keep more,
but it is refused all the same). Everything read back is verified against the
federation before it is used. The model bytes themselves stay where the coordinator's
job state put them (the ``fedbus-models`` Object Store); a manifest names that object.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import nats.js.errors
import structlog

from fedbus.bus.layout import REGISTRY_BUCKET
from fedbus.crypto.keys import Identity
from fedbus.registry.manifest import (
    TAG_PATTERN,
    ManifestError,
    ModelManifest,
    open_manifest,
    open_signed,
    sign_doc,
    sign_manifest,
)

log = structlog.get_logger("fedbus.registry")

TAG_SIGNERS = frozenset({"coordinator", "operator"})
_TAG_RE = re.compile(TAG_PATTERN)


def check_tag(name: str) -> str:
    if not isinstance(name, str) or not _TAG_RE.match(name):
        raise ValueError(f"invalid tag {name!r}: 1-64 characters of A-Z a-z 0-9 _ -")
    return name


@dataclass(frozen=True)
class Tag:
    name: str
    version: int
    signer: str


class ModelRegistry:
    def __init__(self, js, job: str, federation):
        self.js = js
        self.job = job
        self.federation = federation
        self._kv = None

    async def kv(self):
        if self._kv is None:
            self._kv = await self.js.key_value(REGISTRY_BUCKET)
        return self._kv

    def _version_key(self, version: int) -> str:
        return f"{self.job}.v.{int(version)}"

    def _tag_key(self, name: str) -> str:
        return f"{self.job}.tag.{check_tag(name)}"

    async def _keys(self, pattern: str) -> list[str]:
        """Keys matching a NATS wildcard pattern, from the bucket stream's subject counts
        (nats-py's ``kv.keys(filters=...)`` matches substrings and reads every entry)."""
        prefix = f"$KV.{REGISTRY_BUCKET}."
        info = await self.js.stream_info(f"KV_{REGISTRY_BUCKET}", subjects_filter=prefix + pattern)
        return sorted(subject[len(prefix):] for subject, count in (info.state.subjects or {}).items() if count)

    async def reset(self) -> None:
        """A fresh run of the job: its version numbers start again, so the earlier run's
        manifests and tags go (their model objects follow at the first retention pass)."""
        for key in await self._keys(f"{self.job}.>"):
            await self._erase(key)

    # ---- manifests ---------------------------------------------------------------

    async def put_manifest(self, manifest: ModelManifest, identity: Identity) -> None:
        kv = await self.kv()
        await kv.put(self._version_key(manifest.version), sign_manifest(manifest, identity))

    async def manifest(self, version: int) -> ModelManifest:
        """The verified manifest of ``version`` (KeyError if the registry keeps none)."""
        kv = await self.kv()
        try:
            entry = await kv.get(self._version_key(version))
        except nats.js.errors.KeyNotFoundError:
            raise KeyError(f"job {self.job} keeps no version {version}") from None
        if entry is None or not entry.value:
            raise KeyError(f"job {self.job} keeps no version {version}")
        manifest = open_manifest(entry.value, self.federation)
        if manifest.job != self.job or manifest.version != version:
            raise ManifestError(f"the manifest under version {version} describes {manifest.job} v{manifest.version}")
        return manifest

    async def versions(self) -> list[int]:
        """Versions with a manifest, ascending (unverified: a listing, not a trust decision)."""
        out = []
        for key in await self._keys(f"{self.job}.v.*"):
            tail = key.rsplit(".", 1)[-1]
            if tail.isdigit():
                out.append(int(tail))
        return sorted(out)

    async def _erase(self, key: str) -> None:
        # Purging the key's subject in the bucket's stream leaves no delete marker behind
        # (kv.purge would keep one per key forever: a long job's dropped versions add up).
        await self.js.purge_stream(f"KV_{REGISTRY_BUCKET}", subject=f"$KV.{REGISTRY_BUCKET}.{key}")

    async def drop_manifest(self, version: int) -> None:
        await self._erase(self._version_key(version))

    # ---- tags --------------------------------------------------------------------

    async def tag(self, name: str, version: int, identity: Identity, now_ms: int) -> None:
        if identity.role not in TAG_SIGNERS:
            raise ValueError(f"{identity.id} is a {identity.role}: tags are signed by the coordinator or an operator")
        kv = await self.kv()
        doc = {"job": self.job, "tag": check_tag(name), "version": int(version), "created_ms": int(now_ms)}
        await kv.put(self._tag_key(name), sign_doc(doc, identity))

    async def untag(self, name: str) -> None:
        await self._erase(self._tag_key(name))

    async def tags(self) -> list[Tag]:
        """Every verified tag of the job; forged or malformed ones are logged and left out."""
        kv = await self.kv()
        out = []
        for key in await self._keys(f"{self.job}.tag.*"):
            try:
                entry = await kv.get(key)
                if entry is None or not entry.value:
                    continue
                doc, signer = open_signed(entry.value, self.federation, TAG_SIGNERS)
                name, version = check_tag(doc["tag"]), int(doc["version"])
                if doc.get("job") != self.job or key != self._tag_key(name) or version < 0:
                    raise ManifestError(f"tag record under {key} names {doc.get('job')!r}/{name!r}")
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                continue
            except (ManifestError, ValueError, KeyError, TypeError) as exc:
                log.warning("registry.tag_rejected", key=key[:200], reason="invalid_tag", detail=str(exc)[:200])
                continue
            out.append(Tag(name, version, signer))
        return sorted(out, key=lambda t: (t.version, t.name))
