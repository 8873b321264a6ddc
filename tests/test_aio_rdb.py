"""RDB files and the asynchronous side: telstate.aio.rdb_writer.RDBWriter and load_from_file."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator

import katsdptelstate
import pytest
import redis.asyncio

import telstate
from telstate.aio import TelescopeState
from telstate.aio.backend import Backend
from telstate.aio.rdb_writer import RDBWriter

from .test_aio_contract import AIO_BACKENDS, open_backend


@pytest.fixture(params=sorted(AIO_BACKENDS))
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    async with open_backend(request, request.param) as backend:
        yield backend


async def _fill(ts: TelescopeState) -> None:
    await ts.add("attr", {"a": [1, 2]}, immutable=True)
    for i in range(5):
        await ts.add("sensor", float(i), ts=100.0 + i)
        await ts.set_indexed("indexed", i, str(i))
    await ts.view("cb1").add("rate", 8.0, immutable=True)


def _check(state) -> None:
    """Check a sync telstate or katsdptelstate that loaded what _fill wrote."""
    assert state.keys() == ["attr", "cb1_rate", "indexed", "sensor"]
    assert state["attr"] == {"a": [1, 2]}
    assert state.get_range("sensor", st=0) == [(float(i), 100.0 + i) for i in range(5)]
    assert state.get("indexed") == {i: str(i) for i in range(5)}
    assert state["cb1_rate"] == 8.0


async def test_save_loads_into_telstate_and_katsdptelstate(backend, tmp_path):
    ts = TelescopeState(backend)
    await _fill(ts)
    filename = tmp_path / "dump.rdb"
    if "Fake" in type(getattr(backend, "client", None)).__name__:
        # fakeredis's DUMP payloads are pickles of its own objects, not Redis's
        # format: every key is counted as failed (and logged), nothing is written.
        with RDBWriter(filename) as writer:
            await writer.save(ts)
        assert (writer.keys_written, writer.keys_failed) == (0, 4)
        assert not filename.exists()
        return
    with RDBWriter(filename) as writer:
        await writer.save(ts.view("cb1"))  # a view still saves the whole backend
    assert (writer.keys_written, writer.keys_failed) == (4, 0)
    ours = telstate.TelescopeState()
    assert ours.load_from_file(filename) == 4
    _check(ours)
    theirs = katsdptelstate.TelescopeState()
    theirs.load_from_file(filename)
    _check(theirs)
    again = TelescopeState()
    assert await again.load_from_file(filename) == 4
    assert await again.get_range("sensor", st=0) == [(float(i), 100.0 + i) for i in range(5)]


async def test_save_chosen_keys_from_backend_and_client(redis_server, redis_client, tmp_path):
    ts = TelescopeState(await telstate.aio.redis.RedisBackend.from_url(redis_server.url))
    await _fill(ts)
    with RDBWriter(tmp_path / "backend.rdb") as writer:
        await writer.save(ts.backend, ["attr", b"sensor", "missing"])
    assert (writer.keys_written, writer.keys_failed) == (2, 1)
    client = redis.asyncio.Redis(unix_socket_path=redis_server.socket)
    with RDBWriter(tmp_path / "client.rdb") as writer:
        await writer.save(client)
    assert writer.keys_written == 4
    await client.aclose()
    ts.backend.close()
    await ts.backend.wait_closed()
    loaded = telstate.TelescopeState()
    loaded.load_from_file(tmp_path / "client.rdb")
    _check(loaded)
    with pytest.raises(ValueError, match="closed"):
        await writer.save(TelescopeState())


async def test_load_a_katsdptelstate_file(backend, tmp_path):
    from katsdptelstate.rdb_writer import RDBWriter as TheirWriter

    theirs = katsdptelstate.TelescopeState()
    theirs.add("attr", {"a": [1, 2]}, immutable=True)
    for i in range(5):
        theirs.add("sensor", float(i), ts=100.0 + i)
        theirs.set_indexed("indexed", i, str(i))
    theirs.add("cb1_rate", 8.0, immutable=True)
    filename = tmp_path / "theirs.rdb"
    with TheirWriter(filename) as writer:
        writer.save(theirs)
    ts = TelescopeState(backend)
    assert await ts.load_from_file(str(filename)) == 4
    assert await ts.keys() == ["attr", "cb1_rate", "indexed", "sensor"]
    assert await ts.get_indexed("indexed", 3) == "3"


async def test_load_from_file_errors(tmp_path):
    bad = tmp_path / "bad.rdb"
    bad.write_bytes(b"not an rdb file")
    with pytest.raises(telstate.RdbParseError):
        await TelescopeState().load_from_file(bad)
    with pytest.raises(OSError):
        await TelescopeState().load_from_file(tmp_path / "missing.rdb")


async def test_cancelled_load_leaves_no_thread(tmp_path):
    source = telstate.TelescopeState()
    for i in range(30000):
        source.add(f"key{i}", i, immutable=True)
    filename = tmp_path / "big.rdb"
    with telstate.rdb_writer.RDBWriter(filename) as writer:
        writer.save(source)
    ts = TelescopeState()
    load = asyncio.create_task(ts.load_from_file(filename))
    while not await ts.keys("key1*"):
        await asyncio.sleep(0)
    load.cancel()
    with pytest.raises(asyncio.CancelledError):
        await load
    assert 0 < len(await ts.keys()) < 30000
    deadline = time.monotonic() + 5
    while any(t.name.startswith("telstate-rdb-load") for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the reading thread did not end"
        await asyncio.sleep(0.01)
