"""How a fedbus process proves who it is to the NATS server: TLS, mTLS, an nkey or a .creds file.

The model holds file *paths* only, never their contents: it is logged (``describe``) and
may end up in error messages, and a path is not a secret. The files are read when the
connection is made (nats-py reads the nkey seed and the .creds file itself, on every
(re)connect, so a rotated file is picked up).
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

# The NATS CLI's environment variables (`nats --help`), used as defaults by every fedbus
# command that connects, so one shell environment serves both tools.
ENV_CA = "NATS_CA"
ENV_CERT = "NATS_CERT"
ENV_KEY = "NATS_KEY"
ENV_CREDS = "NATS_CREDS"
ENV_NKEY = "NATS_NKEY"


class NatsCredentials(BaseModel):
    """What to present to the server. All fields are paths; all optional (none: plain TCP,
    no authentication, as a local development server expects).

    - ``ca``: verify the server's certificate against this CA (TLS). Without it, a TLS
      server is verified against the system's trust store.
    - ``cert`` + ``key``: present this client certificate (mTLS); both or neither.
    - ``creds``: a NATS ``.creds`` file (user JWT + nkey seed, decentralized auth).
    - ``nkey``: a file holding a user nkey seed (``SU...``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    creds: Path | None = None
    nkey: Path | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "NatsCredentials":
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate needs its key and a key its certificate (--tlscert with --tlskey)")
        if self.creds is not None and self.nkey is not None:
            raise ValueError("give either a .creds file or an nkey seed, not both")
        return self

    @property
    def tls(self) -> bool:
        return self.ca is not None or self.cert is not None

    def describe(self) -> dict[str, str]:
        """For logs and summaries: which mechanisms and which files, never file contents."""
        return {name: str(value) for name, value in self.model_dump().items() if value is not None}

    def check_files(self) -> None:
        """Fail early, with the path, on a file that is missing or unreadable (instead of an
        obscure TLS or auth error from inside the connect loop)."""
        for name, path in self.model_dump().items():
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name} file {path} does not exist or is not a file")

    def ssl_context(self) -> ssl.SSLContext | None:
        """A client TLS context, or None when neither a CA nor a client certificate is given.
        Hostname checking stays on: the server's certificate must name the host in the URL."""
        if not self.tls:
            return None
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                             cafile=str(self.ca) if self.ca is not None else None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert is not None:
            context.load_cert_chain(str(self.cert), str(self.key))
        return context

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments for ``nats.aio.client.Client.connect``."""
        options: dict[str, Any] = {}
        context = self.ssl_context()
        if context is not None:
            options["tls"] = context
        if self.creds is not None:
            options["user_credentials"] = str(self.creds)
        if self.nkey is not None:
            options["nkeys_seed"] = str(self.nkey)
        return options


NO_CREDENTIALS = NatsCredentials()


def inbox_prefix(participant_id: str) -> str:
    """Replies (JetStream acks, API answers, push-consumer deliveries) come to subjects under
    this prefix. It names the participant so that a server's permissions can let each one
    read only its own replies: with the shared default ``_INBOX.>`` any client allowed to
    read replies would read everyone's, including the update batches the coordinator
    fetches."""
    return f"_INBOX.{participant_id}"
