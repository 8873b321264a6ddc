"""Every backend the contract suite runs against, by name.

A factory takes the pytest ``request`` and returns a fresh, empty backend.
To add a backend to the contract suite and the state machine, add it to
``BACKENDS``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable

import fakeredis
import pytest

from telstate.backend import Backend
from telstate.memory import MemoryBackend
from telstate.redis import RedisBackend


def _memory(request: pytest.FixtureRequest) -> Backend:
    return MemoryBackend()


def _redis(request: pytest.FixtureRequest) -> Backend:
    server = request.getfixturevalue("redis_server")
    client = server.client()
    client.flushall()
    request.addfinalizer(client.close)
    return RedisBackend(client)


def _fakeredis(request: pytest.FixtureRequest) -> Backend:
    return RedisBackend(fakeredis.FakeRedis())


def _lmdb(request: pytest.FixtureRequest) -> Backend:
    from telstate.lmdb import LmdbBackend

    directory = tempfile.TemporaryDirectory(prefix="telstate-lmdb-")
    backend = LmdbBackend(directory.name, durability="none")

    def cleanup() -> None:
        backend.close()
        directory.cleanup()

    request.addfinalizer(cleanup)
    return backend


BACKENDS: dict[str, Callable[[pytest.FixtureRequest], Backend]] = {
    "memory": _memory,
    "redis": _redis,
    "fakeredis": _fakeredis,
}

try:  # The LMDB backend joins once it exists.
    import telstate.lmdb  # noqa: F401

    BACKENDS["lmdb"] = _lmdb
except ImportError:
    pass
