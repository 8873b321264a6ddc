"""Redis sink: keeps one Redis database an exact mirror of a store, event by event.

The mirror has katsdptelstate's layout (see :mod:`telstate.redis`) and
every applied event publishes katsdptelstate's ``update/<key>`` message, so
``wait_key`` and ``wait_indexed`` work on the mirror for telstate and
katsdptelstate clients alike.

Every change to the mirror is one call of the Lua script :data:`_APPLY`,
which Redis runs atomically. The script first compares the mirror's cursor
(:mod:`replicator.cursor`) and key count with what this replicator expects,
and changes nothing if they differ; otherwise it applies the writes and
moves the cursor in the same step. So the cursor always names exactly the
events the mirror holds: a replicator killed at any instant resumes after
the cursor with no duplicate and no missing sample, and a mirror that
changed behind its back (Redis restarted empty, FLUSHDB, a write by someone
else, another store or another replicator) is noticed before anything is
written over it.

The sink is a small state machine, advanced by :meth:`RedisSink.step`::

    CONNECT  --cursor consistent with the store-->   TAIL  (applies batches)
    CONNECT, TAIL  --mirror not as expected-->       REBUILD --state loaded--> TAIL
    CONNECT, TAIL  --claimed by another replicator--> CONFLICT --cursor gone--> CONNECT
    any state  --Redis failed-->                     BACKOFF --delay over--> CONNECT

A replicator claims the mirror when it starts (rebuilding it if it does
not match the store). After that it never takes the mirror from another
replicator: finding itself displaced it stops writing (CONFLICT) until the
cursor is gone, and says so in the log.
"""

from __future__ import annotations

import enum
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from telstate.errors import StoreError
from telstate.log import Event, Op
from telstate.redis import MIRROR_CURSOR_DB, client_db, mirror_cursor_key
from telstate.utils import KeyType, pack_timestamp

from .cursor import Cursor, MirrorState, read_cursor
from .source import EventSource

logger = logging.getLogger(__name__)

# Operation codes of the script (each followed by its arguments):
#   S key value        SET, publish    Z key member      ZADD, publish
#   H key sub value    HSET, publish   U key             UNLINK
#   F                  FLUSHDB ASYNC   z key n member*n  ZADD each member, silently
_SET, _ZADD, _HSET, _UNLINK, _FLUSH, _LOAD_ZSET = b"S", b"Z", b"H", b"U", b"F", b"z"

_APPLY = b"""
-- KEYS[1]: the cursor hash, in database ARGV[1]; ARGV[2]: the mirror database.
-- ARGV[3]: 'check' (go on only if the cursor has owner, store, seq, state
-- ARGV[4..7] and its key count equals DBSIZE) or 'claim' (replace the cursor).
-- ARGV[8]: number n of cursor field/value arguments ARGV[9..8+n]; the
-- operations follow.
local size = redis.call('DBSIZE')
redis.call('SELECT', ARGV[1])
if ARGV[3] == 'check' then
    local c = redis.call('HMGET', KEYS[1], 'owner', 'store', 'seq', 'state', 'keys')
    if c[1] ~= ARGV[4] or c[2] ~= ARGV[5] or c[3] ~= ARGV[6] or c[4] ~= ARGV[7]
            or tonumber(c[5]) ~= size then
        return {0, size}
    end
else
    redis.call('DEL', KEYS[1])
end
redis.call('SELECT', ARGV[2])
local n = tonumber(ARGV[8])
local i = 9 + n
while i <= #ARGV do
    local op, key = ARGV[i], ARGV[i + 1]
    if op == 'Z' then
        redis.call('ZADD', key, 0, ARGV[i + 2])
        redis.call('PUBLISH', 'update/' .. key, '\\2' .. ARGV[i + 2])
        i = i + 3
    elseif op == 'S' then
        redis.call('SET', key, ARGV[i + 2])
        redis.call('PUBLISH', 'update/' .. key, '\\1' .. ARGV[i + 2])
        i = i + 3
    elseif op == 'H' then
        local sub, value = ARGV[i + 2], ARGV[i + 3]
        redis.call('HSET', key, sub, value)
        redis.call('PUBLISH', 'update/' .. key, '\\3' .. #sub .. '\\n' .. sub .. value)
        i = i + 4
    elseif op == 'U' then
        redis.call('UNLINK', key)
        i = i + 2
    elseif op == 'F' then
        redis.call('FLUSHDB', 'ASYNC')
        i = i + 1
    elseif op == 'z' then
        local last = i + 2 + tonumber(ARGV[i + 2])
        for j = i + 3, last do
            redis.call('ZADD', key, 0, ARGV[j])
        end
        i = last + 1
    else
        return redis.error_reply('unknown replicator operation ' .. op)
    end
end
local after = redis.call('DBSIZE')
redis.call('SELECT', ARGV[1])
redis.call('HSET', KEYS[1], 'keys', after, unpack(ARGV, 9, 8 + n))
return {1, after}
"""

