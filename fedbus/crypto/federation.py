"""The federation file: who takes part, in which role and region, with which public key.

Nothing that is not listed here is trusted; a revoked participant stays listed (so its
old messages can be explained in the audit trail) but everything it sends is rejected.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

import yaml
from nacl.public import PublicKey
from nacl.signing import VerifyKey
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fedbus.atomicfile import atomic_write_text
from fedbus.crypto.keys import Identity, unb64

if TYPE_CHECKING:
    from fedbus.crypto.keyevents import KeyChange
    from fedbus.protocol.messages import KeyEvent

ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"  # ids become NATS subject tokens
MAX_SAMPLES_LIMIT = 2**53  # sample counts become float weights; above this they are no longer exact


class Participant(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str = Field(pattern=ID_PATTERN)
    role: Literal["coordinator", "aggregator", "worker", "operator"] = Field(
        description="operator: may sign key events (live revocation and rotation) and nothing else")
    region: str = Field("default", pattern=ID_PATTERN)
    public_key: str = Field(description="base64 Ed25519 public key (32 bytes)")
    encryption_key: str | None = Field(
        None, description="base64 X25519 public key (32 bytes) that update bodies are sealed to when this "
                          "participant receives them (the coordinator, or a region's aggregator); generated "
                          "separately from public_key. Unset: nobody can seal to it")
    revoked: bool = Field(False, description="listed for the audit trail, but everything it sends is rejected")
    max_samples: int | None = Field(
        None, ge=1, le=MAX_SAMPLES_LIMIT,
        description="workers only: the most training samples this worker may claim for one update "
                    "(its aggregation weight); an update claiming more is rejected as excessive_samples. "
                    "Unset: only the worker's heartbeat declaration and the job's "
                    "security.max_samples_per_update bound it")

    @field_validator("public_key", "encryption_key")
    @classmethod
    def _is_32_byte_key(cls, value: str | None, info) -> str | None:
        if value is None:
            return value
        try:
            raw = unb64(value)
        except ValueError:
            raise ValueError(f"{info.field_name} is not base64") from None
        if len(raw) != 32:
            raise ValueError(f"{info.field_name} must be 32 bytes")
        return value

    @model_validator(mode="after")
    def _max_samples_for_workers_only(self) -> Participant:
        if self.max_samples is not None and self.role != "worker":
            raise ValueError(f"participant {self.id}: max_samples applies to workers only, not to a {self.role}")
        return self


class FederationFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    federation: str = "fedbus"
    participants: list[Participant]

    @model_validator(mode="after")
    def _unique_ids(self) -> FederationFile:
        ids = [p.id for p in self.participants]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"duplicate participant ids: {dupes}")
        return self

    @model_validator(mode="after")
    def _unique_keys(self) -> FederationFile:
        # Messages are verified with the key listed for the sender id in the header; two ids
        # sharing one key would let either holder sign as the other. Compared as decoded
        # bytes, since two base64 spellings can carry one key.
        # Likewise an encryption key: either holder could read what is sealed to the other.
        for field, what in (("public_key", "a public key (one could sign as the other)"),
                            ("encryption_key", "an encryption key (one could read what is sealed to the other)")):
            holders: dict[bytes, list[str]] = {}
            for p in self.participants:
                if (value := getattr(p, field)) is not None:
                    holders.setdefault(unb64(value), []).append(p.id)
            shared = [ids for ids in holders.values() if len(ids) > 1]
            if shared:
                raise ValueError(f"participants share {what}: " + "; ".join(", ".join(ids) for ids in shared))
        return self


class Federation:
    """Lookup of participants and their verify keys: the file as amended by the job's live
    key events (``apply_key_event``; see ``fedbus.crypto.keyevents`` for the rules)."""

    def __init__(self, spec: FederationFile):
        from fedbus.crypto.keyevents import KeyOverlay

        self.spec = spec
        self.overlay = KeyOverlay(spec.participants)
        self._keys = {p.id: VerifyKey(unb64(p.public_key)) for p in spec.participants}
        # Ids by role in file order, and each worker's position (its default partition): a
        # participant's role and place never change (key events revoke and rotate keys), and
        # with 1,000 workers a scan of the file per lookup is what a worker pool's start and
        # every sealed update would pay.
        self._ids_by_role: dict[str, list[str]] = {}
        for p in spec.participants:
            self._ids_by_role.setdefault(p.role, []).append(p.id)
        self._partitions = {w: i for i, w in enumerate(self._ids_by_role.get("worker", []))}

    @classmethod
    def load(cls, path: str | Path) -> Federation:
        return cls(FederationFile.model_validate(yaml.safe_load(Path(path).read_text(encoding="utf-8"))))

    def dump(self, path: str | Path) -> None:
        # exclude_none: optional limits that are unset stay out of the file instead of reading "null"
        text = yaml.safe_dump(self.spec.model_dump(mode="json", exclude_none=True), sort_keys=False)
        atomic_write_text(path, text)

    def listed_as(self, identity: Identity, role: str, *, check_key: bool = True) -> Participant:
        """This process's own entry: its key must be listed, unrevoked, with ``role``.

        ``check_key=False``: only the id, role and revocation: a participant rotated to a new
        key by a key event is not listed with it in the file, so its key can be checked only
        once the job's key events have been replayed (``KeyWatch.start``)."""
        if identity.role != role:
            raise ValueError(f"key {identity.id} has role {identity.role}, not {role}")
        listed = self.get(identity.id)
        if listed is None or listed.role != role or listed.revoked or (
                check_key and unb64(listed.public_key) != bytes(identity.public_key)):
            raise ValueError(f"key {identity.id} is not listed (unrevoked, with this public key) in the federation file"
                             + (" as amended by the job's key events" if self.overlay.changes else ""))
        mine = identity.participant_entry()
        if check_key and listed.encryption_key is not None and listed.encryption_key != mine.get("encryption_key"):
            # Others would seal to a key this process cannot open with.
            raise ValueError(f"key {identity.id}: the federation file lists another encryption key than the key "
                             f"file holds")
        return listed

    def get(self, participant_id: str) -> Participant | None:
        return self.overlay.get(participant_id)

    def verify_key(self, participant_id: str) -> VerifyKey:
        return self._keys[participant_id]

    def apply_key_event(self, event: KeyEvent, signer_id: str, *, seq: int | None = None) -> KeyChange | None:
        """Apply one verified key event (raises KeyEventRefused); every later lookup sees it."""
        change = self.overlay.apply(event, signer_id, seq=seq)
        if change is not None and change.action == "rotate":
            self._keys[change.participant] = VerifyKey(unb64(change.public_key))
        return change

    def _current(self, role: str) -> list[Participant]:
        return [self.overlay.get(p) for p in self._ids_by_role.get(role, ())]  # type: ignore[misc]

    def encryption_key(self, participant_id: str) -> PublicKey | None:
        """The X25519 key bodies are sealed to for this participant (None: unknown id or no key)."""
        listed = self.get(participant_id)
        if listed is None or listed.encryption_key is None:
            return None
        return PublicKey(unb64(listed.encryption_key))

    def workers(self) -> list[Participant]:
        """Workers in file order (revoked ones too); a worker's position is its default data partition."""
        return self._current("worker")

    def aggregators(self) -> list[Participant]:
        """Regional aggregators (unrevoked), each tied to its region."""
        return [p for p in self._current("aggregator") if not p.revoked]

    def coordinator(self) -> Participant:
        coords = [p for p in self._current("coordinator") if not p.revoked]
        if len(coords) != 1:
            raise ValueError(f"a federation needs exactly one active coordinator, found {len(coords)}")
        return coords[0]

    def partition_of(self, worker_id: str) -> int:
        try:
            return self._partitions[worker_id]
        except KeyError:
            raise KeyError(f"{worker_id!r} is not a worker of this federation") from None
