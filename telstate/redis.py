"""Redis backend, with katsdptelstate's key layout and update messages.

Layout (shared with katsdptelstate, so either package reads what the other
writes): an immutable key is a Redis string; a mutable key is a zset whose
members are the 8-byte big-endian timestamp followed by the value, all with
score 0 (so ZRANGEBYLEX orders them by time, then value); an indexed key is a
hash of encoded sub-key to encoded value.

Every write that changes something publishes on ``update/<key>``: the key
type byte (1, 2 or 3, as :class:`~telstate.utils.KeyType`), then for
immutable keys the value, for mutable keys the member, and for indexed keys
``<sub-key length in ASCII>\\n<sub-key><value>``. Messages without the type
byte (written by katsdptelstate for immutable and mutable keys) are
understood too.

Only commands and Lua that fakeredis supports are used, so a
``fakeredis.FakeRedis`` client works as well as a real server.

A database that telstate-replicator keeps as a mirror of an LMDB store is
read-only: the replicator records its cursor for database *n* in the hash
:func:`mirror_cursor_key` (*n*) of database :data:`MIRROR_CURSOR_DB`, and a
backend that finds it there at construction refuses every write, unless
the replicator accepts writes for the mirror (``--accept-writes``): then
every write goes to the store's log through :mod:`telstate.remote`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import struct
import time
from collections.abc import Generator, Iterable, Iterator
from typing import Any, BinaryIO, cast

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from . import import_rules

# Public here as in katsdptelstate (its backends load files through it).
from . import rdb_reader as rdb_reader
from .backend import (
    Backend,
    GetResult,
    ImmutableKeyUpdate,
    IndexedKeyUpdate,
    KeyUpdateBase,
    MutableKeyUpdate,
    Record,
    member_chunks,
)
from .errors import ConnectionError, ImmutableKeyError, ReadOnlyError
from .log import Op
from .rdb_reader import BackendCallback
from .remote import DEFAULT_TIMEOUT, ProcessLock, RemoteWriter, intake_key
from .utils import (
    KeyType,
    PathType,
    display_str,
    ensure_str,
    pack_query_timestamp,
    pack_timestamp,
    split_timestamp,
)

#: Seconds between looks at whether a database that was no mirror (or a
#: mirror that took no writes) has become one that takes them: a client
#: made while Redis was empty (restarted, its replicator not yet back)
#: must not write around the log for its whole life.
MIRROR_RECHECK = 1.0

_SET_IMMUTABLE = b"""
if redis.call('SETNX', KEYS[1], ARGV[1]) == 0 then
    return redis.call('GET', KEYS[1])
end
redis.call('PUBLISH', 'update/' .. KEYS[1], '\\1' .. ARGV[1])
return false
"""

_ADD_MUTABLE = b"""
if redis.call('ZADD', KEYS[1], 0, ARGV[1]) == 1 then
    redis.call('PUBLISH', 'update/' .. KEYS[1], '\\2' .. ARGV[1])
end
return false
"""

_SET_INDEXED = b"""
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then
    return redis.call('HGET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', 'update/' .. KEYS[1],
           '\\3' .. string.len(ARGV[1]) .. '\\n' .. ARGV[1] .. ARGV[2])
return false
"""

# Returns {value-or-false, type}; HGETALL fails with WRONGTYPE for other types.
_GET = b"""
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind == 'none' then
    return {false, kind}
elseif kind == 'string' then
    return {redis.call('GET', KEYS[1]), kind}
elseif kind == 'zset' then
    return {redis.call('ZREVRANGEBYLEX', KEYS[1], '+', '-', 'LIMIT', 0, 1)[1], kind}
end
return {redis.call('HGETALL', KEYS[1]), kind}
"""

# Returns the value, or 1 if the key does not exist, or 0 if the sub-key does not.
_GET_INDEXED = b"""
local value = redis.call('HGET', KEYS[1], ARGV[1])
if value then
    return value
