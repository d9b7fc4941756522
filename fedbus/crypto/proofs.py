"""Update proofs: a worker's own signed update header, carried inside a partial aggregate.

An aggregator cannot forge a worker's Ed25519 signature, so a partial that lists, for
every update it folded, the worker's signed header (the exact header bytes and the
signature, as they arrived) lets the coordinator and an auditor check who is inside it:
each listed update was really sent by a worker of the aggregator's region, for this job,
run and round, with the digest the partial names. What it cannot prove is the update's
content (the coordinator never sees it); the weight is bounded by the worker's caps.
"""

from __future__ import annotations

from nacl.exceptions import BadSignatureError

from fedbus.crypto.envelopes import Rejection
from fedbus.crypto.federation import Federation
from fedbus.protocol.envelope import SIGNATURE_LEN, EnvelopeError, EnvelopeHeader, decode_header, split_frame


def proof_of(wire: bytes | bytearray | memoryview) -> bytes:
    """The proof of a received update: its header bytes followed by its signature."""
    header_bytes, signature, _ = split_frame(wire)
    return bytes(header_bytes) + signature


def verify_proof(federation: Federation, proof: bytes, *, job: str, run: str | None, round_: int | None,
                 worker: str, region: str) -> EnvelopeHeader:
    """The verified update header ``proof`` carries; Rejection with a named reason if it is
    not ``worker``'s signed update of this job, run and round, or ``worker`` is not a
    worker of ``region``."""
    if len(proof) <= SIGNATURE_LEN:
        raise Rejection("malformed_body", f"proof of {worker[:64]} too short")
    header_bytes, signature = proof[:-SIGNATURE_LEN], proof[-SIGNATURE_LEN:]
    try:
        header = decode_header(header_bytes)
    except EnvelopeError as exc:
        raise Rejection("malformed_body", f"proof of {worker[:64]}: {exc}") from None
    participant = federation.get(worker)
    if participant is None or participant.role != "worker":
        raise Rejection("unknown_sender", f"partial lists {worker[:64]}, not a listed worker")
    if participant.region != region:
        raise Rejection("wrong_region", f"partial of region {region} lists {worker} of region {participant.region}")
    if participant.revoked:
        raise Rejection("revoked_sender", worker)
    if header.sender != worker or header.type != "update":
        raise Rejection("header_mismatch", f"proof is a {header.type} of {header.sender[:64]}, listed as {worker}")
    try:
        federation.verify_key(worker).verify(header_bytes, signature)
    except BadSignatureError:
        raise Rejection("bad_signature", f"proof of {worker}") from None
    # (round_ None: async, where each update answers its own ticket; the caller checks it)
    if header.job != job or header.run != run or (round_ is not None and header.round != round_):
        raise Rejection("header_mismatch", f"proof of {worker} is for {header.job}/{header.run}/round {header.round}")
    return header


__all__ = ["proof_of", "verify_proof"]
