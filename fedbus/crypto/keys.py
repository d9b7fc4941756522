"""Participant identities: an Ed25519 signing key plus who it belongs to."""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path

import yaml
from nacl.signing import SigningKey, VerifyKey

ROLES = ("coordinator", "aggregator", "worker")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


@dataclass(frozen=True)
class Identity:
    """Who I am: id, role, region and the private key that proves it."""

    id: str
    role: str
    region: str
    signing_key: SigningKey

    @classmethod
    def generate(cls, id: str, role: str, region: str = "default") -> Identity:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {role!r}")
        return cls(id, role, region, SigningKey.generate())

    @property
    def public_key(self) -> VerifyKey:
        return self.signing_key.verify_key

    def sign(self, data: bytes) -> bytes:
        return self.signing_key.sign(data).signature

    def participant_entry(self) -> dict[str, str]:
        return {"id": self.id, "role": self.role, "region": self.region,
                "public_key": b64(bytes(self.public_key))}

    def save(self, path: str | Path) -> None:
        """Write the private key file, readable by the owner only."""
        data = dict(self.participant_entry(), private_key=b64(bytes(self.signing_key)))
        text = "# fedbus private key: keep secret, never commit\n" + yaml.safe_dump(data, sort_keys=False)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # the mode above only applies when the file is created
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)

    @classmethod
    def load(cls, path: str | Path) -> Identity:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        try:
            key = SigningKey(unb64(data["private_key"]))
            ident = cls(str(data["id"]), str(data["role"]), str(data.get("region", "default")), key)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:  # AttributeError: non-str key
            raise ValueError(f"{path}: not a fedbus key file ({exc})") from None
        if ident.role not in ROLES:
            raise ValueError(f"{path}: unknown role {ident.role!r}")
        return ident
