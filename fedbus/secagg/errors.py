"""Named outcomes of the secure-aggregation core (stable: metrics, logs and tests use them).

- ``SecAggRejection``: one message is refused (counted against its sender); the round goes on.
- ``SecAggAbort``: a worker refuses to continue the round (its own safety check failed).
- ``SecAggFailed``: the round cannot produce a correct sum; it ends, and nothing more is revealed.
"""

from __future__ import annotations

REJECTION_REASONS = (
    "unexpected_message",   # not in this phase, or from a worker not expected in it
    "duplicate_message",    # a second message of the same phase from the same worker
    "malformed_keys",       # keys that are not valid X25519 points, or reused
    "malformed_shares",     # not exactly one share per holder of the dealer's neighbourhood
    "wrong_length",         # a masked input not of the round's length or dtype
    "out_of_range",         # a masked residue >= 2^bits
    "malformed_unmask",     # an unmasking answer for the wrong request, dealer or kind
    "bad_share",            # a revealed share that does not open the dealer's commitment
    "inconsistent_shares",  # a dealer's shares do not lie on one polynomial through its secret
)
ABORT_REASONS = (
    "unexpected_message",
    "malformed_setup",       # parameters whose modulus could let the sum wrap
    "malformed_directory",   # my own keys missing or changed, unknown or duplicate workers
    "below_threshold",       # too few live holders / survivors around me to be safe
    "excluded",              # the server left me out of the round
    "inconsistent_request",  # an unmask request naming a worker as both survivor and dropped, or me as dropped
)
FAILURE_REASONS = (
    "below_threshold",      # some secret has fewer than t live holders: nothing is revealed
    "inconsistent_shares",  # a secret that should be rebuilt does not verify from any t shares
    "below_quorum",         # fewer masked inputs than the job's quorum: the sum is not unmasked
)


class _Named(Exception):
    REASONS: tuple[str, ...] = ()

    def __init__(self, reason: str, detail: str = "", worker: str | None = None):
        assert reason in self.REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.worker = worker


class SecAggRejection(_Named):
    REASONS = REJECTION_REASONS


class SecAggAbort(_Named):
    REASONS = ABORT_REASONS


class SecAggFailed(_Named):
    REASONS = FAILURE_REASONS
