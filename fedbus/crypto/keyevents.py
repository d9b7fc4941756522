"""KeyOverlay: the federation file as amended by live key events (pure: no I/O, no clock).

Every process (coordinator, aggregators, workers, the `fedbus keys` tool) replays the
job's key events (``KeyEvent`` on ``<prefix>.<job>.ctl.keys``) from the start of the
control stream, in stream order, into one of these; the envelope verifier looks senders
and their keys up here, so a revocation or rotation takes effect in every running
process at once and survives restarts (the events stay in the stream).

Rules, applied in stream order (the stream sequence is the only order; timestamps are not):

1. Only a current, unrevoked coordinator or operator signs key events (the verifier checks
   role, revocation and signature against this overlay as it stood before the event; it is
   checked again here).
2. A coordinator's key is never the target: it signs every control event and the
   committed job state, so changing it means a new federation file and a restart.
3. Revocation is final. Revoking a revoked participant changes nothing; no rotation
   applies to a revoked participant afterwards (a rotation never un-revokes).
4. A rotation names the key it replaces (``old_key``) and applies only while that key is
   current. Two operators racing to rotate the same participant: the first in the stream
   wins, the second is refused as stale.
5. A key that was ever replaced or revoked never becomes current again, and a new key may
   not be any participant's current key. With rules 3 and 4 this makes every replayed or
   re-published old event a no-op or a refusal, never a change.

Refusals raise ``KeyEventRefused`` (rejection reason ``invalid_key_event``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedbus.crypto.keys import unb64
from fedbus.protocol.messages import KeyEvent

if TYPE_CHECKING:  # federation.py builds its overlay from this module
    from fedbus.crypto.federation import Participant

KEY_EVENT_SIGNERS = KeyEvent.SENDER_ROLES
# The participant field that holds the X25519 encryption key, once the federation file
# has one (sealed updates); until then a rotated encryption key is kept here only.
ENCRYPTION_KEY_FIELD = "encryption_key"


class KeyEventRefused(ValueError):
    """A verified key event that the rules above do not let change anything."""


@dataclass(frozen=True)
class KeyChange:
    """What one applied key event changed."""

    participant: str
    action: str  # "revoke" | "rotate"
    signer: str
    public_key: str  # the participant's current key after the event (the revoked one for a revocation)
    old_key: str | None = None
    encryption_key: str | None = None
    reason: str = ""
    seq: int | None = None  # stream sequence of the event


class KeyOverlay:
    def __init__(self, participants: Iterable[Participant]):
        self._current: dict[str, Participant] = {p.id: p for p in participants}
        # Keys that may never be current again (rule 5), as raw bytes: two base64
        # spellings can carry one key.
        self._retired: set[bytes] = {unb64(p.public_key) for p in self._current.values() if p.revoked}
        self._encryption: dict[str, str] = {}
        self.changes: list[KeyChange] = []

    def get(self, participant_id: str) -> Participant | None:
        return self._current.get(participant_id)

    def encryption_key(self, participant_id: str) -> str | None:
        """The participant's rotated encryption key, or its listed one (None if neither)."""
        if participant_id in self._encryption:
            return self._encryption[participant_id]
        listed = self._current.get(participant_id)
        return getattr(listed, ENCRYPTION_KEY_FIELD, None) if listed is not None else None

    def _current_holder(self, key: bytes) -> str | None:
        for p in self._current.values():
            if unb64(p.public_key) == key:
                return p.id
        return None

    def apply(self, event: KeyEvent, signer_id: str, *, seq: int | None = None) -> KeyChange | None:
        """Apply one verified event from ``signer_id``. Returns what changed, None when it
        changes nothing (a repeated revocation); raises KeyEventRefused."""
        signer = self._current.get(signer_id)
        if signer is None or signer.revoked or signer.role not in KEY_EVENT_SIGNERS:
            raise KeyEventRefused(f"{signer_id} may not sign key events")
        target = self._current.get(event.participant)
        if target is None:
            raise KeyEventRefused(f"{event.participant} is not listed")
        if target.role == "coordinator":
            raise KeyEventRefused(f"{target.id} is the coordinator: its key changes only with the federation file")
        if event.action == "revoke":
            if target.revoked:
                return None
            self._retired.add(unb64(target.public_key))
            self._current[target.id] = target.model_copy(update={"revoked": True})
            change = KeyChange(target.id, "revoke", signer_id, target.public_key, reason=event.reason, seq=seq)
        else:
            change = self._rotate(target, event, signer_id, seq)
        self.changes.append(change)
        return change

    def _rotate(self, target: Participant, event: KeyEvent, signer_id: str, seq: int | None) -> KeyChange:
        assert event.old_key is not None and event.new_key is not None  # KeyEvent's validator
        if target.revoked:
            raise KeyEventRefused(f"{target.id} is revoked; revocation is final")
        old, new = unb64(event.old_key), unb64(event.new_key)
        if old != unb64(target.public_key):
            raise KeyEventRefused(f"stale rotation of {target.id}: it names a key that is not its current one")
        if new in self._retired:
            raise KeyEventRefused(f"the new key of {target.id} was retired or revoked before")
        holder = self._current_holder(new)
        if holder is not None:
            raise KeyEventRefused(f"the new key of {target.id} is {holder}'s current key")
        self._retired.add(old)
        update: dict[str, object] = {"public_key": event.new_key}
        if event.new_encryption_key is not None:
            self._encryption[target.id] = event.new_encryption_key
            if ENCRYPTION_KEY_FIELD in type(target).model_fields:
                update[ENCRYPTION_KEY_FIELD] = event.new_encryption_key
        self._current[target.id] = target.model_copy(update=update)
        return KeyChange(target.id, "rotate", signer_id, event.new_key, old_key=event.old_key,
                         encryption_key=event.new_encryption_key, reason=event.reason, seq=seq)
