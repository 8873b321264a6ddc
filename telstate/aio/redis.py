"""Asynchronous Redis backend, on :mod:`redis.asyncio`.

Keys, Lua scripts and update messages are those of :mod:`telstate.redis`,
so this backend, the synchronous one and katsdptelstate's two share a
database and wake each other's waits.

Waiting: all the monitors of one backend share one pub/sub connection,
owned by one listener task (:class:`_UpdateSubscriptions`). Monitors only
register and unregister their keys, without I/O, so cancelling a wait can
never leave a subscription half-made; the listener subscribes to the
channels of registered keys, unsubscribes from the rest, and hands each
message to the monitors of its key. It starts with the first monitor and
stops, closing its connection, when the last one leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from typing import Any, TypeVar, cast

import redis
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ..backend import GetResult, KeyUpdateBase, Record
from ..errors import CancelledError, ConnectionError, ReadOnlyError
from ..log import Op
from ..redis import (
    _ADD_MUTABLE,
    _GET,
    _GET_INDEXED,
    _KEY_TYPES,
    _SET_IMMUTABLE,
    _SET_INDEXED,
    LOAD_BATCH,
    MIRROR_CURSOR_DB,
    MIRROR_RECHECK,
    _wrong_type,
    client_db,
    decode_get_indexed_reply,
    decode_get_reply,
    decode_range_replies,
    is_permission_error,
    mirror_intake,
    mirror_reason,
    parse_update_message,
    queue_mirror_query,
    queue_range_query,
    queue_record,
)
from ..remote import DEFAULT_TIMEOUT, AsyncRemoteWriter
from ..utils import KeyType, display_str, pack_timestamp
from .backend import Backend, Inbox, Watchers

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

_CHANNEL_PREFIX = b"update/"

#: katsdptelstate's placeholder channel, which keeps its pub/sub connection
#: subscribed while no key is watched. telstate's listener holds no
#: placeholder (it closes its connection when the last monitor leaves); the
#: name stays importable for code that imports it, katsdptelstate's own
#: tests among them.
_DUMMY_CHANNEL = b"\0katsdptelstate-internal0\1"

#: Longest wait for a pub/sub message, so that health checks run while idle.
_POLL_INTERVAL = 1.0
#: Pause before the listener tries again after losing the server.
_RETRY_DELAY = 1.0


class RedisBackend(Backend):
    """Telescope state kept in a Redis database, for asyncio code.

    Parameters
    ----------
    client
        A :class:`redis.asyncio.Redis` client (or a compatible one, e.g.
        ``fakeredis.aioredis.FakeRedis``), with ``decode_responses`` off.
        The backend closes it in :meth:`close`.
    max_in_flight
        Most commands the backend has in flight at once; more wait their
        turn. Each holds a connection of the client's pool while it runs,
        and all waits share one more, so the backend needs at most
        ``max_in_flight + 1`` connections however many coroutines use it
        (fewer if the pool is smaller: one stays free for the waits).
    write_timeout, writer_name
        For a mirror that accepts writes, as for
        :class:`telstate.redis.RedisBackend`.
    """

    def __init__(
        self,
        client: redis.asyncio.Redis,
        *,
        max_in_flight: int = 16,
        write_timeout: float = DEFAULT_TIMEOUT,
        writer_name: str | None = None,
    ) -> None:
        self.client = client
        pool_size = getattr(client.connection_pool, "max_connections", None) or max_in_flight + 1
        self._in_flight = asyncio.Semaphore(max(1, min(max_in_flight, pool_size - 1)))
        self._set_immutable = client.register_script(_SET_IMMUTABLE)
        self._add_mutable = client.register_script(_ADD_MUTABLE)
        self._set_indexed = client.register_script(_SET_INDEXED)
        self._get = client.register_script(_GET)
        self._get_indexed = client.register_script(_GET_INDEXED)
        self._subscriptions = _UpdateSubscriptions(client)
        self._close_task: asyncio.Task[None] | None = None
        # Whether the database is a replicator's mirror is found out on the
        # first write (the constructor cannot await), then cached.
        # When the database was last found to be no mirror taking writes (see _check_writable).
        self._mirror_checked: float | None = None
        self._read_only_reason: str | None = None
        self._remote: AsyncRemoteWriter | None = None
        self._write_timeout = write_timeout
        self._writer_name = writer_name

    @classmethod
    async def from_url(
        cls,
        url: str,
        *,
        db: int | None = None,
        max_connections: int | None = None,
        write_timeout: float = DEFAULT_TIMEOUT,
        writer_name: str | None = None,
        **kwargs: Any,
    ) -> RedisBackend:
        """Connect to the server a ``redis://``, ``rediss://`` or ``unix://`` URL names.

        Without `max_connections`, the client is made by
        :meth:`redis.asyncio.Redis.from_url`, called as katsdptelstate calls
        it (so code that patches it sees the same call). The client gets a
        5 s socket timeout (redis-py applies it to connecting too) and a
        30 s health check unless `kwargs` say otherwise. The server must
        answer a PING.

        Parameters
        ----------
        url
            Where the server is, and optionally the database (``/1``).
        db
            Database number, if not given in `url`.
        max_connections
            If given, the client gets a pool of at most this many
            connections, in which callers wait for a free one (see
            `max_in_flight` of the class). Otherwise the pool is redis-py's
            default, unbounded; the backend itself never uses more than
            ``max_in_flight + 1`` connections of it.
        **kwargs
            Options of :class:`redis.asyncio.Connection`.

        Raises
        ------
        ConnectionError
            If the server cannot be reached.
        """
        kwargs.setdefault("socket_timeout", 5)
        kwargs.setdefault("health_check_interval", 30)
        if max_connections is None:
            client = redis.asyncio.Redis.from_url(url, db=db, **kwargs)
        else:
            # A bounded pool that makes callers wait for a free connection
            # (redis-py's default pool raises instead): Redis.from_url cannot
            # make one.
            if db is not None:
                kwargs["db"] = db
            pool = redis.asyncio.BlockingConnectionPool.from_url(
                url, max_connections=max_connections, timeout=None, **kwargs
            )
            client = redis.asyncio.Redis.from_pool(pool)
        try:
            await _ping_without_retries(client)
        except (redis.ConnectionError, redis.TimeoutError, OSError) as error:
            await client.aclose()
            raise ConnectionError(f"could not connect to redis server {url}: {error}") from error
        return cls(client, write_timeout=write_timeout, writer_name=writer_name)

    async def _command(
        self, key: bytes | None, command: Callable[..., Awaitable[_T]], *args: Any
    ) -> _T:
        """Await ``command(*args)`` in turn (see `max_in_flight`).

        Raises
        ------
        ImmutableKeyError
            If Redis says that `key` has the wrong type.
        asyncio.CancelledError
            If the task was cancelled during the command, even if the client
            swallowed the cancellation (redis-py sometimes does, and a
            cancelled wait would otherwise wait on forever).
        """
        task = asyncio.current_task()
        cancelling = _cancelling(task)
        async with self._in_flight:
            if key is None:
                result = await command(*args)
            else:
                with _wrong_type(key):
                    result = await command(*args)
        if _cancelling(task) > cancelling:
            raise asyncio.CancelledError()
        return result

    async def exists(self, key: bytes) -> bool:
        return bool(await self._command(None, self.client.exists, key))

    async def keys(self, filter: bytes) -> list[bytes]:
        return cast(list[bytes], await self._command(None, self.client.keys, filter))

    async def delete(self, key: bytes) -> None:
        await self._write(Op.DELETE, key, lambda: self._command(None, self.client.unlink, key))

    async def clear(self) -> None:
        flush = functools.partial(self.client.flushdb, asynchronous=True)
        await self._write(Op.CLEAR, None, lambda: self._command(None, flush))

    async def key_type(self, key: bytes) -> KeyType | None:
        return _KEY_TYPES.get(cast(bytes, await self._command(None, self.client.type, key)))

    async def set_immutable(self, key: bytes, value: bytes) -> bytes | None:
        return cast(
            "bytes | None",
            await self._write(
                Op.SET_IMMUTABLE,
                key,
                lambda: self._command(key, self._set_immutable, [key], [value]),
                value=value,
            ),
        )

    async def get(self, key: bytes) -> GetResult:
        return decode_get_reply(await self._command(key, self._get, [key]))

    async def add_mutable(self, key: bytes, value: bytes, timestamp: float) -> None:
        member = pack_timestamp(timestamp) + value
        await self._write(
            Op.ADD_MUTABLE,
            key,
            lambda: self._command(key, self._add_mutable, [key], [member]),
            value=value,
            timestamp=timestamp,
        )

    async def set_indexed(self, key: bytes, sub_key: bytes, value: bytes) -> bytes | None:
        return cast(
            "bytes | None",
            await self._write(
                Op.SET_INDEXED,
                key,
                lambda: self._command(key, self._set_indexed, [key], [sub_key, value]),
                sub_key=sub_key,
                value=value,
            ),
        )

    async def get_indexed(self, key: bytes, sub_key: bytes) -> bytes | None:
        reply = await self._command(key, self._get_indexed, [key], [sub_key])
        return decode_get_indexed_reply(key, reply)

    async def get_range(
        self,
        key: bytes,
        start_time: float,
        end_time: float,
        include_previous: bool,
        include_end: bool,
    ) -> list[tuple[bytes, float]] | None:
        async def query() -> list[Any]:
            async with self.client.pipeline(transaction=True) as pipe:
                queue_range_query(pipe, key, start_time, end_time, include_previous, include_end)
                return await pipe.execute(raise_on_error=False)

        return decode_range_replies(key, await self._command(None, query))

    async def dump(self, key: bytes) -> bytes | None:
        return await self._command(None, self.client.dump, key)

    async def load_records(self, records: Iterable[Record]) -> int:
        if await self._check_writable() is not None:
            raise ReadOnlyError(
                "load RDB files into the store on the log host, not through a mirror"
            )
        return await self._command(None, self._load, records)

    async def _load(self, records: Iterable[Record]) -> int:
        count = 0
        pending = 0
        async with self.client.pipeline(transaction=False) as pipe:
            for record in records:
                pending += queue_record(pipe, record)
                count += 1
                if pending >= LOAD_BATCH:
                    await pipe.execute()
                    pending = 0
            await pipe.execute()
        return count

    async def _check_writable(self) -> AsyncRemoteWriter | None:
        """The writer to the store's log if the database is a mirror that accepts writes.

        Raises
        ------
        ReadOnlyError
            If the database is a mirror that does not accept writes.

        Looked at on the first write, and again at most once a second
        (:data:`telstate.redis.MIRROR_RECHECK`) while writes do not go to a
        log (see :class:`telstate.redis.RedisBackend`).
        """
        checked = self._mirror_checked
        if self._remote is None and (
            checked is None
            or self._read_only_reason is not None
            or time.monotonic() - checked >= MIRROR_RECHECK
        ):
            await self._describe()
        if self._remote is not None:
            return self._remote
        if self._read_only_reason is not None:
            raise ReadOnlyError(self._read_only_reason)
        return None

    async def _write(self, op: Op, key: bytes | None, direct: Any, **write: Any) -> Any:
        """Write through the mirror's log if it takes writes, else `direct()` to the database.

        As :meth:`telstate.redis.RedisBackend._write`: a direct write refused
        for lack of rights is looked at again.
        """
        remote = await self._check_writable()
        if remote is not None:
            return await remote.write(op, key, **write)
        try:
            return await direct()
        except redis.ResponseError as error:
            if not is_permission_error(error):
                raise
            await self._describe()
            if self._remote is not None:
                return await self._remote.write(op, key, **write)
            if self._read_only_reason is None:
                raise  # no mirror: the server's own refusal, as katsdptelstate gives it
            raise ReadOnlyError(self._read_only_reason) from error

    async def _describe(self) -> None:
        """Find out whether the database is a mirror, and whether its writes go to a log."""
        db = client_db(self.client)

        async def query() -> list[Any]:
            async with self.client.pipeline(transaction=True) as pipe:
                queue_mirror_query(pipe, db)
                return await pipe.execute(raise_on_error=False)

        try:
            replies = await self._command(None, query)
        except redis.RedisError:
            replies = None
        if replies is not None:
            self._read_only_reason = mirror_reason(db, replies)
            store = mirror_intake(replies)
            if store is not None and self._remote is None:
                self._remote = AsyncRemoteWriter(
                    self.client,
                    db,
                    MIRROR_CURSOR_DB,
                    store,
                    timeout=self._write_timeout,
                    writer_name=self._writer_name,
                )
        self._mirror_checked = time.monotonic()

    async def monitor_keys(self, keys: Iterable[bytes]) -> AsyncGenerator[KeyUpdateBase, None]:
        keys = list(dict.fromkeys(keys))
        inbox = Inbox()
        self._subscriptions.add(inbox, keys)
        try:
            # A write may have landed before the subscription: check again.
            yield KeyUpdateBase()
            while True:
                key, data = await inbox.get()
                if data is None:
                    yield KeyUpdateBase()
                    continue
                update = await self._parse_update(key, data)
                if update is not None:
                    yield update
        finally:
            self._subscriptions.discard(inbox, keys)

    async def _parse_update(self, key: bytes, data: bytes) -> KeyUpdateBase | None:
        """The update an ``update/<key>`` message describes; None if the key is gone."""
        try:
            key_type = KeyType(data[0])
            data = data[1:]
        except (ValueError, IndexError):
            # katsdptelstate omits the type byte for immutable and mutable keys.
            found = await self.key_type(key)
            if found is None:
                return None
            key_type = found
        try:
            return parse_update_message(key, key_type, data)
        except ValueError as error:
            logger.warning("Ignoring malformed update message for %s: %s", display_str(key), error)
            return KeyUpdateBase()

    def close(self) -> None:
        """Start closing: end the waits (they raise :exc:`CancelledError`) and the client."""
        if self._close_task is None:
            self._close_task = asyncio.get_running_loop().create_task(self._close())

    async def _close(self) -> None:
        await self._subscriptions.close()
        if self._remote is not None:
            await self._remote.close()
        await self.client.aclose()

    async def wait_closed(self) -> None:
        """Wait until :meth:`close` is done (closing first if it was not called)."""
        self.close()
        assert self._close_task is not None
        await self._close_task


class _UpdateSubscriptions:
    """The ``update/<key>`` subscriptions of all the monitors of one backend.

    Monitors :meth:`add` and :meth:`discard` an inbox for their keys; the
    listener task makes the server's subscriptions follow, and puts
    ``(key, data)`` into the inboxes of the key for every message, and
    ``(key, None)`` for every confirmation of a subscription to it (after
    which the monitors must check again).
    """

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self._client = client
        self._watchers = Watchers()
        # Keys whose subscription may be out of step with the watchers.
        self._changed_keys: set[bytes] = set()
        self._listener: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Future[None] | None = None
        self._closed = False

    def add(self, inbox: Inbox, keys: list[bytes]) -> None:
        """Deliver the updates of `keys` to `inbox` from now on.

        Raises
        ------
        CancelledError
            If the backend is closed.
        """
        if self._closed:
            raise CancelledError("cannot wait for keys: the Redis backend is closed")
        self._changed_keys.update(self._watchers.add(inbox, keys))
        if self._listener is None:
            self._changed_keys = set(self._watchers.keys())
            self._listener = asyncio.get_running_loop().create_task(self._listen())
        else:
            self._wake()

    def discard(self, inbox: Inbox, keys: list[bytes]) -> None:
        """Stop delivering updates of `keys` to `inbox`."""
        self._changed_keys.update(self._watchers.discard(inbox, keys))
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def close(self) -> None:
        """Stop the listener and end every monitor (with :exc:`CancelledError`)."""
        self._closed = True
        self._wake()
        await _stop(self._listener)
        self._watchers.end("the Redis backend was closed")

    async def _listen(self) -> None:
        """The listener task: runs while any monitor is registered."""
        loop = asyncio.get_running_loop()
        pubsub = self._client.pubsub()
        subscribed: set[bytes] = set()
        reading: asyncio.Task[Any] | None = None
        failed = False
        try:
            # The check of _closed covers a cancellation that redis-py swallowed.
            while self._watchers and not self._closed:
                self._wakeup = loop.create_future()
                try:
                    await self._follow_watchers(pubsub, subscribed)
                    if reading is None:
                        reading = loop.create_task(pubsub.get_message(timeout=_POLL_INTERVAL))
                    await asyncio.wait((reading, self._wakeup), return_when=asyncio.FIRST_COMPLETED)
                    if reading.done():
                        message, reading = reading.result(), None
                        if message is not None:
                            self._deliver(message)
                except (redis.ConnectionError, redis.TimeoutError, OSError) as error:
                    # redis-py has already retried: pause, then reconnect, which
                    # resubscribes; the confirmations make the monitors check again.
                    logger.warning("Redis pub/sub failed (%s): trying again soon", error)
                    await _stop(reading)
                    reading = None
                    await asyncio.sleep(_RETRY_DELAY)
            if subscribed and not self._closed:
                # A real server forgets the subscriptions of a closed
                # connection; fakeredis does not.
                with contextlib.suppress(redis.ConnectionError, redis.TimeoutError, OSError):
                    await pubsub.unsubscribe()
        except Exception as error:
            failed = True
            logger.exception("Redis pub/sub listener failed")
            self._watchers.end(f"the Redis pub/sub listener failed ({error})", error)
        finally:
            await _stop(reading)
            await pubsub.aclose()
            self._listener = self._wakeup = None
            if self._watchers and not (self._closed or failed):
                # A monitor arrived while this listener was shutting down.
                self._changed_keys = set(self._watchers.keys())
                self._listener = loop.create_task(self._listen())

    async def _follow_watchers(self, pubsub: Any, subscribed: set[bytes]) -> None:
        """Subscribe to the channels of newly watched keys, unsubscribe from dropped ones."""
        keys, self._changed_keys = self._changed_keys, set()
        try:
            # Subscribe first, so that the connection never lacks subscriptions
            # while monitors remain (redis-py would then health-check it with
            # a PING whose reply the reading task could take).
            new = [_CHANNEL_PREFIX + key for key in keys if key in self._watchers]
            new = [channel for channel in new if channel not in subscribed]
            if new:
                await pubsub.subscribe(*new)
                subscribed.update(new)
            gone = [_CHANNEL_PREFIX + key for key in keys if key not in self._watchers]
            gone = [channel for channel in gone if channel in subscribed]
            if gone:
                await pubsub.unsubscribe(*gone)
                subscribed.difference_update(gone)
        except BaseException:
            self._changed_keys |= keys
            raise

    def _deliver(self, message: dict[str, Any]) -> None:
        if message["type"] == "message":
            data = message["data"]
        elif message["type"] == "subscribe":
            data = None
        else:
            return
        key = message["channel"][len(_CHANNEL_PREFIX) :]
        self._watchers.deliver(key, (key, data))


def _cancelling(task: asyncio.Task[Any] | None) -> int:
    """How many cancellations of `task` are pending (0 before Python 3.11, which cannot say)."""
    cancelling = getattr(task, "cancelling", None)
    return cancelling() if cancelling is not None else 0


async def _stop(task: asyncio.Task[Any] | None) -> None:
    """Cancel `task` (if any) and wait for it to end, whatever it raises."""
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _ping_without_retries(client: redis.asyncio.Redis) -> None:
    """PING once, so that an unreachable server fails within one connect timeout.

    redis-py retries with backoff by default, which would multiply the wait
    at start-up; the client's own retry policy is restored after.
    """
    get_retry = getattr(client, "get_retry", None)
    retry = get_retry() if get_retry is not None else None
    if retry is None:
        await client.ping()
        return
    client.set_retry(Retry(NoBackoff(), 0))
    try:
        await client.ping()
    finally:
        client.set_retry(retry)
