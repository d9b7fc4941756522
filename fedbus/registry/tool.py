"""`fedbus models list|show|export|verify|tag|rollback`: the operator's view of a job's registry.

Everything read is verified against the federation file before it is shown or written:
a manifest must carry a current coordinator's signature, and an exported model must hash
to the manifest's digest (it is read back from the written file and checked again).
``rollback`` signs a ``models`` control event for the job's current run and waits until
the coordinator has committed the version that continues from the chosen one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

import torch

from fedbus.bus import KV_BUCKET, NatsCredentials, Subjects, connect, publish_with_retry
from fedbus.crypto.envelopes import now_ms, seal
from fedbus.crypto.keys import Identity
from fedbus.messaging import nats_headers
from fedbus.protocol.messages import ModelCommand, encode_body
from fedbus.registry.manifest import ManifestError, ModelManifest, check_model
from fedbus.registry.models import load_version
from fedbus.registry.store import ModelRegistry

CONNECT_TIMEOUT_S = 10.0
WAIT_POLL_S = 0.25


class ModelToolError(Exception):
    """Something the user can fix, or a verification that failed: one line, no traceback."""


async def _connect(nats_url: str, credentials: NatsCredentials | None, who: str):
    try:
        return await connect(nats_url, name=f"fedbus-models-{who}", first_connect_timeout=CONNECT_TIMEOUT_S,
                             credentials=credentials, participant=who)
    except Exception as exc:
        raise ModelToolError(f"cannot connect to {nats_url}: {exc}") from None


def describe(manifest: ModelManifest, tags: list[str]) -> str:
    acc = manifest.metrics.get("test_accuracy")
    return (f"v{manifest.version:<5} parent={'-' if manifest.parent_version is None else manifest.parent_version:<5} "
            f"{manifest.kind:<10} round={manifest.round:<5} contributors={len(manifest.contributors):<4} "
            f"acc={'-' if acc is None else f'{acc:.4f}'}  {manifest.model_digest[:19]}"
            + (f"  tags={','.join(tags)}" if tags else ""))


async def list_versions(nats_url: str, subjects: Subjects, federation, credentials=None) -> list[str]:
    nc = await _connect(nats_url, credentials, "list")
    try:
        registry = ModelRegistry(nc.jetstream(), subjects.job, federation)
        tags = await registry.tags()
        lines = []
        for version in await registry.versions():
            try:
                manifest = await registry.manifest(version)
            except (KeyError, ManifestError) as exc:
                lines.append(f"v{version:<5} NOT VERIFIED: {exc}")
                continue
            lines.append(describe(manifest, [t.name for t in tags if t.version == version]))
        return lines
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


async def show_version(nats_url: str, subjects: Subjects, federation, version: int, credentials=None) -> dict:
    nc = await _connect(nats_url, credentials, "show")
    try:
        registry = ModelRegistry(nc.jetstream(), subjects.job, federation)
        try:
            manifest = await registry.manifest(version)
        except (KeyError, ManifestError) as exc:
            raise ModelToolError(str(exc)) from None
        tags = [t.name for t in await registry.tags() if t.version == version]
        return {"manifest": manifest.model_dump(mode="json"), "tags": tags}
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


def read_model_file(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from a ``.pt`` (weights only: no code runs) or ``.safetensors`` file."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelToolError(f"{path} does not hold a state_dict of tensors")
    return state


def write_model_files(state: dict[str, torch.Tensor], out: Path) -> list[Path]:
    """``out`` (torch.save of the state_dict) and ``out`` with suffix .safetensors."""
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    written = [out]
    st = out.with_suffix(".safetensors")
    if st != out:
        save_file({k: v.contiguous() for k, v in state.items()}, str(st))
        written.append(st)
    return written


async def export_version(nats_url: str, subjects: Subjects, federation, version: int, out: Path,
                         credentials=None) -> tuple[ModelManifest, list[Path]]:
    nc = await _connect(nats_url, credentials, "export")
    try:
        registry = ModelRegistry(nc.jetstream(), subjects.job, federation)
        try:
            manifest, state = await load_version(registry, nc, nc.jetstream(), version)
        except KeyError as exc:
            raise ModelToolError(str(exc)) from None
        except Exception as exc:  # forged manifest, tampered or missing object
            raise ModelToolError(f"version {version} NOT VERIFIED: {exc}") from None
    finally:
        with contextlib.suppress(Exception):
            await nc.close()
    written = write_model_files(state, out)
    for path in written:  # what is on disk is what the manifest describes
        try:
            check_model(manifest, read_model_file(path))
        except ManifestError as exc:
            raise ModelToolError(f"{path}: {exc}") from None
    return manifest, written


async def verify_file(nats_url: str, subjects: Subjects, federation, version: int, path: Path,
                      credentials=None) -> ModelManifest:
    nc = await _connect(nats_url, credentials, "verify")
    try:
        try:
            manifest = await ModelRegistry(nc.jetstream(), subjects.job, federation).manifest(version)
        except (KeyError, ManifestError) as exc:
            raise ModelToolError(str(exc)) from None
    finally:
        with contextlib.suppress(Exception):
            await nc.close()
    try:
        check_model(manifest, read_model_file(path))
    except ManifestError as exc:
        raise ModelToolError(f"{path}: {exc}") from None
    return manifest


async def tag_version(nats_url: str, subjects: Subjects, federation, signer: Identity, tag: str,
                      version: int | None, credentials=None) -> None:
    """Tag ``version`` (it must have a verified manifest), or remove the tag (version None)."""
    nc = await _connect(nats_url, credentials, signer.id)
    try:
        registry = ModelRegistry(nc.jetstream(), subjects.job, federation)
        if version is None:
            await registry.untag(tag)
            return
        try:
            await registry.manifest(version)
            await registry.tag(tag, version, signer, now_ms())
        except (KeyError, ManifestError, ValueError) as exc:
            raise ModelToolError(str(exc)) from None
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


async def current_run(js, job: str) -> str:
    """The run id of the job's committed state (the coordinator refuses commands for other runs)."""
    try:
        entry = await (await js.key_value(KV_BUCKET)).get(job)
        return str(json.loads(entry.value)["record"]["run"])
    except Exception as exc:
        raise ModelToolError(f"job {job} has no committed state: is its coordinator running? ({exc!r:.120})") from None


