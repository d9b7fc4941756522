"""One SecAgg+ round with every party in this process (tests, benchmarks, ``fedbus sim``).

The driver plays the bus: it hands each machine's output to the machines it is for,
leaves out the workers that drop at each phase, and counts each message's encoded
body bytes (``encode_body``, as a service would sign it; envelope headers excluded).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from fedbus.protocol.messages import Body, encode_body
from fedbus.protocol.secagg import SecAggInput

from fedbus.secagg.client import SecAggClient
from fedbus.secagg.errors import SecAggRejection
from fedbus.secagg.server import SecAggResult, SecAggServer
from fedbus.secagg.spec import RoundParams


@dataclass(frozen=True)
class Dropouts:
    """Who goes silent before each phase (a worker dropped once stays dropped)."""

    before_advertise: frozenset[str] = frozenset()
    before_shares: frozenset[str] = frozenset()
    before_input: frozenset[str] = frozenset()
    before_unmask: frozenset[str] = frozenset()  # sent its masked input, then died


@dataclass
class RoundLog:
    """What a round cost and which messages were refused (the service would count them)."""

    up: int = 0  # bytes workers sent to the server
    down: int = 0  # bytes the server sent (a broadcast counted once per recipient)
    messages: int = 0
    by_phase: dict[str, int] = field(default_factory=dict)
    rejections: list[SecAggRejection] = field(default_factory=list)
    client_seconds: dict[str, float] = field(default_factory=dict)  # per worker, over the round
    server_seconds: float = 0.0

    def add(self, phase: str, nbytes: int, up: bool) -> None:
        if up:
            self.up += nbytes
        else:
            self.down += nbytes
        self.messages += 1
        self.by_phase[phase] = self.by_phase.get(phase, 0) + nbytes


def wire_size(msg: Body) -> int:
    return len(encode_body(msg))


def input_message(params: RoundParams, masked: np.ndarray) -> tuple[SecAggInput, dict[str, torch.Tensor]]:
    """The secagg.input body and tensor for a worker's masked residues."""
    return SecAggInput(round=params.round, group=params.group), {SecAggInput.TENSOR: torch.from_numpy(masked)}


def run_round(params: RoundParams, quantized: Mapping[str, np.ndarray], dropouts: Dropouts = Dropouts(),
              random_bytes: Callable[[int], bytes] = os.urandom,
              log: RoundLog | None = None, make_client: Callable[..., SecAggClient] = SecAggClient,
              clock: Callable[[], float] = time.perf_counter) -> SecAggResult:
    """Run the four phases. A refused message is logged and the round goes on, as a service
    would; SecAggFailed and SecAggAbort propagate."""
    log = log if log is not None else RoundLog()

    def on_client(w, call, *args):
        start = clock()
        try:
            return call(*args)
        finally:
            log.client_seconds[w] = log.client_seconds.get(w, 0.0) + clock() - start

    def on_server(call, *args):
        start = clock()
        try:
            return call(*args)
        finally:
            log.server_seconds += clock() - start

    server = on_server(SecAggServer, params)
    clients = {w: on_client(w, make_client, w, params, random_bytes) for w in params.roster}

    def deliver(handler, sender, msg):
        try:
            log.rejections.extend(on_server(handler, sender, msg) or ())
        except SecAggRejection as r:
            log.rejections.append(r)

    gone: set[str] = set()

    def alive(before: frozenset[str], among) -> list[str]:
        gone.update(before)
        return [w for w in sorted(among) if w not in gone]

    for w in alive(dropouts.before_advertise, clients):
        msg = on_client(w, clients[w].advertise)
        log.add("advertise", wire_size(msg), True)
        deliver(server.on_advertise, w, msg)
    directory = on_server(server.close_advertise)
    for w in alive(dropouts.before_shares, server.u1):
        log.add("advertise", wire_size(directory), False)
        msg = on_client(w, clients[w].on_keys, directory)
        log.add("share", wire_size(msg), True)
        deliver(server.on_share_keys, w, msg)
    bundles = on_server(server.close_share_keys)
    for w in alive(dropouts.before_input, bundles):
        log.add("share", wire_size(bundles[w]), False)
        log.rejections.extend(on_client(w, clients[w].on_shares, bundles[w]))
        y = on_client(w, clients[w].masked_input, quantized[w])
        log.add("input", len(encode_body(*input_message(params, y))), True)
        deliver(server.on_masked_input, w, y)
    request = on_server(server.close_masked_input)
    for w in alive(dropouts.before_unmask, request.survivors):
        log.add("unmask", wire_size(request), False)
        msg = on_client(w, clients[w].on_unmask, request)
        log.add("unmask", wire_size(msg), True)
        deliver(server.on_unmask, w, msg)
    result = on_server(server.finish)
    log.rejections.extend(result.flagged)
    return result
