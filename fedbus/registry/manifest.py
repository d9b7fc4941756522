"""ModelManifest: what one committed model version is, where it came from, signed.

The coordinator writes one manifest per committed version (``fedbus.registry.store``):
the job and run, the version and its parent (the version it was trained from, or the
version a rollback restored), the round that produced it, its metrics, who contributed
(worker or region ids with the digests of the updates that were folded), the strategy
and server optimizer with their parameters, DP ε when the job has privacy, and the
SHA-256 of the model's canonical encoding. It is signed with the coordinator's key, so an
export can be checked against it without trusting the bucket it came from.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import torch
from nacl.exceptions import BadSignatureError
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from fedbus.crypto.keys import Identity, b64, unb64
from fedbus.protocol.codec import tensor_pieces

MAX_CONTRIBUTORS = 100_000
MAX_MANIFEST_BYTES = 16 * 1024 * 1024  # 100k contributors with digests fit; nothing is parsed beyond it
TAG_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"

Id = Annotated[str, StringConstraints(min_length=1, max_length=128)]
Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{0,128}$")]
Version = Annotated[int, Field(ge=0, le=2**53 - 1)]


class ManifestError(ValueError):
    """A manifest (or a tag) that is malformed, not signed by a coordinator of the
    federation, or does not match the model it describes."""


class Contributor(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    participant: Id = Field(description="worker id (flat topology) or region aggregator id (regional)")
    round: Version = Field(description="the round (or async ticket) the update was sent for")
    update_digest: Hex = Field("", description="SHA-256 of the update's envelope body, hex ('' if unknown)")


class ObjectRef(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    bucket: Id
    name: Annotated[str, StringConstraints(min_length=1, max_length=512)]
    size: Annotated[int, Field(ge=0)]
    digest: Annotated[str, StringConstraints(max_length=128)]


class ModelManifest(BaseModel):
    """One committed model version (the single source of truth of the registry's records)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    job: Id
    run: Annotated[str, StringConstraints(max_length=128)]
    version: Version
    parent_version: Version | None = Field(None, description="the version this one was built on (None: initial)")
    kind: Literal["initial", "aggregated", "rollback"]
    round: Version = Field(description="the round (async: the version) that produced it")
    created_ms: Annotated[int, Field(ge=0)]
    metrics: dict[Annotated[str, StringConstraints(max_length=64)], float] = Field(default_factory=dict,
                                                                                  max_length=64)
    contributors: list[Contributor] = Field(default_factory=list, max_length=MAX_CONTRIBUTORS)
    strategy: dict[str, Any] = Field(default_factory=dict, description="the job's strategy spec (name and parameters)")
    server_optimizer: dict[str, Any] = Field(default_factory=dict)
    dp_epsilon: float | None = Field(None, description="client-level ε spent up to this version (privacy.dp)")
    model_digest: Annotated[str, StringConstraints(pattern=r"^sha256:[0-9a-f]{64}$")]
    model_object: ObjectRef = Field(description="the object holding the model (and the strategy's server state)")
    coordinator: Id


def model_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of the model's canonical encoding: tensors sorted by name, fedbus tensor codec."""
    ordered = {name: state[name].detach().contiguous() for name in sorted(state)}
    hasher = hashlib.sha256()
    for piece in tensor_pieces(ordered):  # the encoding, hashed from the tensors' memory
        hasher.update(piece)
    return "sha256:" + hasher.hexdigest()


def _canonical(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def sign_doc(doc: Mapping[str, Any], identity: Identity) -> bytes:
    """``doc`` with its signer and an Ed25519 signature over its canonical JSON."""
    return json.dumps({"doc": doc, "signer": identity.id,
                       "signature": b64(identity.sign(_canonical(doc)))}).encode()


def open_signed(raw: bytes, federation, roles: frozenset[str]) -> tuple[dict, str]:
    """(doc, signer) of a signed document whose signer is listed with one of ``roles``
    (key events applied: a revoked signer is refused); ManifestError otherwise."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{len(raw)} bytes: larger than {MAX_MANIFEST_BYTES}")
    try:
        outer = json.loads(raw)
        doc, signer, signature = outer["doc"], str(outer["signer"]), unb64(outer["signature"])
        if not isinstance(doc, dict):
            raise TypeError("doc is not a map")
    except (ValueError, KeyError, TypeError) as exc:
        raise ManifestError(f"not a signed document: {exc!r:.200}") from None
    who = federation.get(signer)
    if who is None or who.role not in roles or getattr(who, "revoked", False):
        raise ManifestError(f"signed by {signer[:64]!r}, not a current {'/'.join(sorted(roles))} of the federation")
    try:
        federation.verify_key(signer).verify(_canonical(doc), signature)
    except (BadSignatureError, ValueError, KeyError) as exc:
        raise ManifestError(f"bad signature by {signer[:64]!r}: {exc!r:.120}") from None
    return doc, signer


def sign_manifest(manifest: ModelManifest, identity: Identity) -> bytes:
    return sign_doc(manifest.model_dump(mode="json"), identity)


def open_manifest(raw: bytes, federation) -> ModelManifest:
    doc, signer = open_signed(raw, federation, frozenset({"coordinator"}))
    try:
        manifest = ModelManifest.model_validate(doc)
    except ValidationError as exc:
        raise ManifestError(f"malformed manifest: {exc.error_count()} errors, first {exc.errors()[0]['msg']}") from None
    if manifest.coordinator != signer:
        raise ManifestError(f"manifest names coordinator {manifest.coordinator!r} but {signer!r} signed it")
    return manifest


def check_model(manifest: ModelManifest, state: Mapping[str, torch.Tensor]) -> None:
    """Raise ManifestError unless ``state`` is exactly the model the manifest describes."""
    got = model_digest(state)
    if got != manifest.model_digest:
        raise ManifestError(f"model digest {got} does not match the manifest of version {manifest.version} "
                            f"({manifest.model_digest})")