# Redis failures that mean "try again later". A WRONGTYPE reply is not one
# of them: it means the mirror holds something the store never wrote.
_TRANSIENT = (redis.ConnectionError, redis.TimeoutError, OSError)


class SinkState(enum.Enum):
    """What the sink does on its next step."""

    CONNECT = "connect"
    REBUILD = "rebuild"
    TAIL = "tail"
    BACKOFF = "backoff"
    CONFLICT = "conflict"


@dataclass(frozen=True)
class Step:
    """What one :meth:`RedisSink.step` did.

    Attributes
    ----------
    applied
        Events newly reflected in the mirror (a rebuild counts the events it covers).
    wait
        Seconds the caller may let pass before the next step; 0 means step again now.
    idle
        The mirror is level with the log: new commits, not only time, call for a step.
    """

    applied: int
    wait: float = 0.0
    idle: bool = False


class RedisSink:
    """Projects a store's event log into one Redis database.

    Parameters
    ----------
    source
        The store.
    url
        ``redis://``, ``rediss://`` or ``unix://`` URL of the mirror,
        database number included (default 0).
    batch_events
        Most events applied in one step (one script call).
    batch_bytes
        Rough bound on the bytes of keys and values sent in one step.
    check_interval
        While idle, how often to check that the mirror still matches its cursor.
    backoff
        First and longest delay between attempts while Redis fails.
    socket_timeout
        Seconds to wait for Redis to answer before treating it as failed.
    stop
        Set to make a rebuild give up between chunks (the daemon is stopping).

    Raises
    ------
    ValueError
        If the URL is invalid or names the database that holds the cursors.
    """

    def __init__(
        self,
        source: EventSource,
        url: str,
        *,
        batch_events: int = 5000,
        batch_bytes: int = 8 << 20,
        check_interval: float = 1.0,
        backoff: tuple[float, float] = (0.1, 10.0),
        socket_timeout: float = 10.0,
        stop: threading.Event | None = None,
    ) -> None:
        self.source = source
        self.url = url
        # The state machine owns the retries: the client must fail fast.
        self.client = redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            retry=Retry(NoBackoff(), 0),
            client_name="telstate-replicator",
        )
        self.db = client_db(self.client)
        if self.db == MIRROR_CURSOR_DB:
            raise ValueError(
                f"{url}: database {MIRROR_CURSOR_DB} holds the replicators' cursors;"
                " choose another database for the mirror"
            )
        self.batch_events = batch_events
        self.batch_bytes = batch_bytes
        self.check_interval = check_interval
        self.backoff = backoff
        self.stop = stop or threading.Event()
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.state = SinkState.CONNECT
        #: What this replicator last wrote to (or found in) the mirror's cursor.
        self.cursor: Cursor | None = None
        self._key = mirror_cursor_key(self.db)
        self._apply_script = self.client.register_script(_APPLY)
        # Whether this process has owned the mirror: from then on a foreign
        # owner is a conflict, not something to take over.
        self._claimed = False
        self._delay = backoff[0]
        self._retry_at = 0.0
        # When the current run of failures began (None while all is well).
        self._failed_since: float | None = None
        self._next_check = 0.0

    @property
    def seq(self) -> int | None:
        """The last event the mirror holds, while the sink is tailing a complete mirror."""
        if self.state != SinkState.TAIL or self.cursor is None:
            return None
        return self.cursor.seq

    def step(self) -> Step:
        """Do the next piece of work; never raises for Redis failures.

        Returns
        -------
        What was done, and how long the caller may wait before the next step.
        """
        try:
            if self.state == SinkState.CONNECT:
                return self._connect()
            if self.state == SinkState.REBUILD:
                return self._rebuild()
            if self.state == SinkState.TAIL:
                return self._tail()
            if self.state == SinkState.CONFLICT:
                return self._conflict()
            return self._backoff()
        except _TRANSIENT as error:
            return self._fail(f"Redis at {self.url} failed: {error}")
        except StoreError as error:
            # E.g. a snapshot invalidated when this process followed the map's growth.
            return self._fail(f"reading the store failed: {error}")
        except redis.ResponseError as error:
            if "WRONGTYPE" in str(error):
                # Half applied, cursor unmoved: only a rebuild is certain to help.
                logger.warning("mirror holds a key of another type (%s): rebuilding", error)
                self.state = SinkState.REBUILD
                return Step(0)
            return self._fail(f"Redis at {self.url} refused a command: {error}")

    def close(self) -> None:
        """Close the connections to Redis."""
        self.client.close()

    # The states

    def _connect(self) -> Step:
        size, found = read_cursor(self.client)
        if self._failed_since is not None:
            logger.info(
                "Redis at %s is back after %.1f s",
                self.url,
                time.monotonic() - self._failed_since,
            )
            self._failed_since = None
        self._delay = self.backoff[0]
        self._reconcile(size, found)
        return Step(0)

    def _tail(self) -> Step:
        assert self.cursor is not None
        events = self._read_batch(self.cursor.seq)
        if not events:
            now = time.monotonic()
            if now >= self._next_check:
                self._next_check = now + self.check_interval
                size, found = read_cursor(self.client)
                if size != self.cursor.keys or found != self.cursor:
                    self._reconcile(size, found)
                    return Step(0)
            return Step(0, wait=max(0.0, self._next_check - now), idle=True)
        ops: list[Any] = []
        for event in events:
            _append_event(ops, event)
        last, chain = events[-1].seq, events[-1].chain.hex()
        after = self._apply("check", self.cursor, ["seq", last, "chain", chain], ops)
        if after is None:
            self._recheck()
            return Step(0)
        self.cursor = replace(self.cursor, seq=last, chain=chain, keys=after)
        self._next_check = time.monotonic() + self.check_interval
        return Step(len(events))

    def _rebuild(self) -> Step:
        """Replace the mirror by the store's current state, in chunks, under a REBUILDING cursor.

        A rebuild cut short (crash, Redis failure, stop) leaves the cursor
        REBUILDING, which the next CONNECT treats as inconsistent: it starts again.
        """
        with self.source.snapshot() as snapshot:
            cursor = Cursor(
                owner=self.owner,
                store=str(snapshot.uuid),
                seq=snapshot.seq,
                chain=snapshot.chain.hex(),
                state=MirrorState.REBUILDING,
                keys=0,
                host=socket.gethostname(),
                path=self.source.path,
            )
            logger.info(
                "rebuilding mirror %s db %d from store %s at seq %d",
                self.url,
                self.db,
                cursor.store,
                cursor.seq,
            )
            started = time.monotonic()
            self._apply("claim", None, cursor.fields(), [_FLUSH])
            self._claimed = True
            self.cursor = cursor
            ops: list[Any] = []
            size = 0
            count = 0
            for record in snapshot.records():
                count += 1
                for piece, piece_size in _record_ops(*record, self.batch_events):
                    ops += piece
                    size += piece_size
                    if len(ops) >= 4 * self.batch_events or size >= self.batch_bytes:
                        if self.stop.is_set() or not self._load(ops):
                            return Step(0)
                        ops = []
                        size = 0
            ready = replace(cursor, state=MirrorState.READY)
            after = self._apply("check", cursor, ["state", ready.state.value], ops)
            if after is None:
                self._recheck()
                return Step(0)
        self.cursor = replace(ready, keys=after)
        self.state = SinkState.TAIL
        self._next_check = time.monotonic() + self.check_interval
        logger.info(
            "mirror rebuilt: %d keys at seq %d in %.2f s",
            count,
            ready.seq,
            time.monotonic() - started,
        )
        return Step(ready.seq)

    def _conflict(self) -> Step:
        now = time.monotonic()
        if now < self._retry_at:
            return Step(0, wait=self._retry_at - now)
        _, found = read_cursor(self.client)
        if found is None or found.owner == self.owner:
            logger.info("mirror %s db %d is free again", self.url, self.db)
            self.state = SinkState.CONNECT
            return Step(0)
        self._retry_at = now + self.backoff[1]
        return Step(0, wait=self.backoff[1])

    def _backoff(self) -> Step:
        now = time.monotonic()
        if now < self._retry_at:
            return Step(0, wait=self._retry_at - now)
        self.state = SinkState.CONNECT
        return Step(0)

    # Transitions

    def _fail(self, message: str) -> Step:
        logger.warning("%s; retrying in %.1f s", message, self._delay)
        if self._failed_since is None:
            self._failed_since = time.monotonic()
        self.state = SinkState.BACKOFF
        self._retry_at = time.monotonic() + self._delay
        wait = self._delay
        self._delay = min(self._delay * 2, self.backoff[1])
        return Step(0, wait=wait)

    def _recheck(self) -> None:
        """A checked step found the mirror elsewhere than expected: find out where it is."""
        size, found = read_cursor(self.client)
        self._reconcile(size, found)

    def _reconcile(self, size: int, found: Cursor | None) -> None:
        """Choose the next state from the mirror's cursor and key count."""
        if found is not None and found.owner != self.owner and self._claimed:
            logger.error(
                "mirror %s db %d was taken over by replicator %s (store %s at %s:%s);"
                " not writing to it any more. Two replicators must not share a mirror:"
                " stop one, or restart this one to claim the mirror back",
                self.url,
                self.db,
                found.owner,
                found.store,
                found.host,
                found.path,
            )
            self.state = SinkState.CONFLICT
            self._retry_at = time.monotonic() + self.backoff[1]
            return
        reason = self._mismatch(size, found)
        if reason is not None:
            logger.warning("mirror %s db %d must be rebuilt: %s", self.url, self.db, reason)
            self.state = SinkState.REBUILD
            return
        assert found is not None
        if found.owner != self.owner:
            mine = replace(found, owner=self.owner)
            if self._apply("check", found, ["owner", self.owner], []) is None:
                self.state = SinkState.CONNECT  # changed in the meantime: look again
                return
            found = mine
            logger.info(
                "resuming mirror %s db %d of store %s after seq %d (chain %s matches)",
                self.url,
                self.db,
                found.store,
                found.seq,
                found.chain[:16],
            )
        self._claimed = True
        self.cursor = found
        self.state = SinkState.TAIL
        self._next_check = time.monotonic() + self.check_interval

    def _mismatch(self, size: int, found: Cursor | None) -> str | None:
        """Why the mirror cannot be continued from its cursor, or None if it can."""
        if found is None:
            return "it has no cursor (a new mirror, or Redis lost its data)"
        if found.store != str(self.source.uuid):
            return f"it holds store {found.store}, not {self.source.uuid}"
        if found.state != MirrorState.READY:
            return f"it was left {found.state.value}"
        last_seq = self.source.last_seq
        if found.seq > last_seq:
            return f"its cursor (seq {found.seq}) is ahead of the log (seq {last_seq})"
        if size != found.keys:
            return (
                f"it has {size} keys where its cursor says {found.keys}"
                " (flushed, or written by someone else)"
            )
        try:
            chain = self.source.chain_at(found.seq).hex()
        except ValueError:  # the log lost events since last_seq was read
            chain = None
        if chain != found.chain:
            return (
                f"its cursor's chain at seq {found.seq} ({found.chain[:16] or 'none'}) is not"
                f" the store's ({(chain or 'none')[:16]}): the store was restored from an older"
                " copy, rolled back, or holds another history since then"
            )
        return None

    # Talking to Redis

    def _read_batch(self, after_seq: int) -> list[Event]:
        """The next events after `after_seq`, bounded by count and (roughly) by bytes."""
        events: list[Event] = []
        size = 0
        for event in self.source.events(after_seq + 1, after_seq + self.batch_events):
            events.append(event)
            size += len(event.value or b"") + len(event.key or b"")
            if size >= self.batch_bytes:
                break
        return events

    def _load(self, ops: list[Any]) -> bool:
        """Apply part of a rebuild; False if the mirror was changed behind its back."""
        assert self.cursor is not None
        after = self._apply("check", self.cursor, [], ops)
        if after is None:
            self._recheck()
            return False
        self.cursor = replace(self.cursor, keys=after)
        return True

    def _apply(
        self, mode: str, expected: Cursor | None, fields: list[Any], ops: list[Any]
    ) -> int | None:
        """Run the script; return the mirror's new key count, or None if the check failed."""
        if expected is None:
            check: list[Any] = ["", "", "", ""]
        else:
            check = [expected.owner, expected.store, expected.seq, expected.state.value]
        done, after = self._apply_script(
            keys=[self._key],
            args=[MIRROR_CURSOR_DB, self.db, mode, *check, len(fields), *fields, *ops],
        )
        return int(after) if done else None


