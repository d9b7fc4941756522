"""Reading a committed version back: its manifest, its model, both verified.

Used by the coordinator (a rollback's target) and by ``fedbus models export``: the object
is read with the size and digest the signed manifest names, decoded, and the model's
canonical digest must equal the manifest's, so neither the bucket nor the KV store is
trusted.
"""

from __future__ import annotations

import asyncio

import torch

from fedbus.bus import BlobStore
from fedbus.coordinator.jobstate import model_part
from fedbus.protocol.codec import decode_tensors
from fedbus.registry.manifest import ModelManifest, check_model
from fedbus.registry.store import ModelRegistry


def model_of(data: bytes) -> dict[str, torch.Tensor]:
    return model_part(decode_tensors(data))


async def load_version(registry: ModelRegistry, nc, js, version: int) -> tuple[ModelManifest, dict[str, torch.Tensor]]:
    """(manifest, model) of a kept version. Raises KeyError (no such version), ManifestError
    (forged manifest or model not matching it) or the blob store's integrity errors."""
    manifest = await registry.manifest(version)
    ref = manifest.model_object
    data = await BlobStore(nc, js, ref.bucket).get(ref.name, expected_size=ref.size, expected_digest=ref.digest)
    state = await asyncio.to_thread(model_of, data)  # (decode bounds the tensor count)
    await asyncio.to_thread(check_model, manifest, state)
    return manifest, state