end
return redis.call('EXISTS', KEYS[1])
"""

logger = logging.getLogger(__name__)

_KEY_TYPES = {
    b"none": None,
    b"string": KeyType.IMMUTABLE,
    b"zset": KeyType.MUTABLE,
    b"hash": KeyType.INDEXED,
}

#: Bulk loads go to the server in pipelines of about this many elements.
LOAD_BATCH = 10000

#: Database where telstate-replicator keeps the cursor of every mirror it
#: writes. It is not the mirror's own database, so that the cursor is never
#: among the keys that telstate or katsdptelstate clients of the mirror list.
MIRROR_CURSOR_DB = 15


def mirror_cursor_key(db: int) -> bytes:
    """Name of the hash (in :data:`MIRROR_CURSOR_DB`) holding the cursor of mirror database `db`."""
    return b"telstate-replicator:cursor:%d" % db


@contextlib.contextmanager
def _wrong_type(key: bytes) -> Iterator[None]:
    """Turn Redis WRONGTYPE errors (direct or from a script) into ImmutableKeyError."""
    try:
        yield
    except redis.ResponseError as error:
        if "WRONGTYPE" in str(error):
            raise ImmutableKeyError(
                f"key {display_str(key)} exists in Redis with another type"
            ) from None
        raise


class RedisBackend(Backend):
    """Telescope state kept in a Redis database.

    Parameters
    ----------
    client
        A redis-py client, or any compatible client (e.g. ``fakeredis.FakeRedis``).
    write_timeout
        On a mirror that accepts writes: seconds to wait for the log host
        to confirm each write before raising
        :exc:`~telstate.errors.WriteTimeoutError`.
    writer_name
        On a mirror that accepts writes: recorded in the log with this
        host and process id.

    Raises
    ------
    ConnectionError
        If the server does not answer a PING (within the client's socket timeout).
    ValueError
        If `write_timeout` is not positive (or above an hour).

    Notes
    -----
    If the database is a mirror kept by telstate-replicator, every write
    method raises :exc:`~telstate.errors.ReadOnlyError`, unless the
    replicator accepts writes: then writes go to the store's log (see
    :mod:`telstate.remote`), with the results and errors of a local write.
    That is found out here, so reads cost nothing extra, and looked at
    again by a write at most once a second (:data:`MIRROR_RECHECK`) while
    writes do not go to a log, and at once if the server refuses a write
    (an ACL rule of a protected mirror): a client made while Redis was
    empty (restarted, before the replicator was back) then writes to the
    log within a second of the mirror's return, never around it for good.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        write_timeout: float = DEFAULT_TIMEOUT,
        writer_name: str | None = None,
    ) -> None:
        self.client = client
        try:
            _ping_without_retries(client)
        except (redis.ConnectionError, redis.TimeoutError, OSError) as error:
            raise ConnectionError(f"could not connect to redis server: {error}") from error
        self._write_timeout = write_timeout
        self._writer_name = writer_name
        self._remote: RemoteWriter | None = None
        self._read_only_reason: str | None = None
        self._described_at = 0.0
        # Held while the mirror is looked at again (writers of several threads).
        self._describing = ProcessLock()
        self._describe()
        self._set_immutable = client.register_script(_SET_IMMUTABLE)
        self._add_mutable = client.register_script(_ADD_MUTABLE)
        self._set_indexed = client.register_script(_SET_INDEXED)
        self._get = client.register_script(_GET)
        self._get_indexed = client.register_script(_GET_INDEXED)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        db: int | None = None,
        write_timeout: float = DEFAULT_TIMEOUT,
        writer_name: str | None = None,
        **kwargs: Any,
    ) -> RedisBackend:
        """Connect to the server a ``redis://``, ``rediss://`` or ``unix://`` URL names.

        The client is made by :meth:`redis.Redis.from_url`, called as
        katsdptelstate calls it (so code that patches it sees the same
        call), with a 5 s socket timeout (redis-py applies it to connecting
        too) and a 30 s health check unless `kwargs` override them.
        `write_timeout` and `writer_name` are as for the class.

        Raises
        ------
        ConnectionError
            If the server cannot be reached.
        """
        kwargs.setdefault("socket_timeout", 5)
        kwargs.setdefault("health_check_interval", 30)
        return cls(
            redis.Redis.from_url(url, db=db, **kwargs),
            write_timeout=write_timeout,
            writer_name=writer_name,
        )

    @classmethod
    def from_host(cls, host: str, port: int | None = None, *, db: int = 0) -> RedisBackend:
        """Connect to a server by host and port (Redis's default port if None).

        Raises
        ------
        ConnectionError
            If the server cannot be reached.
        """
        kwargs: dict[str, Any] = dict(host=host, db=db, socket_timeout=5, health_check_interval=30)
        if port is not None:
            kwargs["port"] = port
        return cls(redis.Redis(**kwargs))

    def __contains__(self, key: bytes) -> bool:
        return bool(self.client.exists(key))

    def keys(self, filter: bytes) -> list[bytes]:
        return cast(list[bytes], self.client.keys(filter))

    def delete(self, key: bytes) -> None:
        self._write(Op.DELETE, key, lambda: self.client.unlink(key))

    def clear(self) -> None:
        self._write(Op.CLEAR, None, lambda: self.client.flushdb(asynchronous=True))

    def key_type(self, key: bytes) -> KeyType | None:
        return _KEY_TYPES.get(cast(bytes, self.client.type(key)))

    def set_immutable(self, key: bytes, value: bytes) -> bytes | None:
        def direct() -> bytes | None:
            with _wrong_type(key):
                return cast("bytes | None", self._set_immutable([key], [value]))

        return self._write(Op.SET_IMMUTABLE, key, direct, value=value)

    def get(self, key: bytes) -> GetResult:
        with _wrong_type(key):
            return decode_get_reply(self._get([key]))

    def add_mutable(self, key: bytes, value: bytes, timestamp: float) -> None:
        def direct() -> None:
            with _wrong_type(key):
                self._add_mutable([key], [pack_timestamp(timestamp) + value])

        self._write(Op.ADD_MUTABLE, key, direct, value=value, timestamp=timestamp)

    def set_indexed(self, key: bytes, sub_key: bytes, value: bytes) -> bytes | None:
        def direct() -> bytes | None:
            with _wrong_type(key):
                return cast("bytes | None", self._set_indexed([key], [sub_key, value]))

        return self._write(Op.SET_INDEXED, key, direct, sub_key=sub_key, value=value)

    def get_indexed(self, key: bytes, sub_key: bytes) -> bytes | None:
        with _wrong_type(key):
            return decode_get_indexed_reply(key, self._get_indexed([key], [sub_key]))

    def get_range(
        self,
        key: bytes,
        start_time: float,
        end_time: float,
        include_previous: bool,
        include_end: bool,
    ) -> list[tuple[bytes, float]] | None:
        with self.client.pipeline(transaction=True) as pipe:
            queue_range_query(pipe, key, start_time, end_time, include_previous, include_end)
            return decode_range_replies(key, pipe.execute(raise_on_error=False))

    def dump(self, key: bytes) -> bytes | None:
        return self.client.dump(key)

    def load_from_file(self, file: PathType | BinaryIO) -> int:
        """Load the keys of an RDB file in one pass, checked a batch at a time.

        Unlike the other backends, a path is not checked whole first: a bad
        record leaves the batches before it loaded (as katsdptelstate's Redis
        load would), which keeps the load at its speed (one parse).
        """
        records = rdb_reader.read_records(file, packed_members=True)  # checked at once
        return self.load_records(records, import_rules.file_source(file))

    def load_records(self, records: Iterable[Record], source: PathType | None = None) -> int:
        """Import whole keys (see :mod:`telstate.import_rules`), pipelined.

        Records are checked, and checked against the server's keys, a
        batch at a time before the batch is written.
        """
        self._check_writable()
        if self._remote is not None:
            raise ReadOnlyError(
                "load RDB files into the store on the log host, not through a mirror"
            )
        count = 0
        with self.client.pipeline(transaction=False) as pipe:
            for batch in import_rules.batches(records, source, LOAD_BATCH):
                self.check_imports(batch)
                for record in batch:
                    queue_record(pipe, record)
                pipe.execute()
                count += len(batch)
        return count

    def check_imports(self, records: list[Record]) -> None:
        """Check records against the server's keys in two round trips (see import_rules)."""
        with self.client.pipeline(transaction=False) as pipe:
            for key, _, _ in records:
                pipe.type(key)
            types = [_KEY_TYPES.get(kind) for kind in pipe.execute()]
            wanted = []
            for record, existing_type in zip(records, types):
                key, key_type, value = record
                if existing_type != key_type:
                    continue
                if key_type == KeyType.IMMUTABLE:
                    pipe.get(key)
                    wanted.append(record)
                elif key_type == KeyType.INDEXED:
                    assert isinstance(value, dict)
                    pipe.hmget(key, list(value))
                    wanted.append(record)
            found = dict(zip((record[0] for record in wanted), pipe.execute()))
        earlier: dict[bytes, Record] = {}  # a key may be twice in a file (two databases)
        for record, existing_type in zip(records, types):
            key, key_type, value = record
            existing = found.get(key)
            if key_type == KeyType.INDEXED and existing is not None:
                assert isinstance(value, dict)
                existing = dict(zip(value, existing))
            import_rules.raise_contradiction(record, existing_type, existing)
            if key in earlier:
                import_rules.raise_contradiction(record, earlier[key][1], earlier[key][2])
            earlier[key] = record

    def monitor_keys(
        self, keys: Iterable[bytes]
    ) -> Generator[KeyUpdateBase | None, float | None, None]:
        pubsub = self.client.pubsub()
        with contextlib.closing(pubsub):
            pubsub.subscribe(*[b"update/" + key for key in keys])
            timeout = yield None
            while True:
                message = pubsub.get_message(timeout=timeout or 0.0)
                if message is None:
                    timeout = yield None
                elif message["type"] == "subscribe":
                    # A write may have landed before the subscription (or
                    # during a reconnect): tell the caller to look again.
                    timeout = yield KeyUpdateBase()
                elif message["type"] == "message":
                    update = self._parse_update(message["channel"][len(b"update/") :], message)
                    if update is not None:
                        timeout = yield update

    def _parse_update(self, key: bytes, message: dict) -> KeyUpdateBase | None:
        data: bytes = message["data"]
        try:
            key_type = KeyType(data[0])
            data = data[1:]
        except (ValueError, IndexError):
            # katsdptelstate omits the type byte for immutable and mutable keys.
            found = self.key_type(key)
            if found is None:
                return None
            key_type = found
        try:
            return parse_update_message(key, key_type, data)
        except (ValueError, struct.error):
            logger.warning("malformed update message on update/%s ignored", display_str(key))
            return KeyUpdateBase()

    def close(self) -> None:
        if self._remote is not None:
            self._remote.close()
        self.client.close()

    def _check_writable(self) -> None:
        """Raise :exc:`~telstate.errors.ReadOnlyError` if the database is a mirror
        that takes no writes (looked at again if due, see :data:`MIRROR_RECHECK`)."""
        if self._remote is None and (
            self._read_only_reason is not None
            or time.monotonic() - self._described_at >= MIRROR_RECHECK
        ):
            self._describe()
        if self._remote is None and self._read_only_reason is not None:
            raise ReadOnlyError(self._read_only_reason)

    def _describe(self) -> None:
        """Find out whether the database is a mirror, and whether its writes go to a log.

        If the server cannot be asked (busy, restarting, or the user may
        not), what was found before stands, until the next look is due.
        """
        with self._describing:
            if self._remote is not None:
                return  # another thread found it meanwhile
            found = _mirror_description(self.client)
            self._described_at = time.monotonic()  # (a look that failed, too: once a second)
            if found is None:
                return
            self._read_only_reason, intake_store = found
            if intake_store is not None:
                self._remote = RemoteWriter(
                    self.client,
                    client_db(self.client),
                    MIRROR_CURSOR_DB,
                    intake_store,
                    timeout=self._write_timeout,
                    writer_name=self._writer_name,
                )

    def _write(self, op: Op, key: bytes | None, direct: Any, **write: Any) -> Any:
        """Write through the mirror's log if it takes writes, else `direct()` to the database.

        A direct write that the server refuses for lack of rights (a
        protected mirror, found since) is looked at again: sent to the log
        if the mirror now takes writes, else :exc:`ReadOnlyError`.
        """
        if self._remote is None:
            self._check_writable()
        if self._remote is not None:
            return self._remote.write(op, key, **write)
        try:
            return direct()
        except redis.ResponseError as error:
            if not is_permission_error(error):
                raise
            self._describe()
            if self._remote is not None:
                return self._remote.write(op, key, **write)
            if self._read_only_reason is None:
                raise  # no mirror: the server's own refusal, as katsdptelstate gives it
            raise ReadOnlyError(self._read_only_reason) from error


