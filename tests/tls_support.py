"""TLS material for tests, generated with the `cryptography` package (no tool is downloaded):
a CA, a server certificate for 127.0.0.1/localhost, and one client certificate per
participant whose subject is CN=<participant id> (what `verify_and_map` maps to a user)."""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID = datetime.timedelta(days=2)


@dataclass(frozen=True)
class Pki:
    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path

    def client(self, participant_id: str) -> tuple[Path, Path]:
        return self.dir / f"{participant_id}.pem", self.dir / f"{participant_id}-key.pem"


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    os.chmod(path, 0o600)


def _cert(subject: str, key, issuer: x509.Name, issuer_key, *, ca: bool, usage=None, san=None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(issuer)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + VALID)
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if san is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(directory: Path, participant_ids: list[str]) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedbus test CA")])
    ca_cert = _cert("fedbus test CA", ca_key, ca_name, ca_key, ca=True)
    pki = Pki(directory, directory / "ca.pem", directory / "server.pem", directory / "server-key.pem")
    pki.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))

    server_key = ec.generate_private_key(ec.SECP256R1())
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server = _cert("fedbus nats-server", server_key, ca_name, ca_key, ca=False,
                   usage=ExtendedKeyUsageOID.SERVER_AUTH, san=san)
    pki.server_cert.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    _write_key(pki.server_key, server_key)

    for pid in participant_ids:
        key = ec.generate_private_key(ec.SECP256R1())
        cert_path, key_path = pki.client(pid)
        cert_path.write_bytes(_cert(pid, key, ca_name, ca_key, ca=False,
                                    usage=ExtendedKeyUsageOID.CLIENT_AUTH).public_bytes(serialization.Encoding.PEM))
        _write_key(key_path, key)
    return pki
