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

A rebuild never shows readers a partial mirror: the new mirror is built
in a spare database and swapped with the mirror (SWAPDB) in the script
that marks the cursor READY, so readers see the old mirror until the new
one is complete, then the new one, on the connections they already have.
Then an update for every key wakes the waiters (see :func:`wake_key`).

Mirrors on one server may share a spare database (the default), but only
one at a time rebuilds in it: a rebuild's claim takes the spare's lock,
the hash :func:`spare_lock_key` (*n*) in the cursors' database naming the
mirror database and replicator, and every later step of the rebuild
checks that it still holds it; the swap releases it. A claim is refused
while another mirror's cursor says it is rebuilding in that spare, and
whenever the spare is some mirror's database (it has a cursor). A lock
whose mirror is no longer rebuilding there (a replicator that died, or
moved to another spare) is stale: the next claim takes it and empties
what that rebuild left. A spare holding keys without a lock, other than
this mirror's own interrupted rebuild, is never touched. While a rebuild
fills the spare, the old mirror's key count is not checked: a client
writing to it cannot hold the rebuild up, and the swap drops its write.

Every key a script touches is passed in KEYS (operations name their key by
its index there), as Redis ACLs and cluster tooling expect; the cursor's
hash is KEYS[1], though it lives in another database.

The sink is a small state machine, advanced by :meth:`RedisSink.step`::

    CONNECT  --cursor consistent with the store-->   TAIL  (applies batches)
    CONNECT, TAIL  --mirror not as expected-->       REBUILD --loaded, swapped in--> TAIL
    CONNECT, TAIL  --claimed by another replicator--> CONFLICT --cursor gone--> CONNECT
    CONFLICT  --the other's cursor names another promotion than the recorded one--> CONNECT
    any state  --Redis failed, spare db in use-->    BACKOFF --delay over--> CONNECT
    any state but BACKOFF  --store lacks the recorded promotion--> FENCED (for good)

A replicator claims the mirror when it starts (rebuilding it if it does
not match the store). After that it never takes the mirror from another
replicator: finding itself displaced it stops writing (CONFLICT) until the
cursor is gone, and says so in the log.

After a follower's promotion, the promoted store's replicator records its
promote event before it claims the mirror (:mod:`replicator.promotion`);
a replicator whose store lacks that event (the old primary) is FENCED: it
never writes the mirror again, and above all never rebuilds it from its
own, abandoned history. Every call of :data:`_APPLY` names the promotion
its replicator knows (the one recorded, which its store holds) and
changes nothing if the promotion hash records another: the check is
atomic with the step, so once a promotion is recorded (again, if Redis
forgot it) no step of the old primary's replicator, and no reply sent
with one, goes through; the refused replicator reads the hash and is
FENCED. An idle replicator reads the hash at each check of its cursor.
Every claim and step also writes the promotion its replicator knows in
the mirror's cursor (:mod:`replicator.cursor`). The promoted store's
replicator takes the mirror over even after it has claimed it once, from
a replicator whose cursor names another promotion (the old primary's,
which Redis let claim the mirror after forgetting the promotion, whatever
its seq): it does not wait in CONFLICT for a replicator that is fenced. A
cursor that names the recorded promotion is of a copy of the promoted
store (a follower or backup of it with its own replicator, lagging or
diverged): the displaced replicator waits in CONFLICT, as for any other.
"""

from __future__ import annotations

import enum
import itertools
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import hiredis
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from telstate.errors import StoreError
from telstate.log import Event, Op
from telstate.redis import MIRROR_CURSOR_DB, is_permission_error, mirror_cursor_key, update_message
from telstate.remote import Wire, WireScript, checked
from telstate.utils import KeyType, ensure_str, pack_timestamp

from .acl import (
    AclError,
    Protection,
    check_protection,
    setup_client_rules,
    setup_follower_rules,
)
from .connection import connect, redact_url
from .cursor import Cursor, MirrorState, read_cursor
from .promotion import (
    DamagedPromotion,
    Promotion,
    PromotionScan,
    promotion_key,
    promotion_tag,
    promotion_token,
    read_promotion,
    record_promotion,
)
from .source import EventSource

logger = logging.getLogger(__name__)

#: Database in which a rebuild builds the new mirror unless told otherwise.
DEFAULT_SPARE_DB = 14

# Operation codes of the script, each followed by the index of its key in
# KEYS and its arguments. Tailing applies events to the mirror and
# publishes them; a rebuild fills the spare database silently.
#   S key value        SET, publish     Z key member        ZADD, publish
#   H key sub value    HSET, publish    U key               UNLINK
#   F                  FLUSHDB ASYNC    W                   swap spare and mirror
#   s key value        SET              z key n member*n    ZADD each member
#   h key n (sub value)*n  HSET each field
#   M key n member*n   ZADD the members (in ZADD calls of up to 1000: Lua's
#                      unpack is limited to about 8000 values), publish each
_SET, _ZADD, _HSET, _UNLINK, _FLUSH, _SWAP = b"S", b"Z", b"H", b"U", b"F", b"W"
_ZADD_MANY = b"M"
_LOAD_STRING, _LOAD_ZSET, _LOAD_HASH = b"s", b"z", b"h"

_APPLY = b"""
-- KEYS[1]: the cursor hash, in database ARGV[1]; KEYS[2]: the lock of the
-- spare database (same database); KEYS[3]: the cursor the spare database
-- would have if it were a mirror; KEYS[4]: the cursor of the mirror that
-- held the spare's lock when the caller looked (KEYS[1] if none); KEYS[5]:
-- the mark, set by the swap, that the mirror's waiters are yet to be woken;
-- KEYS[6]: the promotion hash (same database, see replicator.promotion);
-- KEYS[7], ...: the keys that the operations name (by their index in KEYS).
-- ARGV[2]: the mirror database; ARGV[3]: the target of the operations, the
-- mirror or (during a rebuild) the spare database.
-- ARGV[4]: 'check' (go on only if the cursor has owner, store, seq, state
-- ARGV[5..8]; then, when the target is the mirror, if the cursor's key
-- count equals the mirror's DBSIZE; when it is the spare, if this mirror
-- (and owner) holds the spare's lock and the spare's DBSIZE is the
-- cursor's spare key count) or 'claim' (replace the cursor; a spare target
-- is locked for owner ARGV[5], see the module docstring).
-- ARGV[9]: the chain of the promotion the caller knows ('' for none): in
-- either mode nothing is done unless the promotion hash records that one,
-- so that a daemon whose store lacks a promotion recorded since (the old
-- primary) never moves the mirror again, nor has replies sent with its steps.
-- ARGV[10]: number n of cursor field/value arguments ARGV[11..10+n]; the
-- operations follow.
-- Returns {1, mirror keys, target keys, ''} once applied, or {0, ...,
-- reason} if the check failed, {-1, ..., reason} if the spare is not free,
-- {-2, ..., reason} if the spare's lock changed since the caller looked,
-- {-3, ..., reason} if the promotion recorded is not the caller's.
local mirror, target = ARGV[2], ARGV[3]
local rebuild = target ~= mirror
-- A tailing step (on the mirror) spares the calls about the spare, and the
-- SELECTs that would not change the database: it reads the cursor, works in
-- the mirror, then moves the cursor. (Each call a script makes costs Redis
-- about as much as a small command's own work; so does each number passed
-- to one, which Lua formats: the constants are given as strings.)
local selected
local function select(db)
    if db ~= selected then
        redis.call('SELECT', db)
        selected = db
    end
