"""Participant identities: an Ed25519 signing key, an X25519 encryption key, and who they belong to.

The two key pairs are generated independently and never derived from one another. The
signing key proves who sent a message; the encryption key lets a recipient (the
coordinator, or a region's aggregator) read sealed update bodies. Kept apart, one can be
rotated or revoked without the other, a compromise of one gives nothing about the
other, and no key is ever used in two algorithms (converting an Ed25519 key to X25519
is possible, but ties both roles to one secret and is exactly the reuse that cross-
protocol attacks need).
"""

from __future__ import annotations

import base64
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import yaml
from nacl.public import PrivateKey, PublicKey
from nacl.signing import SigningKey, VerifyKey

from fedbus.atomicfile import atomic_write_text

# operator: may sign key events (revocation, rotation) and nothing else.
ROLES = ("coordinator", "aggregator", "worker", "operator")

# Set to 1 to load key files that group or others can read (with a warning instead of an error).
ALLOW_INSECURE_KEYS_ENV = "FEDBUS_ALLOW_INSECURE_KEYS"


class InsecureKeyFileError(ValueError):
    """A private key file that someone besides its owner can read (or write)."""


class InsecureKeyFileWarning(UserWarning):
    """Such a key file was loaded anyway because FEDBUS_ALLOW_INSECURE_KEYS=1."""


def _read_private_file(path: Path) -> str:
    """The text of a key file, refused when its mode lets group or others in.

    The mode is checked on the open descriptor, so the file checked is the file read.
    """
    with open(path, encoding="utf-8") as fh:
        mode = stat.S_IMODE(os.fstat(fh.fileno()).st_mode)
        if os.name == "posix" and mode & 0o077:
            problem = (f"{path}: private key file is accessible by group or others (mode {mode:04o}); "
                       f"fix with `chmod 600 {path}`")
            if os.environ.get(ALLOW_INSECURE_KEYS_ENV) == "1":
                warnings.warn(f"{problem} (loaded anyway: {ALLOW_INSECURE_KEYS_ENV}=1)", InsecureKeyFileWarning,
                              stacklevel=3)
            else:
                raise InsecureKeyFileError(f"{problem}, or set {ALLOW_INSECURE_KEYS_ENV}=1 to load it anyway")
        return fh.read()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


@dataclass(frozen=True)
class Identity:
    """Who I am: id, role, region, the private key that proves it and (optionally) the
    private key that opens bodies sealed to me. Key files written before sealing existed
    have no encryption key: they still load, and such a participant cannot receive sealed
    bodies."""

    id: str
    role: str
    region: str
    signing_key: SigningKey
    encryption_key: PrivateKey | None = None

    @classmethod
    def generate(cls, id: str, role: str, region: str = "default") -> Identity:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {role!r}")
        return cls(id, role, region, SigningKey.generate(), PrivateKey.generate())

    @property
    def public_key(self) -> VerifyKey:
        return self.signing_key.verify_key

    @property
    def encryption_public_key(self) -> PublicKey | None:
        return None if self.encryption_key is None else self.encryption_key.public_key

    def sign(self, data: bytes) -> bytes:
        return self.signing_key.sign(data).signature

    def participant_entry(self) -> dict[str, str]:
        entry = {"id": self.id, "role": self.role, "region": self.region, "public_key": b64(bytes(self.public_key))}
        if self.encryption_key is not None:
            entry["encryption_key"] = b64(bytes(self.encryption_key.public_key))
        return entry

    def save(self, path: str | Path) -> None:
        """Write the private key file, readable by the owner only.

        The file is created 0600 (never readable by others, not even briefly) and replaces an
        existing one atomically, so an interrupted ``--force`` never leaves half a key.
        """
        data = dict(self.participant_entry(), private_key=b64(bytes(self.signing_key)))
        if self.encryption_key is not None:
            data["encryption_private_key"] = b64(bytes(self.encryption_key))
        text = "# fedbus private key: keep secret, never commit\n" + yaml.safe_dump(data, sort_keys=False)
        atomic_write_text(path, text, mode=0o600)

    @classmethod
    def load(cls, path: str | Path) -> Identity:
        """Read a key file written by ``save``.

        Raises InsecureKeyFileError when group or others may access the file, unless
        FEDBUS_ALLOW_INSECURE_KEYS=1 (then an InsecureKeyFileWarning); ValueError when
        it is not a key file.
        """
        text = _read_private_file(Path(path))
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not a fedbus key file (not YAML: {' '.join(str(exc).split())})") from None
        try:
            key = SigningKey(unb64(data["private_key"]))
            sealed = data.get("encryption_private_key")  # absent in key files from before sealing
            enc = None if sealed is None else PrivateKey(unb64(sealed))
            ident = cls(str(data["id"]), str(data["role"]), str(data.get("region", "default")), key, enc)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:  # AttributeError: non-str key
            raise ValueError(f"{path}: not a fedbus key file ({exc})") from None
        if ident.role not in ROLES:
            raise ValueError(f"{path}: unknown role {ident.role!r}")
        return ident
