"""Many concurrent waits on one asynchronous backend: what they cost and what they leave.

A thousand ``wait_key`` calls must share one subscription (Redis) or one
watcher (memory, LMDB): no thread or connection each, and nothing left
behind (task, thread, connection, subscription) once they end, whether
their keys were written or they were cancelled.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator

import pytest
import redis

import telstate
from telstate.aio import TelescopeState
from telstate.aio.backend import Backend
from telstate.aio.redis import RedisBackend

from .test_aio_contract import AIO_BACKENDS

WAITERS = 1000
MAX_CONNECTIONS = 8


@pytest.fixture(params=sorted(AIO_BACKENDS))
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    if request.param == "redis":
        server = request.getfixturevalue("redis_server")
        request.getfixturevalue("redis_client")  # flushes every database
        backend: Backend = await RedisBackend.from_url(server.url, max_connections=MAX_CONNECTIONS)
    else:
        backend = await AIO_BACKENDS[request.param](request)
    yield backend
    backend.close()
    await backend.wait_closed()


@pytest.fixture
def resources(backend: Backend, request: pytest.FixtureRequest) -> Resources:
    admin = None
    if request.node.callspec.params.get("backend") == "redis":
        admin = request.getfixturevalue("redis_client")
        admin.client_setname("admin")
    return Resources(backend, admin)


def _other_tasks() -> set[asyncio.Task]:
    return asyncio.all_tasks() - {asyncio.current_task()}  # type: ignore[operator]


class Resources:
    """What a backend holds: tasks, threads and, for Redis, subscriptions and connections.

    `admin` is a client of the real Redis server behind the backend, if
    there is one, for CLIENT LIST.
    """

    def __init__(self, backend: Backend, admin: redis.Redis | None) -> None:
        self.backend = backend
        self.admin = admin

    async def channels(self) -> list[bytes]:
        """The ``update/*`` channels somebody is subscribed to (none if not Redis)."""
        if not isinstance(self.backend, RedisBackend):
            return []
        return await self.backend.client.execute_command("PUBSUB", "CHANNELS", "update/*")

    async def subscribers(self, channel: bytes) -> int:
        """Subscriptions to one channel."""
        assert isinstance(self.backend, RedisBackend)
        reply = await self.backend.client.execute_command("PUBSUB", "NUMSUB", channel)
        return int(reply[1])

    async def connections(self) -> list[dict]:
        """The real server's clients other than `admin` (CLIENT LIST); [] if no real server."""
        if self.admin is None:
            return []
        return [client for client in self.admin.client_list() if client["name"] != "admin"]

    async def subscribed(self, channels: int, timeout: float = 10.0) -> None:
        """Wait until the waits just started have subscribed to `channels` channels.

        Elsewhere, give the waits a moment to start.
        """
        if not isinstance(self.backend, RedisBackend):
            await asyncio.sleep(0.2)
            return
        deadline = time.monotonic() + timeout
        while len(await self.channels()) < channels:
            assert time.monotonic() < deadline, "the waits did not subscribe"
            await asyncio.sleep(0.05)

    async def snapshot(self) -> tuple[int, int, int, int]:
        """(tasks, threads, channels, pub/sub connections), to compare before and after."""
        pubsub = sum(int(client.get("sub", 0)) > 0 for client in await self.connections())
        return (
            len(_other_tasks()),
            threading.active_count(),
            len(await self.channels()),
            pubsub,
        )

    async def quiet(self, timeout: float = 5.0) -> tuple[int, int, int, int]:
        """The snapshot once no wait holds anything: the baseline for :meth:`settle`."""
        deadline = time.monotonic() + timeout
        while True:
            now = await self.snapshot()
            watching = any(t.name.startswith("telstate-lmdb-watch") for t in threading.enumerate())
            if now[0] == now[2] == now[3] == 0 and not watching:
                return now
            assert time.monotonic() < deadline, f"not quiet: {now}"
            await asyncio.sleep(0.05)

    async def settle(self, baseline: tuple[int, int, int, int], timeout: float = 5.0) -> None:
        """Wait until everything is back to `baseline` (an LMDB watcher thread ends after
        its current sleep)."""
        deadline = time.monotonic() + timeout
        while (now := await self.snapshot()) != baseline:
            assert time.monotonic() < deadline, f"left behind: {now} != {baseline}"
            await asyncio.sleep(0.05)


async def _warm_up(ts: TelescopeState) -> None:
    """One write and one completed wait, so that lazily made threads exist already.

    (The LMDB writer thread and watchdog observer last as long as the backend
    or the process, not as long as a wait.)
    """
    await ts.add("warm", 0)
    waiter = asyncio.create_task(ts.wait_key("warm", lambda value, stamp: value == 1))
    await asyncio.sleep(0.05)
    await ts.add("warm", 1)
    await asyncio.wait_for(waiter, 5)


async def test_a_thousand_waits_complete_on_shared_resources(backend, resources):
    ts = TelescopeState(backend)
    await _warm_up(ts)
    baseline = await resources.quiet()
    waiters = [asyncio.create_task(ts.wait_key(f"key{i}")) for i in range(WAITERS)]
    await resources.subscribed(WAITERS)
    assert not any(waiter.done() for waiter in waiters)
    tasks, threads, _, pubsub = await resources.snapshot()
    # The waits, and a few shared tasks (listener, reader, the client's own).
    assert tasks < baseline[0] + WAITERS + 20
    assert threads <= baseline[1] + 1
    if isinstance(backend, RedisBackend):
        assert await resources.subscribers(b"update/key7") == 1
    connections = await resources.connections()
    if connections:
        assert pubsub == 1
        assert len(connections) <= MAX_CONNECTIONS

    await asyncio.gather(*(ts.add(f"key{i}", i) for i in range(0, WAITERS, 2)))
    await asyncio.wait_for(asyncio.gather(*waiters[::2]), 10)
    await asyncio.sleep(0.05)
    assert not any(waiter.done() for waiter in waiters[1::2])
    await asyncio.gather(*(ts.add(f"key{i}", i) for i in range(1, WAITERS, 2)))
    await asyncio.wait_for(asyncio.gather(*waiters), 10)
    await resources.settle(baseline)


async def test_cancelled_waits_leave_nothing_behind(backend, resources):
    ts = TelescopeState(backend)
    await _warm_up(ts)
    baseline = await resources.quiet()
    waiters = [asyncio.create_task(ts.wait_key(f"key{i % 500}")) for i in range(WAITERS)]
    waiters += [asyncio.create_task(ts.wait_indexed("idx", i)) for i in range(100)]
    await resources.subscribed(501)
    if isinstance(backend, RedisBackend):
        assert await resources.subscribers(b"update/key3") == 1
        assert await resources.subscribers(b"update/idx") == 1
    for waiter in waiters:
        waiter.cancel()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(result, asyncio.CancelledError) for result in results)
    await resources.settle(baseline)
    # The backend still works, and waits again.
    waiter = asyncio.create_task(ts.wait_key("key1"))
    await asyncio.sleep(0.05)
    await ts.add("key1", 1)
    await asyncio.wait_for(waiter, 5)
    await resources.settle(baseline)


async def test_waiters_on_one_key_share_a_subscription(backend, resources):
    ts = TelescopeState(backend)
    values = list(range(100))
    waiters = [
        asyncio.create_task(ts.wait_key("k", lambda value, stamp, i=i: value >= i)) for i in values
    ]
    await asyncio.sleep(0.1)
    if isinstance(backend, RedisBackend):
        assert await resources.channels() == [b"update/k"]
        assert await resources.subscribers(b"update/k") == 1
    for i in values:
        await ts.add("k", i, ts=float(i))
    await asyncio.wait_for(asyncio.gather(*waiters), 10)


@pytest.mark.parametrize(
    "backend", [name for name in ("memory", "lmdb") if name in AIO_BACKENDS], indirect=True
)
async def test_sync_writes_from_another_thread_wake_async_waits(backend):
    ts = TelescopeState(backend)
    sync = telstate.TelescopeState(backend.to_sync())  # type: ignore[attr-defined]
    waiters = [asyncio.create_task(ts.wait_key(f"k{i}")) for i in range(50)]
    await asyncio.sleep(0.05)

    def write() -> None:
        for i in range(50):
            sync.add(f"k{i}", i, immutable=True)

    thread = threading.Thread(target=write)
    thread.start()
    await asyncio.wait_for(asyncio.gather(*waiters), 10)
    thread.join()


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
async def test_redis_waits_survive_a_lost_pubsub_connection(backend, redis_client):
    ts = TelescopeState(backend)
    waiter = asyncio.create_task(ts.wait_key("k", lambda value, stamp: value == 2))
    await asyncio.sleep(0.1)
    await ts.add("k", 1)
    redis_client.client_kill_filter(_type="pubsub")
    await ts.add("k", 2)
    await asyncio.wait_for(waiter, 10)