end
select(ARGV[1])
if (redis.call('HGET', KEYS[6], 'chain') or '') ~= ARGV[9] then
    return {-3, 0, 0, 'a promotion was recorded that this replicator does not know'}
end
local c, lock, target_size
if rebuild then
    c = redis.call('HMGET', KEYS[1], 'owner', 'store', 'seq', 'state', 'keys', 'spare',
                   'spare_keys')
    lock = redis.call('HMGET', KEYS[2], 'mirror', 'owner')
    select(target)
    target_size = redis.call('DBSIZE')
else
    c = redis.call('HMGET', KEYS[1], 'owner', 'store', 'seq', 'state', 'keys')
end
select(mirror)
local size = redis.call('DBSIZE')
target_size = target_size or size
if ARGV[4] == 'check' then
    if c[1] ~= ARGV[5] or c[2] ~= ARGV[6] or c[3] ~= ARGV[7] or c[4] ~= ARGV[8] then
        return {0, size, target_size, 'its cursor changed'}
    end
    if rebuild then
        if lock[1] ~= mirror or lock[2] ~= ARGV[5] then
            return {0, size, target_size, 'it lost the lock on spare database ' .. target}
        end
        if tonumber(c[7]) ~= target_size then
            return {0, size, target_size, 'spare database ' .. target .. ' has ' .. target_size
                    .. ' keys where the cursor says ' .. tostring(c[7])}
        end
    elseif tonumber(c[5]) ~= size then
        return {0, size, target_size, 'it has ' .. size .. ' keys where the cursor says '
                .. tostring(c[5])}
    end
else
    select(ARGV[1])
    if rebuild then
        if redis.call('EXISTS', KEYS[3]) == 1 then
            return {-1, size, target_size, 'is the database of another mirror (it has a cursor)'}
        end
        local holder = KEYS[1]
        if lock[1] then
            holder = (string.gsub(KEYS[1], '%d+$', lock[1]))
        end
        if holder ~= KEYS[4] then
            return {-2, size, target_size, 'changed hands while this replicator looked'}
        end
        if lock[1] and lock[1] ~= mirror then
            local other = redis.call('HMGET', holder, 'state', 'spare')
            if other[1] == 'rebuilding' and other[2] == target then
                return {-1, size, target_size, 'is in use by the rebuild of mirror database '
                        .. lock[1] .. ' (replicator ' .. tostring(lock[2]) .. ')'}
            end
        end
        -- Keys in the spare may be emptied if a rebuild left them: one that
        -- held the lock (this mirror's, or another's that no longer runs),
        -- or, for a lock-less cursor of before, this mirror's.
        if target_size > 0 and not lock[1] and c[6] ~= target then
            return {-1, size, target_size, 'holds keys that are not a rebuild of a mirror'}
        end
        redis.call('HSET', KEYS[2], 'mirror', mirror, 'owner', ARGV[5])
    end
    redis.call('DEL', KEYS[1])