def is_permission_error(error: redis.ResponseError) -> bool:
    """Whether Redis refused a command (or a script's command) for lack of rights."""
    return isinstance(error, redis.exceptions.NoPermissionError) or (
        "can't run this command" in str(error)
    )


def _ping_without_retries(client: redis.Redis) -> None:
    """PING once, so that an unreachable server fails within one socket timeout.

    redis-py retries timeouts with backoff by default, which would multiply
    the wait at start-up; the client's own retry policy is restored after.
    """
    get_retry = getattr(client, "get_retry", None)
    retry = get_retry() if get_retry is not None else None
    if retry is None:
        client.ping()
        return
    client.set_retry(Retry(NoBackoff(), 0))
    try:
        client.ping()
    finally:
        client.set_retry(retry)


def client_db(client: Any) -> int:
    """The database number a (sync or asyncio) redis-py client is connected to."""
    kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", {})
    return int(kwargs.get("db", 0) or 0)


def queue_mirror_query(pipe: Any, db: int) -> None:
    """Queue, on a MULTI pipeline, the lookup of database `db`'s mirror cursor.

    The cursor lives in another database; SELECT is queued inside MULTI
    together with the SELECT back, so the pooled connection ends up in its
    own database whatever happens (fakeredis runs this as Redis does).
    """
    pipe.execute_command("SELECT", MIRROR_CURSOR_DB)
    pipe.hmget(mirror_cursor_key(db), "store", "host", "path")
    pipe.hget(intake_key(db), "store")
    pipe.execute_command("SELECT", db)


