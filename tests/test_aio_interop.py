"""telstate.aio and katsdptelstate.aio on one real Redis: each reads the other's
writes and wakes the other's waits."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import katsdptelstate.aio
import katsdptelstate.aio.redis
import numpy as np
import pytest
import redis.asyncio

import telstate.aio
from telstate.aio.redis import RedisBackend

pytestmark = pytest.mark.filterwarnings(
    "ignore:Call to deprecated close:DeprecationWarning"  # katsdptelstate's own call
)

Pair = tuple[telstate.aio.TelescopeState, katsdptelstate.aio.TelescopeState]


@pytest.fixture
async def pair(redis_server, redis_client) -> AsyncIterator[Pair]:
    """(telstate.aio, katsdptelstate.aio) telescope states on the same database."""
    ours = telstate.aio.TelescopeState(await RedisBackend.from_url(redis_server.url))
    client = redis.asyncio.Redis(unix_socket_path=redis_server.socket)
    theirs = katsdptelstate.aio.TelescopeState(katsdptelstate.aio.redis.RedisBackend(client))
    yield ours, theirs
    for state in (ours, theirs):
        state.backend.close()
        await state.backend.wait_closed()


async def _fill(state) -> None:
    await state.add("attr", {"a": (1, 2.5j)}, immutable=True)
    await state.add("sensor", np.arange(3), ts=1000.0)
    await state.add("sensor", "later", ts=1001.0)
    await state.set_indexed("indexed", ("sub", 1), [1, 2])
    await state.view("cb1").add("rate", 8.0, immutable=True)


@pytest.mark.parametrize("writer", ["ours", "theirs"])
async def test_each_reads_what_the_other_writes(pair, writer):
    ours, theirs = pair
    source, reader = (ours, theirs) if writer == "ours" else (theirs, ours)
    await _fill(source)
    assert await reader.keys() == ["attr", "cb1_rate", "indexed", "sensor"]
    assert await reader["attr"] == {"a": (1, 2.5j)}
    ((first, stamp), second) = await reader.get_range("sensor", st=0)
    np.testing.assert_array_equal(first, np.arange(3))
    assert stamp == 1000.0 and second == ("later", 1001.0)
    assert await reader.get_indexed("indexed", ("sub", 1)) == [1, 2]
    assert await reader.view("cb1").get("rate") == 8.0
    assert (await reader.key_type("sensor")).name == "MUTABLE"  # two KeyType enums
    # Immutables compare equal across the two encoders.
    await reader.add("attr", {"a": (1, 2.5j)}, immutable=True)


WRITES = {
    "immutable": (lambda state: state.add("k", 5, immutable=True), 5, None),
    "mutable": (lambda state: state.add("k", 5, ts=3.0), 5, 3.0),
    "indexed": (lambda state: state.set_indexed("k", "i", 5), {"i": 5}, None),
}


@pytest.mark.parametrize("kind", sorted(WRITES))
@pytest.mark.parametrize("waiter", ["ours", "theirs"])
async def test_each_wakes_the_others_wait_key(pair, waiter, kind):
    ours, theirs = pair
    waiting, writing = (ours, theirs) if waiter == "ours" else (theirs, ours)
    write, value, stamp = WRITES[kind]
    wait = asyncio.create_task(waiting.wait_key("k", lambda v, t: v == value and t == stamp))
    await asyncio.sleep(0.1)
    assert not wait.done()
    await write(writing)
    await asyncio.wait_for(wait, 5)


@pytest.mark.parametrize("waiter", ["ours", "theirs"])
async def test_each_wakes_the_others_wait_indexed(pair, waiter):
    ours, theirs = pair
    waiting, writing = (ours, theirs) if waiter == "ours" else (theirs, ours)
    await writing.set_indexed("idx", "a", 1)
    wait = asyncio.create_task(waiting.wait_indexed("idx", "b", lambda value: value == 2))
    await asyncio.sleep(0.1)
    assert not wait.done()
    await writing.set_indexed("idx", "b", 2)
    await asyncio.wait_for(wait, 5)


async def test_many_waits_woken_by_katsdptelstate_writes(pair):
    ours, theirs = pair
    waits = [asyncio.create_task(ours.wait_key(f"key{i}")) for i in range(200)]
    await asyncio.sleep(0.2)
    for i in range(200):  # one at a time: katsdptelstate's pool refuses too many at once
        await theirs.add(f"key{i}", i, immutable=i % 2 == 0)
    await asyncio.wait_for(asyncio.gather(*waits), 10)


async def test_mirror_database_refuses_aio_writes(redis_server, redis_client):
    """As the sync backend does: a replicator's mirror is read-only, found on the first write."""
    from telstate.errors import ReadOnlyError
    from telstate.redis import MIRROR_CURSOR_DB, mirror_cursor_key

    cursor_db = redis_server.client(db=MIRROR_CURSOR_DB)
    cursor_db.hset(mirror_cursor_key(2), mapping={"store": "s", "host": "h", "path": "/p"})
    try:
        mirror = telstate.aio.TelescopeState(await RedisBackend.from_url(redis_server.url, db=2))
        plain = telstate.aio.TelescopeState(await RedisBackend.from_url(redis_server.url, db=3))
        with pytest.raises(ReadOnlyError, match="write to the store instead"):
            await mirror.add("k", 1, immutable=True)
        with pytest.raises(ReadOnlyError):
            await mirror.delete("k")
        assert await mirror.keys() == []  # reads still work, in the mirror's own database
        await plain.add("k", 1, immutable=True)
        assert redis_server.client(db=3).exists("k")
        for state in (mirror, plain):
            state.backend.close()
            await state.backend.wait_closed()
    finally:
        cursor_db.delete(mirror_cursor_key(2))
