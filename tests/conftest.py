"""Shared fixtures: a real redis-server per test session, flushed for each test."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

from .servers import RedisServer

settings.register_profile(
    "default", deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=100
)
settings.register_profile("ci", parent=settings.get_profile("default"), max_examples=60)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "default")
)


@pytest.fixture(scope="session")
def redis_server():
    """A redis-server process shared by the session, on a private unix socket."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_client(redis_server):
    """A client of the session's server, with every database flushed first."""
    client = redis_server.client()
    client.flushall()
    yield client
    client.close()
