"""The contract every asynchronous backend meets, through telstate.aio.TelescopeState.

The asynchronous twin of :mod:`tests.test_contract`, in the same order;
written once, it runs against every backend in :data:`AIO_BACKENDS`. Waits
are bounded with asyncio's own tools, as users of the aio frontend do.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import pickle
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import fakeredis
import fakeredis.aioredis
import numpy as np
import pytest

import telstate
from telstate import (
    DecodeError,
    ImmutableKeyError,
    InvalidTimestampError,
    KeyType,
)
from telstate.aio import TelescopeState
from telstate.aio.backend import Backend
from telstate.aio.memory import MemoryBackend
from telstate.aio.redis import RedisBackend
from telstate.encoding import encode_value


async def _memory(request: pytest.FixtureRequest) -> Backend:
    return MemoryBackend()


async def _redis(request: pytest.FixtureRequest) -> Backend:
    server = request.getfixturevalue("redis_server")
    request.getfixturevalue("redis_client")  # flushes every database
    return await RedisBackend.from_url(server.url)


async def _fakeredis(request: pytest.FixtureRequest) -> Backend:
    return RedisBackend(fakeredis.aioredis.FakeRedis(server=fakeredis.FakeServer()))


async def _lmdb(request: pytest.FixtureRequest) -> Backend:
    from telstate.aio.lmdb import LmdbBackend

    directory = request.getfixturevalue("tmp_path")
    return LmdbBackend(directory / "store", durability="none")


#: Every asynchronous backend, by name: a coroutine that makes a fresh, empty one.
AIO_BACKENDS: dict[str, Callable[[pytest.FixtureRequest], Awaitable[Backend]]] = {
    "memory": _memory,
    "redis": _redis,
    "fakeredis": _fakeredis,
}

try:  # The LMDB backend joins once it exists.
    import telstate.lmdb  # noqa: F401

    AIO_BACKENDS["lmdb"] = _lmdb
except ImportError:
    pass


@contextlib.asynccontextmanager
async def open_backend(request: pytest.FixtureRequest, name: str) -> AsyncIterator[Backend]:
    """A fresh backend from :data:`AIO_BACKENDS`, closed at the end."""
    backend = await AIO_BACKENDS[name](request)
    try:
        yield backend
    finally:
        backend.close()
        await backend.wait_closed()


@pytest.fixture(params=sorted(AIO_BACKENDS))
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    async with open_backend(request, request.param) as backend:
        yield backend


@pytest.fixture
def ts(backend: Backend) -> TelescopeState:
    return TelescopeState(backend)


def later(delay: float, write: Callable[[], Awaitable[object]]) -> asyncio.Task:
    """Run `write` after `delay` seconds, in a task of its own."""

    async def run() -> None:
        await asyncio.sleep(delay)
        await write()

    return asyncio.create_task(run())


async def test_construction(ts):
    assert isinstance(TelescopeState().backend, MemoryBackend)
    with pytest.raises(ValueError):
        TelescopeState(ts.backend, base=ts)
    with pytest.raises(TypeError, match="synchronous"):
        TelescopeState(telstate.memory.MemoryBackend())  # type: ignore[arg-type]


async def test_immutable_item_access_and_set(ts):
    await ts.add("rate", 3.5, immutable=True)
    await ts.set("name", "m063")
    await ts.set("array", np.arange(5))
    assert await ts["rate"] == 3.5
    assert await ts["name"] == "m063"
    np.testing.assert_array_equal(await ts.get("array"), np.arange(5))
    assert await ts.key_type("rate") == KeyType.IMMUTABLE
    assert await ts.exists("rate") and await ts.exists(b"rate")
    assert not await ts.exists("nope")


async def test_immutable_same_value_allowed_different_refused(ts):
    await ts.add("a", [1, 2], immutable=True)
    await ts.add("a", [1, 2], immutable=True)
    await ts.add("s", "hello", immutable=True)
    await ts.add("s", b"hello", immutable=True)  # equal_encoded_values treats them as equal
    with pytest.raises(ImmutableKeyError, match="'a'"):
        await ts.add("a", [1, 3], immutable=True)
    assert await ts["a"] == [1, 2]


async def test_type_change_is_refused_and_names_the_key(ts):
    await ts.add("m", 1.0, ts=1.0)
    await ts.add("i", 1, immutable=True)
    await ts.set_indexed("x", "k", 1)
    with pytest.raises(ImmutableKeyError, match="'m'"):
        await ts.add("m", 1, immutable=True)
    with pytest.raises(ImmutableKeyError, match="'i'"):
        await ts.add("i", 2.0)
    with pytest.raises(ImmutableKeyError, match="'x'"):
        await ts.add("x", 2.0)
    with pytest.raises(ImmutableKeyError, match="'m'"):
        await ts.set_indexed("m", "k", 1)
    assert await ts.get_range("m", st=0) == [(1.0, 1.0)]


async def test_mutable_latest_order_and_default_timestamp(ts):
    for value, stamp in [("b", 2.0), ("a", 1.0), ("c", 3.0)]:
        await ts.add("s", value, ts=stamp)
    assert await ts["s"] == "c"
    assert await ts.get_range("s", st=0) == [("a", 1.0), ("b", 2.0), ("c", 3.0)]
    assert await ts.key_type("s") == KeyType.MUTABLE
    before = time.time()
    await ts.add("now", 1)
    ((_, stamp),) = await ts.get_range("now")
    assert before <= stamp <= time.time()


async def test_mutable_equal_timestamps_and_zeros(ts):
    values = [3, 1, 2, 1, 3]
    for value in values:
        await ts.add("eq", value, ts=5.0)
    stored = await ts.get_range("eq", st=0, return_encoded=True)
    assert stored == [(v, 5.0) for v in sorted({encode_value(v) for v in values})]
    await ts.add("z", 1, ts=-0.0)
    await ts.add("z", 2, ts=0.0)
    assert await ts.get_range("z", st=0) == [(1, 0.0), (2, 0.0)]


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf, -math.inf])
async def test_invalid_timestamps(ts, bad):
    with pytest.raises(InvalidTimestampError):
        await ts.add("t", 1, ts=bad)
    assert not await ts.exists("t")


# (get_range arguments, timestamps returned) for samples at 1, 2, 3 and 4.
RANGES = [
    ({}, [4.0]),
    ({"st": 0}, [1.0, 2.0, 3.0, 4.0]),
    ({"st": 2.5}, [3.0, 4.0]),
    ({"st": 2.5, "include_previous": True}, [2.0, 3.0, 4.0]),
    ({"st": 2, "et": 4}, [2.0, 3.0]),
    ({"st": 2, "et": 4, "include_end": True}, [2.0, 3.0, 4.0]),
    ({"st": 2, "et": 4, "include_previous": True, "include_end": True}, [1.0, 2.0, 3.0, 4.0]),
    ({"et": 3}, [2.0]),
    ({"et": 3, "include_end": True}, [2.0, 3.0]),
    ({"et": 0.5}, []),
    ({"st": 5, "include_previous": True}, [4.0]),
    ({"st": 0, "et": 0, "include_end": True}, []),
    ({"st": 1, "et": 1, "include_end": True}, [1.0]),
    ({"st": -5}, [1.0, 2.0, 3.0, 4.0]),
    ({"st": math.inf, "include_previous": True}, [4.0]),
    ({"st": 3, "et": 2}, []),
]


async def test_get_range_flag_combinations(ts):
    for t in [1.0, 2.0, 3.0, 4.0]:
        await ts.add("r", t * 10, ts=t)
    for kwargs, stamps in RANGES:
        assert [stamp for _, stamp in await ts.get_range("r", **kwargs)] == stamps, kwargs
    assert await ts.get_range("r", st=4, return_encoded=True) == [(encode_value(40.0), 4.0)]
    await ts.add("z", "x", ts=0.0)
    assert await ts.get_range("z", et=0, include_end=True) == [("x", 0.0)]


async def test_get_range_errors(ts):
    with pytest.raises(KeyError):
        await ts.get_range("missing")
    await ts.add("i", 1, immutable=True)
    with pytest.raises(ImmutableKeyError, match="'i'"):
        await ts.get_range("i")
    await ts.add("m", 1, ts=1)
    with pytest.raises(InvalidTimestampError):
        await ts.get_range("m", st=math.nan)


async def test_indexed(ts):
    await ts.set_indexed("idx", "a", 1)
    await ts.set_indexed("idx", ("tuple", 2), [2])
    await ts.set_indexed("idx", "a", 1)  # same value: fine
    with pytest.raises(ImmutableKeyError, match="'idx'"):
        await ts.set_indexed("idx", "a", 2)
    with pytest.raises(TypeError):
        await ts.set_indexed("idx", ["unhashable"], 1)
    assert await ts.get_indexed("idx", "a") == 1
    assert await ts.get_indexed("idx", ("tuple", 2)) == [2]
    assert await ts.get_indexed("idx", "missing", default=5) == 5
    assert await ts.get_indexed("nokey", "a", default=6) == 6
    assert await ts.get_indexed("idx", "a", return_encoded=True) == encode_value(1)
    assert await ts.get("idx") == {"a": 1, ("tuple", 2): [2]}
    assert await ts.key_type("idx") == KeyType.INDEXED
    await ts.add("m", 1.0, ts=1.0)
    with pytest.raises(ImmutableKeyError):
        await ts.get_indexed("m", "a")


async def test_get_missing_and_encoded(ts):
    assert await ts.get("missing") is None
    assert await ts.get("missing", 42) == 42
    with pytest.raises(KeyError):
        await ts["missing"]
    assert await ts.key_type("missing") is None
    await ts.add("a", {"x": 1}, immutable=True)
    assert await ts.get("a", return_encoded=True) == encode_value({"x": 1})
    key = b"bin\xff\x00key"
    await ts.add(key, b"\x00\xff", immutable=True)
    assert await ts.get(key) == b"\x00\xff"
    assert key.decode("utf-8", "surrogateescape") in await ts.keys()


async def test_views_and_shadowing(ts):
    await ts.add("top", 1, immutable=True)
    cb = ts.view("cb1")
    assert cb.prefixes == ("cb1_", "")
    await cb.add("dump_rate", 2.0, immutable=True)
    assert await ts["cb1_dump_rate"] == 2.0
    assert await cb["top"] == 1  # falls through to the root namespace
    assert await cb.view("stream", exclusive=True).get("top") is None
    assert cb.root().prefixes == ("",)
    assert cb.backend is ts.backend
    await ts.add("cb1_top", 2, immutable=True)
    assert await cb["top"] == 2
    await ts.add("s", 1, ts=1.0)
    await ts.add("cb1_s", 2, ts=1.0)
    assert await cb.get_range("s") == [(2, 1.0)]
    assert await cb.key_type("dump_rate") == KeyType.IMMUTABLE


async def test_keys_delete_clear(ts):
    for key in ["a", "ab", "cb1_x", "cb2_x", "q?"]:
        await ts.add(key, 1, immutable=True)
    assert await ts.keys() == ["a", "ab", "cb1_x", "cb2_x", "q?"]
    assert await ts.keys("cb[12]_x") == ["cb1_x", "cb2_x"]
    assert await ts.keys("q\\?") == ["q?"]
    await ts.view("cb1").delete("x")
    await ts.delete("never-existed")
    assert await ts.keys("cb*") == ["cb2_x"]
    await ts.view("cb").clear()
    assert await ts.keys() == []
    await ts.add("a", 2.0)  # a deleted key can come back with another type
    assert await ts.key_type("a") == KeyType.MUTABLE


async def test_pickles_refused_by_default(ts):
    await ts.backend.set_immutable(b"p", pickle.dumps(1, protocol=2))
    with pytest.raises(DecodeError):
        await ts.get("p")
    assert (await ts.get("p", return_encoded=True)).startswith(b"\x80")


async def test_dump(ts):
    await ts.add("i", 1, immutable=True)
    assert await ts.backend.dump(b"i") is not None
    assert await ts.backend.dump(b"missing") is None


async def test_load_from_file(ts, tmp_path):
    from telstate.rdb_writer import RDBWriter

    source = telstate.TelescopeState()
    source.add("attr", {"a": [1, 2]}, immutable=True)
    for i in range(2500):  # more than one batch of records
        source.add(f"sensor{i % 3}", float(i), ts=float(i))
        source.set_indexed("indexed", i, str(i))
    filename = tmp_path / "dump.rdb"
    with RDBWriter(filename) as writer:
        writer.save(source)
    assert await ts.load_from_file(filename) == 5
    assert await ts["attr"] == {"a": [1, 2]}
    assert len(await ts.get_range("sensor1", st=0)) == 833
    assert await ts.get_indexed("indexed", 2499) == "2499"
    with open(filename, "rb") as file:  # a file object works too
        assert await TelescopeState().load_from_file(file) == 5


# --- waiting -------------------------------------------------------------------------


async def test_wait_key_already_present(ts):
    await ts.add("k", 1, immutable=True)
    await ts.set_indexed("idx", "a", 5)
    await ts.add("m", 2, ts=7.0)
    await asyncio.wait_for(ts.wait_key("k", lambda value, stamp: value == 1 and stamp is None), 1)
    await asyncio.wait_for(ts.wait_key("idx", lambda value, stamp: value == {"a": 5}), 1)
    await asyncio.wait_for(ts.wait_key("m", lambda value, stamp: stamp == 7.0), 1)


@pytest.mark.parametrize(
    "write, value, stamp",
    [
        (lambda ts: ts.add("k", 5, ts=3.0), 5, 3.0),
        (lambda ts: ts.set("k", 5), 5, None),
        (lambda ts: ts.set_indexed("k", "i", 5), {"i": 5}, None),
    ],
    ids=["mutable", "immutable", "indexed"],
)
async def test_wait_key_wakes_on_write(ts, write, value, stamp):
    writer = later(0.05, lambda: write(ts))
    start = time.monotonic()
    await asyncio.wait_for(ts.wait_key("k", lambda v, t: v == value and t == stamp), 5)
    assert time.monotonic() - start < 2
    await writer


async def test_wait_key_in_view_wakes_on_either_namespace(ts):
    writer = later(0.05, lambda: ts.add("k", 1, immutable=True))
    await asyncio.wait_for(ts.view("cb").wait_key("k"), 5)
    await writer


async def test_wait_key_ignores_a_shadowed_write(ts):
    view = ts.view("ns").view("ns2")
    await ts.add("ns_k", False, immutable=True)  # visible to the view, but not True
    writer = later(0.05, lambda: ts.add("k", True, immutable=True))  # shadowed
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(view.wait_key("k", lambda value, stamp: value is True), 0.3)
    await writer
    writer = later(0.05, lambda: view.add("k", True, immutable=True))
    await asyncio.wait_for(view.wait_key("k", lambda value, stamp: value is True), 5)
    await writer


async def test_wait_key_condition_on_sequence(ts):
    async def write_all() -> None:
        for i in range(5):
            await ts.add("seq", i, ts=float(i))
            await asyncio.sleep(0.01)

    writer = later(0.01, write_all)
    await asyncio.wait_for(ts.wait_key("seq", lambda value, stamp: value == 4), 5)
    await writer


async def test_wait_key_timeout_and_cancel(ts):
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(ts.wait_key("k"), 0.1)
    await ts.add("k", 1, ts=1.0)
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(ts.wait_key("k", lambda value, stamp: value == 2), 0.1)
    task = asyncio.create_task(ts.wait_key("other"))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_concurrent_waits(ts):
    waits = [asyncio.create_task(ts.wait_key(key)) for key in ["a", "b", "a"]]
    await asyncio.sleep(0.05)
    assert not any(wait.done() for wait in waits)
    await ts.add("a", 1, immutable=True)
    await asyncio.wait_for(asyncio.gather(waits[0], waits[2]), 5)
    assert not waits[1].done()
    await ts.add("b", 2)
    await asyncio.wait_for(waits[1], 5)


async def test_wait_indexed(ts):
    await ts.set_indexed("idx", "a", 1)
    await asyncio.wait_for(ts.wait_indexed("idx", "a", lambda value: value == 1), 1)
    writer = later(0.05, lambda: ts.set_indexed("idx", "b", 2))
    await asyncio.wait_for(ts.wait_indexed("idx", "b", lambda value: value == 2), 5)
    await writer
    writer = later(0.05, lambda: ts.set_indexed("new", "c", 3))
    await asyncio.wait_for(ts.wait_indexed("new", "c"), 5)
    await writer


async def test_wait_indexed_timeout_shadow_and_cancel(ts):
    await ts.set_indexed("idx", "a", 1)
    for args in [("idx", "b"), ("idx", "a", lambda value: value == 2), ("absent", "a")]:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(ts.wait_indexed(*args), 0.1)
    await ts.set_indexed("ns_idx", "other", 1)  # shadows idx for the view
    writer = later(0.05, lambda: ts.set_indexed("idx", "b", 1))
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(ts.view("ns").wait_indexed("idx", "b"), 0.3)
    await writer
    task = asyncio.create_task(ts.wait_indexed("idx", "c"))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_wait_indexed_on_wrong_type(ts):
    writer = later(0.05, lambda: ts.add("later", 1, immutable=True))
    with pytest.raises(ImmutableKeyError):
        await asyncio.wait_for(ts.wait_indexed("later", "a"), 5)
    await writer
    with pytest.raises(ImmutableKeyError):
        await asyncio.wait_for(ts.wait_indexed("later", "a"), 5)


async def test_close_ends_waits(backend):
    ts = TelescopeState(backend)
    task = asyncio.create_task(ts.wait_key("k"))
    await asyncio.sleep(0.05)
    backend.close()
    await backend.wait_closed()
    if isinstance(backend, MemoryBackend):
        # Nothing to close: writes can still come, so the wait goes on.
        await ts.add("k", 1)
        await asyncio.wait_for(task, 5)
    else:
        with pytest.raises(telstate.CancelledError):
            await asyncio.wait_for(task, 5)


# --- backend-specific -------------------------------------------------------------------


async def test_redis_from_url_fails_fast_when_unreachable(tmp_path):
    start = time.monotonic()
    with pytest.raises(telstate.ConnectionError, match="could not connect"):
        await RedisBackend.from_url(f"unix://{tmp_path}/no-server.sock")
    assert time.monotonic() - start < 2