end
local swapped = false
select(target)
local n = tonumber(ARGV[10])
local i = 11 + n
while i <= #ARGV do
    local op = ARGV[i]
    if op == 'F' then
        redis.call('FLUSHDB', 'ASYNC')
        i = i + 1
    elseif op == 'W' then
        -- The spare becomes the mirror in one step; the old mirror, now in
        -- the spare's place, is dropped.
        redis.call('SWAPDB', mirror, target)
        redis.call('FLUSHDB', 'ASYNC')
        swapped = true
        i = i + 1
    else
        local key = KEYS[tonumber(ARGV[i + 1])]
        if op == 'Z' then
            redis.call('ZADD', key, '0', ARGV[i + 2])
            redis.call('PUBLISH', 'update/' .. key, '\\2' .. ARGV[i + 2])
            i = i + 3
        elseif op == 'M' then
            local last = i + 2 + tonumber(ARGV[i + 2])
            local args = {}
            for j = i + 3, last do
                args[#args + 1] = '0'
                args[#args + 1] = ARGV[j]
                if #args >= 2000 then
                    redis.call('ZADD', key, unpack(args))
                    args = {}
                end
            end
            if #args > 0 then
                redis.call('ZADD', key, unpack(args))
            end
            for j = i + 3, last do
                redis.call('PUBLISH', 'update/' .. key, '\\2' .. ARGV[j])
            end
            i = last + 1
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
        elseif op == 's' then
            redis.call('SET', key, ARGV[i + 2])
            i = i + 3
        elseif op == 'z' then
            local last = i + 2 + tonumber(ARGV[i + 2])
            for j = i + 3, last do
                redis.call('ZADD', key, '0', ARGV[j])
            end
            i = last + 1
        elseif op == 'h' then
            local last = i + 2 + 2 * tonumber(ARGV[i + 2])
            for j = i + 3, last, 2 do
                redis.call('HSET', key, ARGV[j], ARGV[j + 1])
            end
            i = last + 1
        else
            return redis.error_reply('unknown replicator operation ' .. op)
        end
    end
end
local after = redis.call('DBSIZE')
local target_after = 0
if rebuild then
    target_after = after
    select(mirror)
    after = redis.call('DBSIZE')
end
select(ARGV[1])
if swapped then
    redis.call('DEL', KEYS[2])
    redis.call('SET', KEYS[5], after)
end
redis.call('HSET', KEYS[1], 'keys', after, 'spare_keys', target_after, unpack(ARGV, 11, 10 + n))
return {1, after, target_after, ''}
"""


# What the replicator needs besides the commands of _APPLY, tried without
# changing anything: a write in the cursors' database, SWAPDB (with itself),
# PUBLISH.
_PROBE = """
redis.call('SELECT', ARGV[1])
redis.call('DEL', KEYS[1])
redis.call('SELECT', ARGV[3])
redis.call('SWAPDB', ARGV[2], ARGV[2])
redis.call('PUBLISH', KEYS[1], '')
return 1
"""
_PROBE_KEY = b"telstate-replicator:probe"


# KEYS[1..6] of _APPLY are the cursor, the spare's lock, the cursors the
# claim looks at, the wake-up mark and the promotion hash; the operations'
# keys follow.
_FIXED_KEYS = 6

# The mirror that holds the lock of spare database KEYS[1] (in database ARGV[1]).
_READ_SPARE_LOCK = """
redis.call('SELECT', ARGV[1])
return redis.call('HGET', KEYS[1], 'mirror')
"""


# Whether the wake-up mark KEYS[1] (in database ARGV[1]) is set; with
# ARGV[2] 'done', clear it.
_WAKE_MARK = """
redis.call('SELECT', ARGV[1])
if ARGV[2] == 'done' then
    return redis.call('DEL', KEYS[1])
end
return redis.call('EXISTS', KEYS[1])
"""
# Keys read back from the mirror per round trip when waking its waiters.
_WAKE_BATCH = 1000


def wake_key(db: int) -> bytes:
    """Name of the key (in :data:`MIRROR_CURSOR_DB`) marking mirror `db`'s waiters as not woken.

    The swap that ends a rebuild sets it, and the replicator clears it once
    it has published an update for every key: a replicator that dies in
    between leaves it set, and the next one to resume the mirror wakes them.
    """
    return b"telstate-replicator:wake:%d" % db


def spare_lock_key(db: int) -> bytes:
    """Name of the hash (in :data:`MIRROR_CURSOR_DB`) that locks spare database `db`."""
    return b"telstate-replicator:spare:%d" % db


class _Operations:
    """The operations of one script call, each key sent once in KEYS and named by its index."""

    def __init__(self) -> None:
        self.keys: list[bytes] = []
        self.args: list[Any] = []
        #: Rough number of bytes of keys and values, to bound a call's size.
        self.size = 0
        self._index: dict[bytes, int] = {}

    def __len__(self) -> int:
        return len(self.args)

    def add(self, code: bytes, key: bytes, *args: Any) -> None:
        """Append an operation on `key`."""
        index = self._index.get(key)
        if index is None:
            self.keys.append(key)
            index = self._index[key] = len(self.keys) + _FIXED_KEYS
            self.size += len(key)
        self.args += (code, index, *args)
        self.size += _size(args)

    def add_keyless(self, code: bytes) -> None:
        """Append an operation on the whole target database (flush, swap)."""
        self.args.append(code)


#: Redis failures that mean "try again later", after a backoff: a connection's
#: (a reply that is not RESP too: a proxy, another service on the port). A
#: WRONGTYPE reply is not one: the mirror holds something the store never wrote.
_TRANSIENT = (
    redis.ConnectionError,
    redis.TimeoutError,
    OSError,
    redis.exceptions.InvalidResponse,
)


class SinkState(enum.Enum):
    """What the sink does on its next step."""

    CONNECT = "connect"
    REBUILD = "rebuild"
    TAIL = "tail"
    BACKOFF = "backoff"
    CONFLICT = "conflict"
    FENCED = "fenced"


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
    then
        The reply to the command given to :meth:`RedisSink.step` to send after
        the step's script (a :class:`redis.ResponseError` if it failed), or
        None if it was not sent (the step applied nothing).
    """

    applied: int
    wait: float = 0.0
    idle: bool = False
    then: Any = None


@dataclass(frozen=True)
class _Ahead:
    """A tailing step sent ahead (:meth:`RedisSink.send_ahead`), its answers not read yet."""

    ticket: int
    #: The mirror's cursor before the step.
    cursor: Cursor
    seq: int
    chain: str
    events: int
    #: The promotion the step wrote in the cursor.
    promotion: str


class RedisSink:
    """Projects a store's event log into one Redis database.

    Parameters
    ----------
    source
        The store.
    url
        ``redis://``, ``rediss://`` or ``unix://`` URL of the mirror,
        database number included (default 0). It may carry the
        credentials of the replicator's Redis user; they appear in no
        message (see :func:`~replicator.connection.redact_url`).
    password
        The password of the replicator's Redis user, if `url` does not carry it.
    spare_db
        Database in which a rebuild builds the new mirror, unseen by
        readers, before swapping it with the mirror in one step. It must
        be empty (or hold an interrupted rebuild) and used by nothing but
        replicators. Mirrors that share it rebuild one at a time (see the
        spare's lock above); one each lets them rebuild at once.
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
    client_user
        The Redis user that clients of the mirror connect as: each time
        the sink connects it checks (and logs) whether that user is kept
        from writing, see :mod:`replicator.acl`.
    acl_setup
        Give `client_user` the read-only rules each time the sink connects
        (needs a replicator user with ``@admin`` rights).
    accept_writes
        The replicator accepts writes: `acl_setup` lets `client_user` send
        write requests too (:data:`replicator.acl.WRITER_RULES`).
    follower_user
        The Redis user of followers: `acl_setup` gives it
        :data:`replicator.acl.FOLLOWER_RULES`.
    stop
        Set to make a rebuild give up between chunks (the daemon is stopping).

    Raises
    ------
    ValueError
        If the URL is invalid or names the database that holds the cursors,
        `spare_db` is the mirror's or the cursors' database, or a batch
        bound is less than 1.
    """

    def __init__(
        self,
        source: EventSource,
        url: str,
        *,
        password: str | None = None,
        spare_db: int = DEFAULT_SPARE_DB,
        batch_events: int = 5000,
        batch_bytes: int = 8 << 20,
        check_interval: float = 1.0,
        backoff: tuple[float, float] = (0.1, 10.0),
        socket_timeout: float = 10.0,
        client_user: str = "default",
        acl_setup: bool = False,
        accept_writes: bool = False,
        follower_user: str | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        if batch_events < 1 or batch_bytes < 1:
            raise ValueError(
                f"batches need at least one event and one byte, not {batch_events} events"
                f" and {batch_bytes} bytes"
            )
        self.source = source
        #: The mirror's URL without its password, for messages.
        self.url = redact_url(url)
        # The state machine owns the retries: the client must fail fast.
        self.client, self.db = connect(
            url,
            password,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            retry=Retry(NoBackoff(), 0),
            client_name="telstate-replicator",
        )
        if spare_db in (self.db, MIRROR_CURSOR_DB) or spare_db < 0:
            self.client.close()
            raise ValueError(
                f"the spare database for rebuilds must be another than the mirror's ({self.db})"
                f" and the cursors' ({MIRROR_CURSOR_DB}), not {spare_db}"
            )
        self.spare_db = spare_db
        self.batch_events = batch_events
        self.batch_bytes = batch_bytes
        self.check_interval = check_interval
        self.backoff = backoff
        self.client_user = client_user
        self.acl_setup = acl_setup
        self.follower_user = follower_user
        self.accept_writes = accept_writes
        self.stop = stop or threading.Event()
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.state = SinkState.CONNECT
        #: What this replicator last wrote to (or found in) the mirror's cursor.
        self.cursor: Cursor | None = None
        #: Whether clients of the mirror are kept from writing it, as last checked.
        self.protection: Protection | None = None
        #: Why the sink is FENCED (None otherwise).
        self.fenced: str | None = None
        self._promotions = PromotionScan(source)
        # The promotion recorded for the mirror that this store holds, as the
        # scripts compare it (its chain, b"" for none; promotion_token): every script
        # call passes it, and changes nothing if the hash records another.
        self._promotion = b""
        self._known: Promotion | None = None
        # That promotion as the mirror's cursor names it: every claim and
        # step writes it there (see _superseded).
        self._tag = ""
        # The seq the promotion hash gave when last read (before the sink
        # recorded its own promotion, if it did), as the scripts compare it.
        self._read = b""
        self._key = mirror_cursor_key(self.db)
        # Every step of the mirror is this script: called over a Wire, it
        # costs a round trip and little Python (see telstate.remote.Wire).
        self._wire = Wire(self.client.connection_pool)
        self._apply_script = WireScript(self._wire, _APPLY)
        # The fixed KEYS of a tailing step's call (see _apply, _move).
        self._tail_keys = [
            self._key,
            spare_lock_key(self.db),
            mirror_cursor_key(self.db),
            self._key,
            wake_key(self.db),
            promotion_key(self.db),
        ]
        self._read_spare_lock = self.client.register_script(_READ_SPARE_LOCK)
        self._wake_mark = self.client.register_script(_WAKE_MARK)
        # Why the last script call changed nothing (a failed check, a spare not
        # free), and whether it was because another promotion was recorded.
        self._refusal = ""
        self._promotion_changed = False
        # Whether this process has owned the mirror: from then on a foreign
        # owner is a conflict, not something to take over.
        self._claimed = False
        self._delay = backoff[0]
        self._retry_at = 0.0
        # When the current run of failures began (None while all is well).
        self._failed_since: float | None = None
        #: Called (in the thread that steps the sink) once it is connected to
        #: Redis again after a failure, before it looks at the mirror: the
        #: daemon wakes its write intake then, which may still be waiting out
        #: a retry delay of its own (see Daemon).
        self.on_reconnect: Callable[[], None] | None = None
        self._next_check = 0.0
        # The tailing step sent ahead, its answers not read yet (see send_ahead).
        self._ahead: _Ahead | None = None
        self._tickets = itertools.count(1)
        #: What the last step sent ahead did, once settled: its ticket, the
        #: events it applied, the answer to its `then` (see :meth:`send_ahead`)
        #: and when that answer was read (monotonic time).
        self.settled: tuple[int, int, Any, float] | None = None
        #: Rebuilds started (by whichever thread steps the sink).
        self.rebuilds = 0

    @property
    def seq(self) -> int | None:
        """The last event the mirror holds, while the sink is tailing a complete mirror."""
        if self.state != SinkState.TAIL or self.cursor is None:
            return None
        return self.cursor.seq

    def step(
        self,
        then: tuple[Any, ...] | None = None,
        then_seq: int = 0,
        events: Sequence[Event] = (),
    ) -> Step:
        """Do the next piece of work; never raises for Redis failures.

        Parameters
        ----------
        then
            A command to send right after the step's script call, in the same
            write, if the step applies events to the mirror up to `then_seq`
            or beyond (Redis runs it
            after the script, whatever the script's outcome: it must check
            for itself what it relies on). The write intake sends its replies
            so, sparing them a round trip (see :mod:`replicator.intake`).
        events
            Events just committed by this process, in order, exactly as the
            log holds them (the write intake's). A tailing step takes the
            events it applies from them, without reading the log, as long as
            they are the very next ones after the mirror's cursor (see
            :meth:`_read_batch`).

        Returns
        -------
        What was done, and how long the caller may wait before the next step.
        """
        settled = self.settle()
        try:
            step = self._advance(then, then_seq, events)
        except (*_TRANSIENT, StoreError, AclError, redis.ResponseError) as error:
            step = self._failed(error)
        return replace(step, applied=step.applied + settled) if settled else step

    def send_ahead(
        self, then: tuple[Any, ...], then_seq: int, events: Sequence[Event]
    ) -> int | None:
        """Send a tailing step with `events`, and `then`, without waiting for the answers.

        For the write intake: the mirror's script (with its replies in
        `then`, as in :meth:`step`) runs in Redis while the intake commits
        its next batch. Only a step that applies the intake's own just
        committed `events` (the very next ones after the mirror's cursor),
        up to `then_seq`, in one script call is sent so; otherwise nothing
        is sent and the caller steps as usual.

        One step at most is ahead: the one before is settled first, and so
        is it by every other use of the mirror's connection (:meth:`step`,
        :meth:`close`). Until then :attr:`seq` stays where the mirror was
        known to be, and :attr:`sent_seq` says where it goes.

        Returns
        -------
        A ticket, or None if nothing was sent. Once the step is settled,
        :attr:`settled` holds the ticket, the events it applied (0 if the
        mirror refused them), the answer to `then` (None if it was lost) and
        when it was read.
        """
        self.settle()
        cursor = self.cursor
        if (
            self.state != SinkState.TAIL
            or cursor is None
            or not events
            or events[0].seq != cursor.seq + 1
            or events[-1].seq < then_seq
        ):
            return None
        batch = self._read_batch(cursor.seq, events)
        last = batch[-1]
        if last.seq < then_seq:
            return None  # more than one step's worth: the caller steps
        chain = last.chain.hex()
        keys, args = self._move_arguments(cursor, last.seq, chain, _event_operations(batch))
        try:
            self._wire.send(
                b"".join(
                    hiredis.pack_command(command)
                    for command in (self._apply_script.command(keys, args), then)
                )
            )
        except _TRANSIENT as error:
            self._fail(f"Redis at {self.url} failed: {error}")
            return None
        ticket = next(self._tickets)
        self._ahead = _Ahead(ticket, cursor, last.seq, chain, len(batch), self._tag)
        return ticket

    def settle(self) -> int:
        """Read the answers to the step sent ahead (see :meth:`send_ahead`), if one is.

        What it did goes to :attr:`settled`. Never raises for Redis failures:
        a lost answer counts as nothing applied (the next step finds out
        from the mirror's cursor what Redis did).

        Returns
        -------
        The events it applied.
        """
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return 0
        answered = time.monotonic()
        applied, answer = 0, None
        try:
            reply, answer = self._wire.receive(2)
            answered = time.monotonic()
            if isinstance(reply, redis.exceptions.NoScriptError):
                # Redis lost its scripts (restarted, SCRIPT FLUSH): nothing was
                # applied. Loaded now, since steps sent ahead cannot load it.
                checked(self._wire.call((b"SCRIPT", b"LOAD", self._apply_script.script))[0])
            else:
                done, after, _, reason = checked(reply)
                if self._moved(
                    ahead.cursor, ahead.seq, ahead.chain, ahead.promotion, done, after, reason
                ):
                    self._next_check = time.monotonic() + self.check_interval
                    applied = ahead.events
                else:
                    self._recheck()
        except (*_TRANSIENT, StoreError, AclError, redis.ResponseError) as error:
            self._failed(error)
        self.settled = (ahead.ticket, applied, answer, answered)
        return applied

    @property
    def sent_seq(self) -> int | None:
        """Where the mirror will be once the step sent ahead is settled (:attr:`seq` if none is)."""
        if self._ahead is not None:
            return self._ahead.seq
        return self.seq

    def fileno(self) -> int | None:
        """The socket of the mirror's connection while a step is ahead (None if none is).

        It is readable once the step's answers come.
        """
        return None if self._ahead is None else self._wire.fileno()

    def _advance(
        self, then: tuple[Any, ...] | None, then_seq: int, events: Sequence[Event]
    ) -> Step:
        if self.state == SinkState.CONNECT:
            return self._connect()
        if self.state == SinkState.REBUILD:
            return self._rebuild()
        if self.state == SinkState.TAIL:
            return self._tail(then, then_seq, events)
        if self.state == SinkState.CONFLICT:
            return self._conflict()
        if self.state == SinkState.FENCED:
            return Step(0, wait=self.backoff[1])
        return self._backoff()

    def _failed(self, error: BaseException) -> Step:
        """The state after `error` (a Redis or store failure) in a step."""
        if isinstance(error, _TRANSIENT):
            return self._fail(f"Redis at {self.url} failed: {error}")
        if isinstance(error, StoreError):
            # E.g. a snapshot invalidated when this process followed the map's growth.
            return self._fail(f"reading the store failed: {error}")
        if isinstance(error, AclError):
            return self._fail(f"cannot protect mirror {self.url} db {self.db}: {error}")
        if "WRONGTYPE" in str(error):
            # Half applied, cursor unmoved: only a rebuild is certain to help.
            logger.warning("mirror holds a key of another type (%s): rebuilding", error)
            self.state = SinkState.REBUILD
            return Step(0)
        if isinstance(error, redis.ResponseError) and is_permission_error(error):
            return self._fail(
                f"Redis at {self.url} refused the replicator's user a command ({error}):"
                " the replicator needs a user with every right (ACL SETUSER"
                " telstate-replicator on >PASSWORD ~* &* +@all), given in the URL"
            )
        if str(error).startswith("BUSY"):
            # A client's script that runs on (EVAL is every reader's right).
            return self._fail(
                f"Redis at {self.url} is busy running a script ({error}); waiting for it"
            )
        return self._fail(f"Redis at {self.url} refused a command: {error}")

    def check_access(self) -> None:
        """Set up the clients' rules if asked, and check that this replicator may write.

        Call it before the first step, to stop at once on a setup that
        cannot work; Redis failures are left to :meth:`step`, which waits
        for the server.

        Raises
        ------
        AclError
            If `acl_setup` was asked for and cannot be done, or the
            replicator's own Redis user lacks a right it needs.
        ValueError
            If Redis refuses the databases (e.g. it has fewer than the
            spare's number).
        """
        try:
            self._setup_rules()
            self.client.eval(_PROBE, 1, _PROBE_KEY, MIRROR_CURSOR_DB, self.spare_db, self.db)
        except _TRANSIENT:
            return
        except redis.ResponseError as error:
            if not is_permission_error(error):
                # E.g. a server with fewer databases than the spare's number.
                raise ValueError(
                    f"Redis at {self.url} refused the replicator's first commands ({error});"
                    f" check the mirror's database ({self.db}) and --spare-db ({self.spare_db})"
                ) from error
            raise AclError(
                f"Redis at {self.url} refused the replicator's user a command it needs"
                f" ({error}): give the replicator a user with every right (ACL SETUSER"
                " telstate-replicator on >PASSWORD ~* &* +@all) in the URL"
            ) from error

    def close(self) -> None:
        """Close the connections to Redis (a step sent ahead is not waited for)."""
        self._ahead = None
        self._wire.close()
        self.client.close()

    def _setup_rules(self) -> None:
        """With `acl_setup`, give the clients' (and the followers') users their rules."""
        if self.acl_setup:
            setup_client_rules(self.client, self.client_user, self.accept_writes)
            if self.follower_user is not None:
                setup_follower_rules(self.client, self.follower_user)

    # The states

    def _connect(self) -> Step:
        self._setup_rules()
        protection = check_protection(self.client, self.client_user)
        if protection != self.protection:
            self.protection = protection
            if protection.protected:
                logger.info(
                    "mirror %s db %d is protected: %s", self.url, self.db, protection.detail
                )
            else:
                logger.warning(
                    "mirror %s db %d is not protected (%s): a client's write would be"
                    " accepted, then lost at the next rebuild. Run with --acl-setup (as a"
                    " user with @admin rights), or see the README on protecting the mirror",
                    self.url,
                    self.db,
                    protection.detail,
                )
        if self._fence():
            return Step(0, wait=self.backoff[1])
        size, found = read_cursor(self.client)
        if self._failed_since is not None:
            logger.info(
                "Redis at %s is back after %.1f s",
                self.url,
                time.monotonic() - self._failed_since,
            )
            self._failed_since = None
            if self.on_reconnect is not None:
                self.on_reconnect()
        self._delay = self.backoff[0]
        self._reconcile(size, found)
        if self.state == SinkState.TAIL and self._wake_mark(
            keys=[wake_key(self.db)], args=[MIRROR_CURSOR_DB, "check"]
        ):
            logger.info(
                "waking the waiters of mirror %s db %d after its rebuild", self.url, self.db
            )
            self._wake_waiters()
        return Step(0)

    def _tail(
        self,
        then: tuple[Any, ...] | None = None,
        then_seq: int = 0,
        committed: Sequence[Event] = (),
    ) -> Step:
        cursor = self.cursor
        assert cursor is not None
        events = self._read_batch(cursor.seq, committed)
        if not events:
            now = time.monotonic()
            if now >= self._next_check:
                self._next_check = now + self.check_interval
                if self._promotion_moved() and self._fence():
                    return Step(0, wait=self.backoff[1])
                size, found = read_cursor(self.client)
                if size != cursor.keys or found != cursor:
                    self._reconcile(size, found)
                    return Step(0)
            return Step(0, wait=max(0.0, self._next_check - now), idle=True)
        ops = _event_operations(events)
        last = events[-1]
        if last.seq < then_seq:
            then = None  # a later step's events reach it
        applied, answer = self._move(cursor, last.seq, last.chain.hex(), ops, then)
        if not applied:
            return replace(self._recheck(), then=answer)
        self._next_check = time.monotonic() + self.check_interval
        return Step(len(events), then=answer)

    def _rebuild(self) -> Step:
        """Build the store's current state in the spare database, then swap it in.

        Readers of the mirror go on seeing the old mirror, complete, until
        the swap (one script call, with the cursor's move to READY); then
        they see the new one, complete. The cursor says REBUILDING (and
        names the spare) in the meantime, so a rebuild cut short (crash,
        Redis failure, stop) is started again by the next CONNECT, which
        empties the spare first.
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
                spare=self.spare_db,
                promotion=self._tag,
            )
            logger.info(
                "rebuilding mirror %s db %d from store %s at seq %d in spare db %d",
                self.url,
                self.db,
                cursor.store,
                cursor.seq,
                self.spare_db,
            )
            started = time.monotonic()
            self.rebuilds += 1
            flush = _Operations()
            flush.add_keyless(_FLUSH)
            if not self._apply("claim", None, cursor, flush, self.spare_db)[0]:
                if self._promotion_changed:
                    return self._recheck()
                return self._fail(
                    f"database {self.spare_db} of {self.url}, the spare for rebuilds,"
                    f" {self._refusal}: wait, empty it, or give this replicator another"
                    " (--spare-db; each mirror on a server should have its own)"
                )
            self._claimed = True
            ops = _Operations()
            count = 0
            for record in snapshot.records():
                count += 1
                for load in _record_ops(*record, self.batch_events, self.batch_bytes):
                    # Sent before it would grow past a bound with this piece.
                    if len(ops) >= 4 * self.batch_events or (
                        len(ops) and ops.size + _size(load) > self.batch_bytes
                    ):
                        if self.stop.is_set() or not self._load(ops):
                            return Step(0)
                        ops = _Operations()
                    ops.add(*load)
            assert self.cursor is not None
            ready = replace(self.cursor, state=MirrorState.READY, spare=None)
            ops.add_keyless(_SWAP)
            if not self._apply("check", self.cursor, ready, ops, self.spare_db)[0]:
                return self._recheck()
            self.state = SinkState.TAIL
            self._next_check = time.monotonic() + self.check_interval
            self._wake_waiters()
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
        if self._fence():
            return Step(0, wait=self.backoff[1])
        _, found = read_cursor(self.client)
        if found is None or found.owner == self.owner or self._superseded(found):
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

    def _fence(self) -> bool:
        """Check the promotion recorded for the mirror, and record the store's own if newer.

        Returns
        -------
        True if the store lacks the recorded promotion: the sink is then
        FENCED and never writes the mirror again.
        """
        try:
            recorded = read_promotion(self.client, self.db)
            refusal = None if recorded is None else recorded.refusal(self.source)
        except DamagedPromotion as error:
            recorded, refusal = None, str(error)
        self._read = promotion_token(recorded)
        if refusal is not None:
            logger.error("refused mirror %s db %d: %s", self.url, self.db, refusal)
            self.fenced = refusal
            self.state = SinkState.FENCED
            return True
        mine = self._promotions.latest(after=recorded)
        if mine is not None and record_promotion(self.client, self.db, mine, recorded):
            logger.info(
                "recorded the promotion of store %s at seq %d for mirror %s db %d: the old"
                " primary may no longer update it",
                mine.store,
                mine.seq,
                self.url,
                self.db,
            )
            recorded = mine
        # (If another was recorded meanwhile, the next script call is refused,
        # and the sink looks again.)
        self._known = recorded
        self._tag = promotion_tag(recorded)
        self._promotion = promotion_token(recorded)
        return False

    def _promotion_moved(self) -> bool:
        """Whether the promotion hash records another promotion than the one the sink knows.

        One read, for the idle sink's periodic check: an old primary's
        daemon that holds the mirror while no write comes notices a
        promotion recorded since (again, if Redis forgot it) without a step
        of the mirror being refused first.
        """
        try:
            recorded = read_promotion(self.client, self.db)
        except DamagedPromotion:
            return True
        return promotion_token(recorded) != self._promotion

    def _superseded(self, found: Cursor) -> bool:
        """Whether another replicator's cursor `found` is of a history this store's promotion ended.

        True if the promotion recorded for the mirror is one this store
        holds, and `found` (of the same store) names another promotion than
        that one: its writer knew none, or an older one (the old primary's
        daemon, which Redis let claim the mirror after forgetting the
        promotion: fenced, or about to be, since its next step is refused).
        This replicator then takes the mirror over. A cursor that names the
        recorded promotion is of a copy of this store's own promoted history
        (a follower or backup of it, lagging or diverged): never taken over,
        whatever its seq. A cursor written before cursors named their
        promotion is read by its history: taken over if it ends before the
        promote event or its chain there is not this store's; one ahead of
        this store's log is left alone (it may be a copy further ahead).
        """
        known = self._known
        if known is None or known.store != str(self.source.uuid) or found.store != known.store:
            return False
        if found.promotion is not None:
            return found.promotion != self._tag
        if found.seq < known.seq:
            return True
        try:
            return self.source.chain_at(found.seq).hex() != found.chain
        except ValueError:  # ahead of this store's log
            return False

    @property
    def promotion(self) -> bytes | None:
        """The promotion recorded for the mirror that this store holds, as its chain (b"" for none).

        None once the sink is FENCED. The write intake passes it to its
        replies' script, which sends nothing if the promotion hash records
        another (see :mod:`replicator.intake`).
        """
        return None if self.fenced is not None else self._promotion

    def _fail(self, message: str) -> Step:
        logger.warning("%s; retrying in %.1f s", message, self._delay)
        if self._failed_since is None:
            self._failed_since = time.monotonic()
        self.state = SinkState.BACKOFF
        self._retry_at = time.monotonic() + self._delay
        wait = self._delay
        self._delay = min(self._delay * 2, self.backoff[1])
        return Step(0, wait=wait)

    def _recheck(self) -> Step:
        """A checked step found the mirror elsewhere than expected: find out where it is.

        The promotion hash first: a step refused because a promotion was
        recorded that this store lacks fences the sink. A step refused for
        the promotion while the hash, read again, gives the very promotion
        the step named (the script and the parser disagree on it) waits
        the longest delay of a failure: stepping again soon would be
        refused again.

        Returns
        -------
        The step to return (its wait).
        """
        named, refused = self._promotion, self._promotion_changed
        self._promotion_changed = False
        if self._fence():
            return Step(0, wait=self.backoff[1])
        if refused and self._read == named:
            # Not a Redis failure: no quick retry (connecting resets the delay).
            self._delay = self.backoff[1]
            return self._fail(
                f"mirror {self.url} db {self.db} refused a step for its promotion hash"
                f" ({ensure_str(promotion_key(self.db))!r}), which records the promotion"
                f" the step named ({ensure_str(named) or 'none'}): another replicator of"
                " the promoted store recorded it again meanwhile (Redis lost it), or"
                " something else than a replicator writes it"
            )
        size, found = read_cursor(self.client)
        self._reconcile(size, found)
        return Step(0)

    def _reconcile(self, size: int, found: Cursor | None) -> None:
        """Choose the next state from the mirror's cursor and key count."""
        if found is not None and found.owner != self.owner and self._claimed:
            if self._fence():
                return  # displaced by the daemon of a promoted follower
            if not self._superseded(found):
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
            # Continued (its cursor is a prefix of this store's history) or rebuilt below.
            logger.warning(
                "mirror %s db %d is held by replicator %s of the store at %s:%s, at seq %d"
                " of a history that this store's promotion (seq %d) ended: the old"
                " primary's daemon, refused from now on; taking the mirror over",
                self.url,
                self.db,
                found.owner,
                found.host,
                found.path,
                found.seq,
                self._known.seq if self._known is not None else 0,
            )
        reason = self._mismatch(size, found)
        if reason is not None:
            logger.warning("mirror %s db %d must be rebuilt: %s", self.url, self.db, reason)
            self.state = SinkState.REBUILD
            return
        assert found is not None
        if found.owner != self.owner or found.promotion != self._tag:
            mine = replace(
                found,
                owner=self.owner,
                host=socket.gethostname(),
                path=self.source.path,
                promotion=self._tag,
            )
            if not self._apply("check", found, mine, _Operations(), self.db)[0]:
                if self._promotion_changed:
                    self._recheck()  # fenced, or waits, or looks again
                    return
                self.state = SinkState.CONNECT  # changed in the meantime: look again
                return
            assert self.cursor is not None
            if found.owner != self.owner:
                logger.info(
                    "resuming mirror %s db %d of store %s after seq %d (chain %s matches)",
                    self.url,
                    self.db,
                    found.store,
                    found.seq,
                    found.chain[:16],
                )
            found = self.cursor
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
            if found.owner == self.owner and self._refusal:
                return f"this replicator's rebuild was cut short: {self._refusal}"
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

    def _read_batch(self, after_seq: int, committed: Sequence[Event] = ()) -> list[Event]:
        """The next events after `after_seq`, bounded by count and (roughly) by bytes.

        They are taken from `committed` (events just committed, in order,
        as the log holds them) if it holds event ``after_seq + 1``, and only
        as long as they follow one another: seqs are dense, so a gap is
        another commit in between (another process's), and the batch ends
        before it (the next reads it from the log). Otherwise they are read
        from the log.
        """
        events: list[Event] = []
        size = 0
        start = after_seq + 1 - committed[0].seq if committed else -1
        source: Iterable[Event]
        if 0 <= start < len(committed) and committed[start].seq == after_seq + 1:
            source = itertools.islice(committed, start, start + self.batch_events)
        else:
            source = self.source.events(after_seq + 1, after_seq + self.batch_events)
        expected = after_seq + 1
        for event in source:
            if event.seq != expected:
                break
            expected += 1
            events.append(event)
            size += len(event.value or b"") + len(event.key or b"")
            if event.values is not None:
                size += sum(map(len, event.values)) + 8 * len(event.values)
            if size >= self.batch_bytes:
                break
        return events

    def _load(self, ops: _Operations) -> bool:
        """Apply part of a rebuild to the spare; False if something changed behind its back."""
        assert self.cursor is not None
        if not self._apply("check", self.cursor, self.cursor, ops, self.spare_db)[0]:
            self._recheck()
            return False
        return True

    def _apply(
        self,
        mode: str,
        expected: Cursor | None,
        cursor: Cursor,
        ops: _Operations,
        target: int,
        then: tuple[Any, ...] | None = None,
    ) -> tuple[bool, Any]:
        """Run the script on `target` (the mirror or the spare), leaving `cursor` in Redis.

        `then`, if given, is sent right after the script, in the same write.

        Returns
        -------
        Whether it was applied; if so :attr:`cursor` is `cursor` with the
        new key counts. False if the check failed (or, on a claim, the
        spare is not free), and why is in :attr:`_refusal`. Then the reply
        to `then` (None if none was given).
        """
        fields = cursor.fields()
        holder = self._key
        if expected is None:
            check: list[Any] = [self.owner, "", "", ""]
            if target != self.db:
                locked_by = self._read_spare_lock(
                    keys=[spare_lock_key(target)], args=[MIRROR_CURSOR_DB]
                )
                if locked_by is not None:
                    holder = mirror_cursor_key(int(locked_by))
        else:
            check = [expected.owner, expected.store, expected.seq, expected.state.value]
        keys = [
            self._key,
            spare_lock_key(target),
            mirror_cursor_key(target),
            holder,
            wake_key(self.db),
            promotion_key(self.db),
            *ops.keys,
        ]
        args = [
            MIRROR_CURSOR_DB,
            self.db,
            target,
            mode,
            *check,
            self._promotion,
            len(fields),
            *fields,
            *ops.args,
        ]
        done, after, target_after, reason, answer = self._call(keys, args, then)
        if done != 1:
            self._refusal = ensure_str(reason)
            self._promotion_changed = done == -3
            return False, answer
        self._refusal = ""
        self.cursor = replace(cursor, keys=int(after), spare_keys=int(target_after))
        return True, answer

    def _move(
        self,
        cursor: Cursor,
        seq: int,
        chain: str,
        ops: _Operations,
        then: tuple[Any, ...] | None,
    ) -> tuple[bool, Any]:
        """A tailing step: apply `ops` to the mirror and move `cursor` to `seq` and `chain`.

        The same call of the script as :meth:`_apply` (mode 'check', the
        mirror as target) makes, with fewer arguments: the cursor's fields
        other than seq and chain (and its promotion, if the sink knows
        another since) are not sent, since HSET would leave them as they
        are. The check finds the cursor's owner, store, seq and state as
        expected, and no one else writes the cursor of a mirror
        that this replicator owns, so its other fields are those of
        `cursor` (this replicator wrote them, or read them from the hash).
        """
        keys, args = self._move_arguments(cursor, seq, chain, ops)
        done, after, _, reason, answer = self._call(keys, args, then)
        return self._moved(cursor, seq, chain, self._tag, done, after, reason), answer

    def _moved(
        self,
        cursor: Cursor,
        seq: int,
        chain: str,
        promotion: str,
        done: Any,
        after: Any,
        reason: Any,
    ) -> bool:
        """Take the answer of a tailing step from `cursor` to `seq`: whether it was applied.

        If so :attr:`cursor` has moved on (naming `promotion`); if not, why
        is in :attr:`_refusal`.
        """
        if done != 1:
            self._refusal = ensure_str(reason)
            self._promotion_changed = done == -3
            return False
        self._refusal = ""
        self.cursor = cursor.moved(seq, chain, int(after), promotion)
        return True

    def _move_arguments(
        self, cursor: Cursor, seq: int, chain: str, ops: _Operations
    ) -> tuple[list[Any], list[Any]]:
        """The keys and arguments of :meth:`_move`'s script call.

        The cursor's promotion is sent too if the sink has come to know
        another since the cursor was written (a later one of its store).
        """
        if cursor.promotion != self._tag:
            fields: list[Any] = ["seq", seq, "chain", chain, "promotion", self._tag]
        else:
            fields = ["seq", seq, "chain", chain]
        args = [
            MIRROR_CURSOR_DB,
            self.db,
            self.db,
            "check",
            cursor.owner,
            cursor.store,
            cursor.seq,
            cursor.state.value,
            self._promotion,
            len(fields),
            *fields,
            *ops.args,
        ]
        return self._tail_keys + ops.keys, args

    def _call(
        self, keys: list[Any], args: list[Any], then: tuple[Any, ...] | None
    ) -> tuple[Any, Any, Any, Any, Any]:
        """Run :data:`_APPLY` (and `then` after it): its four replies, and the answer to `then`."""
        if then is None:
            done, after, target_after, reason = self._apply_script(keys=keys, args=args)
            return done, after, target_after, reason, None
        (done, after, target_after, reason), answer = self._apply_script.call_then(
            then, keys=keys, args=args
        )
        return done, after, target_after, reason, answer

    def _wake_waiters(self) -> None:
        """Publish an update for every key of the mirror (every sub-key of an indexed key).

        Called once a rebuild has been swapped in: each waiter looks at its
        key again. The updates carry what the mirror holds, read back from
        it, so that a replicator resuming a mirror whose waiters were never
        woken (see :func:`wake_key`) sends the same. Messages are sent in
        batches bounded by count and bytes, as events are.
        """
        with self.client.pipeline(transaction=False) as publish:
            queued = size = 0

            def send(key: bytes, message: bytes) -> None:
                nonlocal queued, size
                publish.publish(b"update/" + key, message)
                queued += 1
                size += len(key) + len(message)
                if queued >= self.batch_events or size >= self.batch_bytes:
                    publish.execute()
                    queued = size = 0

            keys = self.client.scan_iter(count=_WAKE_BATCH)
            while batch := list(itertools.islice(keys, _WAKE_BATCH)):
                with self.client.pipeline(transaction=False) as read:
                    for key in batch:
                        read.type(key)
                    kinds = read.execute()
                with self.client.pipeline(transaction=False) as read:
                    for key, kind in zip(batch, kinds):
                        if kind == b"string":
                            read.get(key)
                        elif kind == b"zset":
                            read.zrange(key, -1, -1)  # the newest sample
                    # A key deleted or replaced by another type since its TYPE was
                    # read (a client of an unprotected mirror, Redis restarted)
                    # gives None or an error: it has no waiter to wake with it.
                    values = iter(read.execute(raise_on_error=False))
                for key, kind in zip(batch, kinds):
                    if kind == b"string":
                        value = next(values)
                        if isinstance(value, bytes):
                            send(key, update_message(KeyType.IMMUTABLE, value))
                    elif kind == b"zset":
                        members = next(values)
                        for member in members if isinstance(members, list) else ():
                            send(key, update_message(KeyType.MUTABLE, member))
                    elif kind == b"hash":
                        try:
                            for sub_key, value in self.client.hscan_iter(key, count=_WAKE_BATCH):
                                send(key, update_message(KeyType.INDEXED, value, sub_key))
                        except redis.ResponseError as error:
                            if "WRONGTYPE" not in str(error):
                                raise
            publish.execute()
        self._wake_mark(keys=[wake_key(self.db)], args=[MIRROR_CURSOR_DB, "done"])


def _size(arguments: tuple[Any, ...]) -> int:
    """Bytes of the keys and values among `arguments` (roughly, what they cost to send)."""
    size = 0
    for argument in arguments:  # a loop: half the cost of sum() over a generator, per event
        if isinstance(argument, bytes):
            size += len(argument)
    return size


def _event_operations(events: Iterable[Event]) -> _Operations:
    """The operations that apply `events` to the mirror, in order."""
    ops = _Operations()
    for event in events:
        _append_event(ops, event)
    return ops


def _append_event(ops: _Operations, event: Event) -> None:
    """Add the script operations that apply `event` (and publish its update) to `ops`."""
    op = event.op
    if op is Op.ADD_MUTABLE:
        assert event.key is not None
        assert event.timestamp is not None and event.value is not None
        ops.add(_ZADD, event.key, pack_timestamp(event.timestamp) + event.value)
    elif op is Op.ADD_MUTABLE_MANY:
        # One ZADD of all the event's samples; an update is published for each.
        assert event.key is not None
        members = [pack_timestamp(timestamp) + value for value, timestamp in event.samples()]
        ops.add(_ZADD_MANY, event.key, len(members), *members)
    elif op is Op.SET_IMMUTABLE:
        assert event.key is not None
        ops.add(_SET, event.key, event.value)
    elif op is Op.SET_INDEXED:
        assert event.key is not None
        ops.add(_HSET, event.key, event.sub_key, event.value)
    elif op is Op.DELETE:
        assert event.key is not None
        ops.add(_UNLINK, event.key)
    elif op is Op.CLEAR:
        # The mirror database holds exactly the store's keys (every step
        # checks its key count), so flushing it removes telstate's keys only.
        ops.add_keyless(_FLUSH)
    # A promotion (Op.PROMOTE) changes no key: the cursor moves past it, nothing else.


def _record_ops(
    key: bytes, key_type: KeyType, value: Any, chunk: int, chunk_bytes: int
) -> Iterator[tuple[Any, ...]]:
    """The operations that load one key of the store's state, in pieces.

    A piece holds at most `chunk` values and, unless one value alone is
    larger, at most about `chunk_bytes` bytes: a script call must stay well
    within what Redis accepts in one request (client-query-buffer-limit).
    Yields ``(code, key, *arguments)`` for :meth:`_Operations.add`. Nothing
    is published: the key is loaded into the spare database, which no
    reader sees.
    """
    if key_type == KeyType.IMMUTABLE:
        yield _LOAD_STRING, key, value
        return
    entries: Iterable[tuple[bytes, ...]]
    if key_type == KeyType.MUTABLE:
        # Taken as they are read: a store's big key is never held whole.
        code, entries = _LOAD_ZSET, ((member,) for member in value)
    else:
        code, entries = _LOAD_HASH, value.items()
    part: list[tuple[bytes, ...]] = []
    size = 0
    for entry in entries:
        entry_size = sum(len(item) for item in entry)
        if part and (len(part) >= chunk or size + entry_size > chunk_bytes):
            yield (code, key, len(part), *itertools.chain.from_iterable(part))
            part, size = [], 0
        part.append(entry)
        size += entry_size
    if part:
        yield (code, key, len(part), *itertools.chain.from_iterable(part))
