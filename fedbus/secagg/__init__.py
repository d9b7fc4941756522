"""Secure aggregation: SecAgg+ (Bell et al. 2020) on the double-masking core of
Bonawitz et al. 2017, as sans-I/O state machines.

The server (the coordinator, or a region's aggregator) learns the sum of the
survivors' quantized updates and nothing else about any single one, as long as it
follows the protocol's lists (semi-honest), even when workers drop out before or
after sending their masked input.

Modules, bottom up:
- ``shamir``    t-of-n sharing over GF(2^521 - 1), verified reconstruction
- ``prg``       BLAKE2b KDF for pairwise seeds, ChaCha20 keystream for masks
- ``graph``     the random k-regular graph from public randomness; k's default
- ``quantize``  fixed point modulo 2^bits, with bits chosen so the sum cannot wrap
- ``spec``      ``SecureAggregationSpec`` (job spec) and ``RoundParams`` (per round: the
                ``secagg.setup`` body; every message is in ``fedbus.protocol.secagg``)
- ``topology``  neighbours, share holders and Shamir points of a round
- ``shares``    the encrypted dealer-to-holder share envelope and its commitments
- ``client``    the worker's machine; ``server`` the aggregator's machine
- ``errors``    the named rejections, aborts and failures
- ``simulate``  a whole round in one process (tests, benchmarks)
- ``service``   the machines over NATS (``fedbus secure-sum``)

Which aggregation rules can run over masked sums: ``fedbus.aggregation.secure``.
"""

from fedbus.secagg.client import SecAggClient
from fedbus.secagg.errors import SecAggAbort, SecAggFailed, SecAggRejection
from fedbus.secagg.server import SecAggResult, SecAggServer
from fedbus.secagg.spec import RoundParams, SecureAggregationSpec

__all__ = ["RoundParams", "SecAggAbort", "SecAggClient", "SecAggFailed", "SecAggRejection", "SecAggResult",
           "SecAggServer", "SecureAggregationSpec"]
