"""Checking a regional aggregator's partial aggregate before the machine merges it.

The envelope verifier already established that an aggregator listed in the federation
signed the body, fresh, for this job, and that the body matches its digest (a tampered
partial fails there: ``digest_mismatch`` or ``bad_signature``). What is checked here:

* the aggregator publishes for its own region only (sender's region = the subject's
  region = the body's region), else ``wrong_region``;
* every contributor is a worker of that region (``wrong_region``) whose own signed update
  header, carried as its proof, is an update of this job, run and round (``bad_signature``,
  ``header_mismatch``) with exactly the digest the partial lists (``digest_mismatch``);
* the statistics parse as the rule's partial aggregate (``invalid_update``); their shapes
  and the weights' sum are checked by the accumulator's ``merge``.
"""

from __future__ import annotations

from fedbus.aggregation.base import InvalidUpdate
from fedbus.aggregation.partial import WIRE_FORMAT, PartialAggregate
from fedbus.crypto.envelopes import Rejection
from fedbus.crypto.federation import Federation
from fedbus.aggregator.wire import widened_partial
from fedbus.crypto.keys import unb64
from fedbus.crypto.proofs import verify_proof

Contributors = tuple[tuple[str, bytes, float], ...]  # (worker, update digest, weight)


def verified_partial(federation: Federation, job: str, run: str | None, got, subject_region: str, *,
                     same_round: bool = True) -> tuple[PartialAggregate, Contributors, tuple[int, ...]]:
    """The partial aggregate, its contributors and the round (async: ticket) each of their
    updates answered, from a verified ``partial`` message received on agg.<subject_region>;
    Rejection with a named reason otherwise. ``same_round``: every update must answer the
    partial's round (sync); in async mode each answers its own ticket."""
    h, body = got.header, got.fields
    sender = federation.get(h.sender)
    if sender is None or sender.region != subject_region or body.region != subject_region:
        raise Rejection("wrong_region", f"aggregator of region {sender.region if sender else '?'} published on "
                                        f"agg.{subject_region} for region {body.region}", h)
    n = len(body.workers)
    # Bounded before any signature is checked: no partial can list more updates than the
    # federation has workers (a foreign worker inside is then named: wrong_region, below).
    listed = len(federation.workers())
    if n > listed:
        raise Rejection("malformed_body", f"{n} contributors, the federation has {listed} workers", h)
    if n == 0 or not (len(body.digests) == len(body.weights) == len(body.base_versions) == len(body.proofs) == n):
        raise Rejection("malformed_body", "contributor lists of different lengths, or none", h)
    if len(set(body.workers)) != n:
        raise Rejection("duplicate_update", "a worker is listed twice", h)
    contributors = []
    tickets = []
    for worker, digest_b64, weight, proof in zip(body.workers, body.digests, body.weights, body.proofs):
        try:
            raw_proof, digest = unb64(proof), unb64(digest_b64)
        except ValueError:
            raise Rejection("malformed_body", f"contributor {worker[:64]}: not base64", h) from None
        try:
            signed = verify_proof(federation, raw_proof, job=job, run=run, round_=h.round if same_round else None,
                                  worker=worker, region=body.region)
        except Rejection as rej:
            raise Rejection(rej.reason, rej.detail, h) from None
        if signed.digest != digest:
            raise Rejection("digest_mismatch", f"partial lists {digest.hex()[:16]} for {worker}, its signed update has "
                                               f"{signed.digest.hex()[:16]}", h)
        contributors.append((worker, digest, float(weight)))
        tickets.append(signed.round)
    meta = {"format": WIRE_FORMAT, "rule": body.rule, "base_version": body.base_version,
            "total_weight": body.total_weight, "count": n,
            "contributors": [[w, float(x), int(v)] for w, x, v in zip(body.workers, body.weights, body.base_versions)],
            "scalars": dict(body.scalars), "groups": list(body.groups)}
    try:
        partial = PartialAggregate.from_message(widened_partial(got.tensors or {}), meta)
    except InvalidUpdate as exc:
        raise Rejection("invalid_update", str(exc), h) from None
    return partial, tuple(contributors), tuple(tickets)


__all__ = ["verified_partial", "Contributors"]