def _append_event(ops: list[Any], event: Event) -> None:
    """Add the script operations that apply `event` (and publish its update) to `ops`."""
    op = event.op
    if op is Op.ADD_MUTABLE:
        assert event.timestamp is not None and event.value is not None
        ops += (_ZADD, event.key, pack_timestamp(event.timestamp) + event.value)
    elif op is Op.SET_IMMUTABLE:
        ops += (_SET, event.key, event.value)
    elif op is Op.SET_INDEXED:
        ops += (_HSET, event.key, event.sub_key, event.value)
    elif op is Op.DELETE:
        ops += (_UNLINK, event.key)
    else:
        # The mirror database holds exactly the store's keys (every step
        # checks its key count), so flushing it removes telstate's keys only.
        ops.append(_FLUSH)


def _record_ops(
    key: bytes, key_type: KeyType, value: Any, chunk: int
) -> Iterator[tuple[list[Any], int]]:
    """The operations that load one key of the store's state, in pieces of about `chunk` values.

    Yields (operations, bytes) pairs. Each key also publishes one update
    (its value, its latest sample, or each sub-key) so that a client
    waiting on the mirror looks at the key again.
    """
    if key_type == KeyType.IMMUTABLE:
        yield [_SET, key, value], len(key) + len(value)
    elif key_type == KeyType.MUTABLE:
        members: list[bytes] = value
        for start in range(0, len(members), chunk):
            part = members[start : start + chunk]
            yield [_LOAD_ZSET, key, len(part), *part], len(key) + sum(map(len, part))
        latest = max(members)
        yield [_ZADD, key, latest], len(key) + len(latest)
    else:
        items = list(value.items())
        for start in range(0, len(items), chunk):
            ops: list[Any] = []
            size = 0
            for sub_key, sub_value in items[start : start + chunk]:
                ops += (_HSET, key, sub_key, sub_value)
                size += len(key) + len(sub_key) + len(sub_value)
            yield ops, size