async def rollback(nats_url: str, subjects: Subjects, federation, signer: Identity, version: int, *,
                   reason: str = "", wait_s: float = 60.0, credentials=None) -> ModelManifest | None:
    """Publish a signed rollback for the job's current run; return the manifest of the
    version that continues from ``version`` once the coordinator committed it (None if
    ``wait_s`` is 0)."""
    if signer.role not in ModelCommand.SENDER_ROLES:
        raise ModelToolError(f"{signer.id} is a {signer.role}: rollbacks are signed by the coordinator or an operator")
    nc = await _connect(nats_url, credentials, signer.id)
    try:
        js = nc.jetstream()
        registry = ModelRegistry(js, subjects.job, federation)
        try:
            await load_version(registry, nc, js, version)  # refuse locally what the coordinator would refuse
        except KeyError as exc:
            raise ModelToolError(str(exc)) from None
        except Exception as exc:
            raise ModelToolError(f"version {version} NOT VERIFIED: {exc}") from None
        run = await current_run(js, subjects.job)
        before = max(await registry.versions(), default=-1)
        body = encode_body(ModelCommand(action="rollback", version=version, reason=reason))
        wire, header = seal(signer, ModelCommand.TYPE, job=subjects.job, round=0, body=body, run=run)
        await publish_with_retry(js, subjects.ctl(ModelCommand.TYPE), wire, headers=nats_headers(header),
                                 msg_id=header.nonce.hex())
        give_up = time.monotonic() + wait_s
        while time.monotonic() < give_up:
            for v in [v for v in await registry.versions() if v > before]:
                with contextlib.suppress(KeyError, ManifestError):
                    manifest = await registry.manifest(v)
                    if manifest.kind == "rollback" and manifest.parent_version == version:
                        return manifest
            await asyncio.sleep(WAIT_POLL_S)
        if wait_s > 0:
            raise ModelToolError(f"published, but no version continuing from v{version} was committed within "
                                 f"{wait_s:.0f} s (is the coordinator running? its log says why it refused)")
        return None
    finally:
        with contextlib.suppress(Exception):
            await nc.close()
