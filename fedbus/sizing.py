"""Settings that follow the model's size, and the check that a model fits the job's limits.

A model's bodies (round.open from the coordinator, each worker's update) are about its
encoded size. Three things depend on it (docs/data-path.md):

* ``security.max_message_bytes`` bounds every body: a model whose body would exceed it
  is refused when a participant starts (``model_fits``), with the limit to raise,
  instead of being published and then refused by every receiver;
* the round deadline: ``round_deadline_s`` left at its default grows with the model
  (``scaled_round_deadline_s``), since moving a 1 GB model and its updates takes longer
  than the 30 s default on a small machine;
* reading a claim-check blob times out after ``blob_read_timeout_s(size)``: a fixed
  floor plus the time the object takes at a slow rate (``fedbus.bus.blobs``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedbus.jobspec import GIB, JobSpec
from fedbus.protocol.codec import tensor_pieces
from fedbus.protocol.messages import RoundOpen, Update, body_limit, pieces_length

# Room for a body's fields, strategy scalars and sealing overhead beyond the tensors.
BODY_MARGIN = 256 * 1024
DEFAULT_ROUND_DEADLINE_S = 30.0
# The rate a round is planned at when its deadline follows the model: one round moves the
# model to every worker and every update back; 8 MB/s of model size covers a loaded 2-core
# machine with 4 workers (benchmarks/big_payload.py measured ~12 s per 200 MB round).
DEADLINE_MODEL_RATE = 8 * 10**6


def model_body_bytes(state: Mapping[str, torch.Tensor], *, extras: int = 1) -> int:
    """An upper estimate of a body carrying the model ``extras`` times over (strategies
    such as SCAFFOLD send a control variate of the model's shape too)."""
    return extras * pieces_length(tensor_pieces(state)) + BODY_MARGIN


def model_fits(job: JobSpec, state: Mapping[str, torch.Tensor]) -> str | None:
    """None when the model's round.open and update bodies fit ``security.max_message_bytes``;
    otherwise a message naming the limit to raise (or saying it cannot be raised enough)."""
    needed = model_body_bytes(state)
    limit = min(body_limit(RoundOpen, job.security.max_message_bytes),
                body_limit(Update, job.security.max_message_bytes))
    if needed <= limit:
        return None
    if needed > GIB:
        return (f"the model's bodies need about {needed} bytes, over the largest security.max_message_bytes "
                f"fedbus allows ({GIB} bytes): the model is too large for one message")
    return (f"the model's bodies need about {needed} bytes, over security.max_message_bytes ({limit} bytes): "
            f"raise security.max_message_bytes in the job spec to at least {needed}")


def scaled_round_deadline_s(job: JobSpec, state: Mapping[str, torch.Tensor]) -> float:
    """``round_deadline_s`` as set in the job spec, or when it is the default (30 s: a spec
    written out with its defaults cannot tell an explicit 30 from none), the default plus
    the time the model takes at DEADLINE_MODEL_RATE when that is a second or more. Any
    other value is kept as it is."""
    if job.round_deadline_s != DEFAULT_ROUND_DEADLINE_S:
        return job.round_deadline_s
    extra = pieces_length(tensor_pieces(state)) / DEADLINE_MODEL_RATE
    # (under a second more: a small model's rounds keep exactly the default)
    return DEFAULT_ROUND_DEADLINE_S + extra if extra >= 1.0 else DEFAULT_ROUND_DEADLINE_S