def mirror_reason(db: int, replies: list[Any]) -> str | None:
    """Why database `db` is read-only, from :func:`queue_mirror_query`'s replies, or None.

    A server that refuses the SELECT (fewer databases, ACLs) has no mirror.
    """
    selected, cursor = replies[:2]
    if isinstance(selected, Exception) or not isinstance(cursor, list) or cursor[0] is None:
        return None
    store, host, path = (ensure_str(field) if field is not None else "?" for field in cursor)
    return (
        f"Redis database {db} is a read-only mirror of telstate store {store} "
        f"(lmdb://{path} on host {host}), kept up to date by telstate-replicator: "
        "write to the store instead"
    )


def mirror_intake(replies: list[Any]) -> str | None:
    """The store (UUID) whose replicator accepts writes, from :func:`queue_mirror_query`'s replies.

    None if no replicator accepts writes for the database. The intake key
    alone decides: a daemon may announce it before its mirror cursor is
    written (while it builds the mirror), and a client that took the
    database for a plain Redis then would write around the log.
    """
    selected = replies[0]
    if isinstance(selected, Exception) or len(replies) < 3:
        return None
    store = replies[2]
    return ensure_str(store) if isinstance(store, bytes) else None


def _mirror_description(client: redis.Redis) -> tuple[str | None, str | None] | None:
    """Why the client's database is read-only (None if it is no mirror), and the
    store whose replicator accepts writes for it (None if none does); None if
    the server could not be asked."""
    db = client_db(client)
    try:
        with client.pipeline(transaction=True) as pipe:
            queue_mirror_query(pipe, db)
            replies = pipe.execute(raise_on_error=False)
    except redis.RedisError:
        return None
    return mirror_reason(db, replies), mirror_intake(replies)


def decode_get_reply(reply: list[Any]) -> GetResult:
    """Interpret the reply of the ``_GET`` script: [value, type]."""
    value, kind = reply
    if kind == b"none":
        return None, None
    if kind == b"string":
        return value, None
    if kind == b"zset":
        return split_timestamp(value)
    fields = iter(value)
    return dict(zip(fields, fields)), None


def decode_get_indexed_reply(key: bytes, reply: Any) -> bytes | None:
    """Interpret the reply of the ``_GET_INDEXED`` script.

    Raises
    ------
    KeyError
        If the key does not exist.
    """
    if reply == 0:
        raise KeyError(key)
    return None if reply == 1 else reply


def queue_range_query(
    pipe: Any,
    key: bytes,
    start_time: float,
    end_time: float,
    include_previous: bool,
    include_end: bool,
) -> None:
    """Queue the commands of a ``get_range`` on a MULTI pipeline (sync or asyncio)."""
    start = pack_query_timestamp(start_time, False)
    end = pack_query_timestamp(end_time, True, include_end)
    # TYPE rather than EXISTS: a range that needs no ZRANGEBYLEX must still
    # refuse a key that is not a zset.
    pipe.type(key)
    if include_previous and start != b"-":
        pipe.zrevrangebylex(key, start, b"-", start=0, num=1)
    if start != b"+" and end != b"-":
        pipe.zrangebylex(key, start, end)


def decode_range_replies(key: bytes, replies: list[Any]) -> list[tuple[bytes, float]] | None:
    """Interpret the replies of :func:`queue_range_query`, executed with errors collected.

    Errors are collected rather than raised so that WRONGTYPE keeps its
    plain message (``execute()`` would annotate it).

    Raises
    ------
    ImmutableKeyError
        If the key is not a mutable key.
    """
    kind = replies[0]
    if kind == b"none":
        return None
    if kind != b"zset":
        raise ImmutableKeyError(f"key {display_str(key)} is not a mutable key")
    for reply in replies[1:]:
        if isinstance(reply, Exception):
            raise reply
    return [split_timestamp(member) for member in itertools.chain(*replies[1:])]


def queue_record(pipe: Any, record: Record) -> int:
    """Queue the commands that store one RDB record; returns how many elements they carry.

    Large zsets and hashes are split into commands of at most
    :data:`LOAD_BATCH` elements.
    """
    key, key_type, value = record
    if key_type == KeyType.IMMUTABLE:
        assert isinstance(value, bytes)
        pipe.set(key, value)
        return 1
    if key_type == KeyType.MUTABLE:
        assert not isinstance(value, (bytes, dict))
        for members in member_chunks(value, LOAD_BATCH):
            pipe.execute_command("ZADD", key, *itertools.chain(*((0, m) for m in members)))
        return len(value)
    assert isinstance(value, dict)
    items = list(value.items())
    for i in range(0, len(items), LOAD_BATCH):
        pipe.execute_command("HSET", key, *itertools.chain(*items[i : i + LOAD_BATCH]))
    return len(items)


def parse_update_message(key: bytes, key_type: KeyType, data: bytes) -> KeyUpdateBase:
    """Turn the payload of an ``update/<key>`` message (type byte removed) into an update.

    Raises
    ------
    ValueError
        If an indexed-key payload is malformed.
    """
    if key_type == KeyType.IMMUTABLE:
        return ImmutableKeyUpdate(key, data)
    if key_type == KeyType.MUTABLE:
        value, timestamp = split_timestamp(data)
        return MutableKeyUpdate(key, value, timestamp)
    newline = data.find(b"\n")
    if newline < 0:
        raise ValueError(f"update message for {display_str(key)} lacks the sub-key length")
    length = int(data[:newline])
    start = newline + 1
    return IndexedKeyUpdate(key, data[start : start + length], data[start + length :])


def update_message(key_type: KeyType, payload: bytes, sub_key: bytes | None = None) -> bytes:
    """The ``update/<key>`` message for a write, as the Lua scripts here publish it.

    `payload` is the value (immutable, indexed) or the packed member (mutable).
    """
    if key_type == KeyType.INDEXED:
        assert sub_key is not None
        return b"\x03%d\n%b%b" % (len(sub_key), sub_key, payload)
    return bytes([key_type.value]) + payload


class RedisCallback(BackendCallback):
    """RDB callback (see :func:`telstate.rdb_reader.load_from_file`) that writes to Redis.

    Each key is written with one command as it ends (SET, ZADD or HSET) to
    a redis-py compatible `client`. Kept for katsdptelstate's callback API;
    :meth:`RedisBackend.load_from_file` is the fast way to load a file (it
    pipelines, and refuses to write to a replicator's mirror).
    """

    def __init__(self, client: redis.Redis) -> None:
        super().__init__()
        self.client = client
        self._zset: dict[bytes, float] = {}
        self._hash: list[bytes] = []

    def set(self, key: bytes, value: bytes, expiry: Any, info: dict) -> None:
        self.client.set(key, value)
        self.n_keys += 1

    def start_sorted_set(self, key: bytes, length: int, expiry: Any, info: dict) -> None:
        self._zset = {}
        self.n_keys += 1

    def zadd(self, key: bytes, score: float, member: bytes) -> None:
        self._zset[member] = score

    def end_sorted_set(self, key: bytes) -> None:
        self.client.zadd(key, self._zset)
        self._zset = {}

    def start_hash(self, key: bytes, length: int, expiry: Any, info: dict) -> None:
        self._hash = []
        self.n_keys += 1

    def hset(self, key: bytes, field: bytes, value: bytes) -> None:
        self._hash += (field, value)

    def end_hash(self, key: bytes) -> None:
        # Fields and values flat, as the command takes them: no dict to build.
        self.client.execute_command("HSET", key, *self._hash)
        self._hash = []
