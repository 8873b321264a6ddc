"""Write intake: applies the write requests that clients send through the mirror.

With ``--accept-writes`` the daemon serves the request stream of its
mirror (the keys and the request format are those of
:mod:`telstate.remote`). One step of :class:`Intake`:

1. applies the requests read so far in ONE LMDB transaction (group
   commit: with ``fsync`` durability, the writers share one fsync),
   recording each request's outcome in the same transaction
   (:class:`telstate.lmdb.layout.RequestRecord`);
2. has the mirror project the new events at once (:meth:`Mirror.catch_up`),
   while the mirror's own thread is held off (:meth:`Mirror.hold`), and
   sends the batch's replies in the same write as the mirror's script
   call: Redis runs the replies' script right after the mirror's, and
   that script sends them only if the mirror's cursor then holds their
   events (a reply never goes out before the mirror shows the write, so
   a writer that returns can read its write back, and ``wait_key`` on
   other hosts has woken);
3. keeps the replies that did not go out so (the mirror could not take
   the events: rebuilding, Redis down) until the mirror holds their
   events, and sends them then.

The read of the next requests (a blocking XREADGROUP, over a connection
of its own) is sent right after the commit: before the mirror's script
if the batch held several requests (Redis then hands it the requests
already waiting before it runs the script, and the daemon commits them
meanwhile), after it if the batch held one (a lone writer's reply does
not wait behind the read's send). Redis holds it, and hands it the next
request the moment a writer sends one, while the daemon still hears back
from the mirror. :meth:`Intake.wait_for_requests` then only
takes its answer (after sending any replies still ready).

Nor does the intake wait for the mirror's script: the step is sent ahead
(:meth:`Mirror.send_ahead`) and its answers are read after the next
batch's commit, or when they come, if they come before new requests.
So Redis runs the mirror's and the replies' scripts while the daemon
commits the next batch (with ``fsync``, while it syncs). A reply still
never precedes the mirror: the replies' script checks the mirror's
cursor itself. If the mirror refused the step, or its answers were lost,
its replies are owed again, and go out once the mirror shows them.

So a writer's reply leaves Redis as soon as the mirror shows its write,
without waiting for the daemon to hear back from the mirror, and the
daemon waits for Redis only for new requests.

Exactly once: a request id found among the records is not applied again;
its recorded outcome is sent. The stream is read through a consumer
group, so requests delivered to a daemon that was killed before replying
are delivered again when it restarts (its pending list is read first),
and answered from their records if they were committed.

A request whose timeout has passed by the Redis server's clock (its
stream entry id is its sending time) is never applied: it gets an
``expired`` reply. It must also leave time for the commit and the reply,
so a request is applied only while :data:`APPLY_MARGIN` of its timeout
remains, and only while the mirror is complete (tailing the log): while
it is being rebuilt, or Redis failed, requests wait in Redis, since their
replies could not go out before the mirror is back. A request is judged
once its transaction has begun (a local writer may hold the store's write
lock meanwhile). (A mirror or daemon that fails between a commit and its
replies, or stalls there for longer than that margin, still leaves a
writer timed out on a write that is in the log.)

"Now" is the server's clock (TIME), never the entry ids: an id can only
say a request is younger than it is. A client may XADD with an id of
its choice, and from then on Redis stamps every request with at least
that time (so does a step back of the server's clock, for a while); a
request stamped so, waiting while the daemon is down, would never look
expired. So a request whose id is ahead of the server's clock by more
than :data:`CLOCK_TOLERANCE_MS` is not applied: it gets a ``clock``
error reply, recorded as an expiry is (a resend of it gets the same),
and is logged. One within the tolerance counts as sent now. As long as
the stream's last id is that far ahead, every new request would be
refused: so once every request in the stream is one it refused (before
their replies go out, so their writers cannot have sent again), the
intake deletes the stream and makes it anew with its group, in one
script (:data:`_RENEW`), and logs a warning. The requests sent while it
was ahead are all answered, none lost; writers that write again
afterwards are served as usual. (A request stamped while the ids were
ahead but read only once the server's clock had nearly caught up with
them, the daemon down meanwhile, still looks younger than it is: by up
to how far ahead they were.)

States, advanced by :meth:`Intake.step`::

    CONNECT --group and intake key made--> SERVE --Redis failed--> BACKOFF --delay over--> CONNECT
    SERVE --stream or group gone (Redis restarted empty)--> CONNECT
    SERVE --the store is a follower--> CONNECT (read-only from then on: see below)

Replies already owed when Redis fails are kept and sent once it is back.

A store that is, or becomes, a follower takes no writes (see
:mod:`telstate.lmdb.follower`). The intake then stops accepting them for
good (until the daemon restarts): it retires the intake key, so that new
clients of the mirror find it read-only at once, and answers each request
still sent by clients that started before (the failed batch's included,
read again from the pending list) with a ``readonly`` error, which the
client raises as the :exc:`~telstate.errors.ReadOnlyError` a local write
to a follower raises. A request applied before is still answered with
its recorded outcome.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import logging
import select
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import hiredis
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from telstate.encoding import PICKLE_ERROR, decode_value
from telstate.errors import (
    DecodeError,
    ImmutableKeyError,
    InvalidTimestampError,
    ReadOnlyError,
    StoreError,
)
from telstate.lmdb import LmdbBackend, WriteTxn
from telstate.lmdb.layout import REQUEST_PREFIX, RequestRecord
from telstate.lmdb.writes import follower_error
from telstate.log import Event, Op, Writer
from telstate.redis import MIRROR_CURSOR_DB, mirror_cursor_key
from telstate.remote import (
    MAX_TIMEOUT,
    OK,
    InvalidRequest,
    Reply,
    Request,
    Wire,
    WireScript,
    checked,
    control_kwargs,
    decode_request,
    entry_time_ms,
    intake_key,
    reply_stream_key,
    request_stream_key,
    stream_entries,
)

from .connection import connect
from .metrics import Metrics
from .promotion import promotion_key

logger = logging.getLogger(__name__)

#: The consumer group (and consumer) that reads a mirror's requests.
GROUP = b"telstate-replicator"
#: Fraction of its timeout that must remain for a request to be applied.
APPLY_MARGIN = 0.2
#: Longest a reply stream lives after its last reply (ms), beyond the client's timeout.
REPLY_TTL_MS = 60_000
#: Replies kept in a client's reply stream (it reads them in order).
REPLY_MAXLEN = 100
#: Requests retired by one XACK (and one XDEL) of the replies' script (Lua's
#: unpack takes a few thousand values at most).
RETIRE_SLICE = 1000
#: Request records are swept a few at a time, so no transaction scans them all.
SWEEP_CHUNK = 64
#: Seconds between sweeps (short, so that each pauses the intake briefly:
#: at 1000 requests a second, about 0.6 ms for the 3.6 million records kept).
SWEEP_INTERVAL = 0.1

#: Failures of a connection (a reply that is not RESP too: a proxy, another
#: service on the port): the daemon retries, after a backoff.
_TRANSIENT = (
    redis.ConnectionError,
    redis.TimeoutError,
    OSError,
    redis.exceptions.InvalidResponse,
)
#: Seconds between looks at whether an incomplete mirror is complete again,
#: while requests wait for it (see Intake._serve).
HOLD_WAIT = 0.05
#: Longest wait (ms) for new requests before looking again whether the
#: mirror's thread has read the answers of the step ahead.
_AHEAD_SLICE_MS = 5
#: Seconds between readings of the server's clock (between them it is
#: extrapolated with the monotonic clock).
CLOCK_SYNC = 1.0
#: How far (ms) a request's entry id may be ahead of the server's clock and
#: the request still be applied (as sent now). Well above the error of the
#: clock's extrapolation (drift over CLOCK_SYNC, a round trip), which is
#: checked with TIME before a request is refused; below the timeouts
#: writers use (seconds), since an id ahead hides that much of a request's age.
CLOCK_TOLERANCE_MS = 2000
#: Tries to make the request stream anew with only refused requests in it,
#: before it is made anew all the same (see Intake._renew_stream).
RENEW_TRIES = 3
#: A writer counts as active (its next request is expected within a
#: batch's wait, see Intake._gather) if it sent one within the last
#: ACTIVE_COMMITS transactions' durations (ACTIVE_MIN_S to ACTIVE_MAX_S
#: seconds): a writer in a loop, not one that writes now and then.
ACTIVE_COMMITS = 8
ACTIVE_MIN_S = 0.005
ACTIVE_MAX_S = 1.0
#: How long (ms) past its expiry (and CLOCK_TOLERANCE_MS) the outcome of a
#: request the store failed is kept in memory, for its copies (see
#: Intake._apply): memory is bounded by the failing requests of that long.
FAILURE_MARGIN_MS = 60_000
#: Most outcomes of requests the store failed kept in memory until it takes
#: writes again (about 500 bytes each).
MAX_FAILURES = 100_000
#: Of each kind of message about one request (a rejection, a refusal for
#: its entry id), at most LOG_BURST are logged in LOG_WINDOW seconds; the
#: others are counted, and summed up in one line once the window is over
#: (the metrics count every one): a client sending bad requests in a loop
#: does not fill the daemon's log.
LOG_BURST = 10
LOG_WINDOW = 60.0
#: After a batch's wait for writers ran out before they came, the next
#: 2**misses - 1 batches (misses: such waits in a row, at most
#: GATHER_MISSES) are taken without one (see Intake._gather).
GATHER_MISSES = 6

# Sends replies and retires their requests in one call, if the mirror holds
# their events. KEYS[1]: the request stream; KEYS[2]: the mirror's cursor;
# KEYS[3]: the promotion hash (replicator.promotion); KEYS[4..n+3]: the reply
# streams of the n replies. ARGV[1]: the database of these keys; ARGV[2]: the
# group; ARGV[3]: n; ARGV[4]: the store (UUID); ARGV[5]: the seq the mirror
# must hold (0: send without looking); ARGV[6]: the promotion the daemon
# knows (its chain, '' for none: replicator.promotion.promotion_token); then
# per reply: its TTL in ms and its five fields (id, status, value, error,
# message); then the entry ids of the
# requests answered (those that came through the stream). Returns n if sent,
# 0 if the mirror's cursor is not (ready, of this store) at that seq or
# beyond, or (with a seq to hold) the promotion hash records another
# promotion than the daemon's (its store, the old primary, lacks it: a
# write it applied is not in the promoted history, and must never be
# acknowledged once the promotion is recorded), and {n, i, ...} if the
# replies i, ... (1-based) could not be added to their streams because a
# key of another type is in the place of one, or a stream whose last entry
# id is the largest there is (only a client of an unprotected mirror can
# plant either): the others are sent all the same, and
# every request of the call is retired, so that one such key blocks no
# other writer. Any other error (Redis out of memory) fails the call, with
# no request retired: the replies are sent again later.
# The requests leave the stream (acknowledged, then deleted) in the call that
# sends their replies, never before, by one XACK and one XDEL naming them
# all (in slices of RETIRE_SLICE): each command a script calls costs about
# as much as a small command's own work. (Trimming with XTRIM MINID below
# the oldest pending entry costs Redis more: its blocking reads then walk
# the live entries left in the stream's first node.) ARGV_MAXLEN and
# RETIRE_SLICE are filled in by _reply_source.
_REPLY = b"""
redis.call('SELECT', ARGV[1])
local need = tonumber(ARGV[5])
if need > 0 then
    if (redis.call('HGET', KEYS[3], 'chain') or '') ~= ARGV[6] then
        return 0
    end
    local c = redis.call('HMGET', KEYS[2], 'store', 'seq', 'state')
    if c[1] ~= ARGV[4] or c[3] ~= 'ready' or (tonumber(c[2]) or -1) < need then
        return 0
    end
end
local n = tonumber(ARGV[3])
local lost
for i = 1, n do
    local a = 7 + (i - 1) * 6
    local added = redis.pcall('XADD', KEYS[i + 3], 'MAXLEN', '~', ARGV_MAXLEN, '*',
                              'id', ARGV[a + 1], 'status', ARGV[a + 2], 'value', ARGV[a + 3],
                              'error', ARGV[a + 4], 'message', ARGV[a + 5])
    if type(added) == 'table' and added.err then
        if string.sub(added.err, 1, 9) ~= 'WRONGTYPE'
                and not string.find(added.err, 'exhausted the last possible ID', 1, true) then
            return added  -- out of memory, ...: nothing is retired, all is sent again
        end
        lost = lost or {n}
        lost[#lost + 1] = i
    else
        redis.call('PEXPIRE', KEYS[i + 3], ARGV[a])
    end
end
for first = 7 + n * 6, #ARGV, RETIRE_SLICE do
    local last = math.min(first + RETIRE_SLICE - 1, #ARGV)
    redis.call('XACK', KEYS[1], ARGV[2], unpack(ARGV, first, last))
    redis.call('XDEL', KEYS[1], unpack(ARGV, first, last))
end
return lost or n
"""


# Makes the request stream anew, with its group, if its last id is ahead of
# the server's clock by more than a tolerance (every `*` id is then stamped
# at least that time, see the module docstring) and every request in it is
# one the daemon has refused and owes a reply (so deleting it loses
# nothing: the daemon sends those replies after, and had it died first,
# their writers' timeouts would say the truth, "not applied"). A request
# not yet read, or handed to a read not taken, or applied and not yet
# answered, keeps it as it is, unless ARGV[3] is '1' (forced: writers that
# keep sending would keep it for ever; a request so dropped was never
# applied, and its writer's timeout says so). KEYS[1]: the request stream;
# ARGV[1]: the group; ARGV[2]: the tolerance (ms); ARGV[4..]: the entry ids
# of the refused requests owed a reply. Returns 1 if it made the stream
# anew; 0 if its last id is not that far ahead (or it is gone); -1 if other
# requests are in it.
_RENEW = b"""
if redis.call('EXISTS', KEYS[1]) == 0 then
    return 0
end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local last = 0
for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then
        last = tonumber(string.match(info[i + 1], '^%d+'))
    end
end
local now = redis.call('TIME')
if last - (tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)) <= tonumber(ARGV[2]) then
    return 0
end
-- Every entry is pending (delivered: none unread), and every pending one is owed.
if ARGV[3] ~= '1' then
    local entries = redis.call('XLEN', KEYS[1])
    if entries > #ARGV - 3 then
        return -1
    end
    local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', entries + 1)
    if #pending ~= entries then
        return -1
    end
    local owed = {}
    for i = 4, #ARGV do
        owed[ARGV[i]] = true
    end
    for _, entry in ipairs(pending) do
        if not owed[entry[1]] then
            return -1
        end
    end
end
redis.call('DEL', KEYS[1])
redis.call('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
return 1
"""


# What the replies' script is given as the promotion of a daemon refused
# after one: never a promotion's chain, so no reply that needs the mirror goes out.
_FENCED = b"fenced"


def _reply_source() -> bytes:
    """The replies' script (:data:`_REPLY`), its bounds filled in."""
    return _REPLY.replace(b"ARGV_MAXLEN", b"%d" % REPLY_MAXLEN).replace(
        b"RETIRE_SLICE", b"%d" % RETIRE_SLICE
    )


# Deletes the intake key if it still names this daemon's store at its path
# (a daemon that has taken the mirror over since keeps its key).
# KEYS[1]: the intake key; ARGV[1]: the store (UUID); ARGV[2]: its path.
_RETIRE = b"""
local fields = redis.call('HMGET', KEYS[1], 'store', 'path')
if fields[1] == ARGV[1] and fields[2] == ARGV[2] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


def _sent(answer: Any, replies: list[_Owed]) -> bool:
    """Whether the replies' script (:data:`_REPLY`) answered that it sent `replies`.

    Replies that it could not add to their streams are logged (their
    writers time out; their requests were applied and are retired).
    """
    if isinstance(answer, list) and answer and answer[0] == len(replies):
        for index in answer[1:]:
            lost = replies[index - 1]
            logger.warning(
                "the reply to request %r could not be sent: its reply stream %r is a key of"
                " another type (is the mirror protected? see the README)",
                lost.request_id,
                lost.reply_to,
            )
        return True
    return isinstance(answer, int) and answer == len(replies)


def _stream_gone(error: redis.ResponseError) -> bool:
    """Whether `error` says the request stream or its group is gone (Redis restarted or flushed).

    A read blocked at the time is ended with UNBLOCKED; a read after, NOGROUP.
    """
    message = str(error)
    return "NOGROUP" in message or message.startswith("UNBLOCKED")


class _LimitedLog:
    """Logs messages of one kind at `level`: at most :data:`LOG_BURST` per :data:`LOG_WINDOW` s.

    The messages beyond are counted, and one line says how many once the
    window is over (at the next message, or the next :meth:`flush_due`).
    """

    def __init__(self, level: int, what: str) -> None:
        self.level = level
        self.what = what
        self._window_end = 0.0
        self._logged = 0
        self._unlogged = 0

    def log(self, message: str, *args: Any) -> None:
        self.flush_due()
        if self._logged == 0:
            self._window_end = time.monotonic() + LOG_WINDOW
        if self._logged < LOG_BURST:
            self._logged += 1
            logger.log(self.level, message, *args)
        else:
            self._unlogged += 1

    def flush_due(self) -> None:
        """Say how many messages went unlogged, and start anew, if the window is over."""
        if self._logged and time.monotonic() >= self._window_end:
            if self._unlogged:
                logger.log(
                    self.level,
                    "%d more %s in the last %.0f s, not logged (see the metrics)",
                    self._unlogged,
                    self.what,
                    LOG_WINDOW,
                )
            self._logged = self._unlogged = 0


class IntakeState(enum.Enum):
    """What the intake does on its next step."""

    CONNECT = "connect"
    SERVE = "serve"
    BACKOFF = "backoff"


@dataclass(frozen=True)
class Step:
    """What one :meth:`Intake.step` did.

    Attributes
    ----------
    applied
        Requests answered or newly committed.
    wait
        Seconds the caller may let pass before the next step; 0: step again now.
    idle
        No request is waiting: only a new request (see
        :meth:`Intake.wait_for_requests`) or a longer mirror calls for a step.
    """

    applied: int
    wait: float = 0.0
    idle: bool = False


class Mirror(Protocol):
    """The mirror as the intake sees it: how far it is, and a way to move it on at once."""

    @property
    def seq(self) -> int | None:
        """The last event the mirror holds (None while it is incomplete)."""

    def catch_up(
        self, seq: int, then: tuple[Any, ...] | None = None, events: Sequence[Event] = ()
    ) -> tuple[int | None, Any]:
        """Project the log up to `seq` now if the mirror can take it.

        `then` (the replies' script call) is sent to Redis in the same write
        as each projecting script call, until it answers other than 0.
        `events` are events just committed (in order): those that follow
        what the mirror holds are projected without reading them back.

        Returns
        -------
        :attr:`seq` after it, and the last answer to `then` (None if not sent).
        """

    def send_ahead(self, seq: int, then: tuple[Any, ...], events: Sequence[Event]) -> int | None:
        """Send the step that projects `events` (just committed) up to `seq`, and `then`, now.

        The answers are not waited for: the intake commits its next batch
        meanwhile, and :meth:`collect` reads them later (a mirror's
        connection answers in order, so any other use of it reads them
        first). Only one step is ever ahead.

        Returns
        -------
        A ticket for :meth:`collect`, or None if the step cannot be sent so
        (then :meth:`catch_up` projects them).
        """

    def collect(self, ticket: int) -> tuple[int | None, Any, float]:
        """Wait for the answers of the step sent ahead as `ticket`.

        Returns
        -------
        :attr:`seq` after it, the answer to its `then` (None if lost), and
        when that answer was read (monotonic time: for the replies' latency).
        """

    def fileno(self) -> int | None:
        """A socket that is readable once the step sent ahead is answered (None if none)."""

    @property
    def promotion(self) -> bytes | None:
        """The promotion recorded for the mirror that the store holds, its chain (b"" if none).

        None once the daemon is refused after a promotion (fenced): then no
        reply that needs the mirror goes out any more.
        """

    def hold(self) -> contextlib.AbstractContextManager[object]:
        """Keep other threads from moving the mirror while the intake commits and projects.

        The intake's own commit wakes the daemon's thread that follows the
        log; held off, that thread finds the commit already projected
        instead of racing the intake to project it.
        """


@dataclass(slots=True)  # one per request: no __dict__ to make
class _Owed:
    """A reply that goes out once the mirror holds event `seq`."""

    seq: int
    entry_id: bytes | None
    request_id: bytes
    reply_to: bytes
    reply: Reply
    expires_ms: int
    sent_ms: int
    clock_offset: float


class Intake:
    """Serves one mirror's write requests into the store.

    Parameters
    ----------
    backend
        The store, opened writable (its durability is the writes').
    url
        The mirror's URL (the requests live in the replicators' database
        of the same server).
    password
        The Redis user's password, if the URL does not carry one.
    batch
        Most requests read (and applied in one transaction) at once.
    batch_bytes
        Rough bound on the bytes of requests applied in one transaction.
    metrics
        Where to count (a fresh :class:`Metrics` if None).
    socket_timeout, backoff
        As for :class:`replicator.redis_sink.RedisSink`.
    max_linger
        Longest wait (seconds) for more requests before a batch is
        committed, with ``fsync`` durability (see below).

    With ``fsync`` durability a batch's transaction costs a disk flush, and
    the writers answered by one batch send their next requests while the
    next batch's flush runs: without a wait, 8 busy writers settle into
    two alternating batches of 4, each paying a flush. So before committing
    a batch smaller than the number of writers active lately (a request
    within the last few transactions' time, :data:`ACTIVE_COMMITS`), the
    intake waits for the missing ones
    (:meth:`_gather`), up to half the recent transactions' duration and
    `max_linger`: on a disk whose flush takes milliseconds the batches
    double, on one that flushes in a fraction of a millisecond the wait is
    as short. Where the writers need longer than that to send their next
    requests (their CPU, not the flush, bounds them), the wait would only
    hold the writers and the disk in lockstep, the writers idle during the
    flush and the disk idle while they run: so after a wait that ran out
    before the missing writers came, the next batches go without one, 1,
    3, 7, ... in a row (:data:`GATHER_MISSES`), and one that succeeds
    restores it. A lone writer never waits, nor does any write with the
    other durabilities.
    """

    def __init__(
        self,
        backend: LmdbBackend,
        url: str,
        *,
        password: str | None = None,
        batch: int = 256,
        batch_bytes: int = 64 << 20,
        metrics: Metrics | None = None,
        socket_timeout: float = 10.0,
        backoff: tuple[float, float] = (0.1, 10.0),
        max_linger: float = 0.002,
    ) -> None:
        self.backend = backend
        self.store = str(backend.uuid)
        mirror, self.db = connect(url, password)
        kwargs = control_kwargs(mirror, MIRROR_CURSOR_DB)
        mirror.close()
        kwargs.update(socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout)
        kwargs.update(client_name="telstate-replicator-intake")
        self.client = redis.Redis(
            connection_pool=redis.ConnectionPool(**kwargs), retry=Retry(NoBackoff(), 0)
        )
        # The hot path goes over connections of its own (see
        # :class:`telstate.remote.Wire`): replies and the pending list on
        # one, the blocking reads of new requests on the other.
        self._wire = Wire(self.client.connection_pool)
        self._reader = Wire(self.client.connection_pool)
        # A blocking read sent on _reader whose answer is not taken yet (see _read_ahead).
        self._reading = False
        # How long a read blocks (the daemon's last wait; well within the socket timeout).
        self._block_ms = max(1, int(min(0.25, socket_timeout / 2) * 1000))
        self.socket_timeout = socket_timeout
        self.batch = batch
        self.batch_bytes = batch_bytes
        # How many requests the next read takes (see _take_requests).
        self._read_count = batch
        self.metrics = metrics or Metrics()
        # Group commit with fsync (see _gather): the writers seen lately (reply
        # token -> monotonic time of their last request), and how long the
        # recent batches' transactions took (seconds, a moving average).
        self._linger = max_linger if backend.durability == "fsync" else 0.0
        self._writers: dict[bytes, float] = {}
        self._commit_s = 0.0
        # Waits in a row that ran out before the writers came, and how many
        # batches are still to go without one.
        self._gather_misses = 0
        self._gather_skip = 0
        self.backoff = backoff
        self.state = IntakeState.CONNECT
        # Wakes counted (see wake), and their count when the last try to connect began.
        self._wakes = self._woken = 0
        self._stream = request_stream_key(self.db)
        self._key = intake_key(self.db)
        self._cursor = mirror_cursor_key(self.db)
        self._promotion_key = promotion_key(self.db)
        # The promotion (its chain) the mirror's daemon knows (see
        # Mirror.promotion), as the replies' script compares it.
        self._promotion = b""
        self._fetched: list[tuple[bytes, dict[bytes, bytes]]] = []
        # The server's clock: (its time in ms, monotonic time) when last read.
        self._clock: tuple[int, float] | None = None
        self._reply_script = WireScript(self._wire, _reply_source())
        # Replies waiting for the mirror to show their events, and replies ready to send.
        self._owed: collections.deque[_Owed] = collections.deque()
        self._ready: list[_Owed] = []
        # Replies sent with the mirror's step sent ahead (see _project), and its ticket.
        self._sending: list[_Owed] = []
        self._ticket: int | None = None
        # The events of the last batch's commits, for the mirror (see _project).
        self._committed: list[Event] = []
        # Read the pending list (requests delivered before a restart) before
        # new ones, from its start: the entry id after which the next read of it starts.
        self._backlog = True
        self._backlog_from = b"0"
        # Whether requests wait for the mirror to be complete (see _serve).
        self._holding = False
        self._delay = backoff[0]
        self._retry_at = 0.0
        # The connections that did a round trip since the last connect (see _worked).
        self._working: set[str] = set()
        # Requests the store failed (see _apply): request id -> their outcome.
        self._failures: dict[bytes, RequestRecord] = {}
        self._failures_pruned = 0.0
        self._sweep_from = REQUEST_PREFIX
        self._next_sweep = 0.0
        self._retire = self.client.register_script(_RETIRE)
        self._renew = self.client.register_script(_RENEW)
        # Whether a request was refused for an entry id ahead of the server's
        # clock: the stream is made anew once all its requests are answered.
        self._stream_ahead = False
        # Tries in a row that found requests other than refused ones in it.
        self._renew_misses = 0
        #: Why the store takes no writes (it is a follower), or None while it does.
        self.read_only: str | None = None
        # Messages about single requests, each kind limited (see LOG_BURST).
        self._rejections = _LimitedLog(logging.WARNING, "rejected requests")
        self._clock_refusals = _LimitedLog(logging.ERROR, "requests refused for their entry ids")
        self._store_failures = _LimitedLog(logging.ERROR, "store failures")

    def wake(self) -> None:
        """Say that Redis is back (the mirror's side found it so): a retry delay ends now.

        Called from another thread: it only counts the call. The intake's
        own thread skips the delay of a failure once if a wake came since
        its last try to connect began (one that came while it connected,
        then failed, included), so a wake is never lost, and each buys one
        try at most (the delays grow as before against a Redis that keeps
        failing).
        """
        self._wakes += 1

    @property
    def owes_replies(self) -> bool:
        """Whether replies wait for the mirror to catch up."""
        return bool(self._owed)

    def step(self, mirror: Mirror) -> Step:
        """Do the next piece of work; never raises for Redis failures.

        After a commit the step asks `mirror` to project it at once, so
        that the replies are ready for the next :meth:`wait_for_requests`.
        """
        self._rejections.flush_due()
        self._clock_refusals.flush_due()
        self._store_failures.flush_due()
        self._learn_promotion(mirror)
        try:
            if self.state == IntakeState.CONNECT:
                self._woken = self._wakes
                return self._connect()
            if self.state == IntakeState.BACKOFF:
                now = time.monotonic()
                if now < self._retry_at and self._wakes == self._woken:
                    return Step(0, wait=self._retry_at - now)
                self.state = IntakeState.CONNECT
                return Step(0)
            return self._serve(mirror)
        except _TRANSIENT as error:
            return self._fail(f"Redis failed: {error}")
        except redis.ResponseError as error:
            if _stream_gone(error):
                logger.warning("the request stream is gone (Redis restarted?): recreating it")
                self.state = IntakeState.CONNECT
                return Step(0)
            return self._fail(f"Redis refused a command: {error}")
        except StoreError as error:
            # (Not a commit of requests: those are answered, see _apply.)
            return self._fail(f"the store failed: {error}")
        except ReadOnlyError as error:
            # The store became a follower; nothing of the batch was committed.
            return self._refuse_writes(str(error))

    def wait_for_requests(self, timeout: float, mirror: Mirror | None = None) -> None:
        """Send the ready replies, and block up to `timeout` seconds for new requests.

        The requests are kept for the next step. A read sent ahead (see
        :meth:`_read_ahead`) blocks for as long as it was sent to (the
        `timeout` of the call before). While a step of `mirror` is ahead
        (see :meth:`_project`), whichever comes first is taken: new
        requests (the step's answers are read after their commit), or the
        step's answers (then the requests are waited for, unless replies
        now wait for the mirror: the daemon then waits for it).
        """
        if self.state != IntakeState.SERVE:
            return
        if mirror is not None:
            self._learn_promotion(mirror)
        try:
            if self._ready:
                self._exchange(read=False)
            if not (self._fetched or self._backlog):
                self._block_ms = max(1, int(timeout * 1000))
                self._read_ahead()
                if self._ticket is not None and mirror is not None:
                    if self._requests_first(mirror, timeout):
                        self._take_read()
                        if self._fetched:
                            return
                        # (The read's block ran out: nothing came but time.)
                    self._settle(mirror)
                    if self._ready:
                        self._exchange(read=False)
                    if self._owed:
                        return  # the mirror is behind: the daemon waits for it
                self._take_read()
        except _TRANSIENT as error:
            self._fail(f"Redis failed: {error}")
        except redis.ResponseError as error:
            if _stream_gone(error):
                self._drop_read()
                self.state = IntakeState.CONNECT
            else:
                self._fail(f"Redis refused a command: {error}")

    def close(self, mirror: Mirror | None = None) -> None:
        """Send the ready replies (best effort), and close the connections to Redis.

        The answers of a step of `mirror` sent ahead are read first (its
        replies not sent so are sent with the ready ones). The intake key
        stays: writers then time out.
        """
        if self._ticket is not None and mirror is not None:
            with contextlib.suppress(*_TRANSIENT, redis.ResponseError, StoreError):
                self._settle(mirror, catch_up=False)
        self._unsend()
        if self._ready and self.state == IntakeState.SERVE:
            with contextlib.suppress(*_TRANSIENT, redis.ResponseError):
                self._exchange(read=False)
        self._drop_read()
        self._reader.close()
        self._wire.close()
        self.client.connection_pool.disconnect()

    def _learn_promotion(self, mirror: Mirror) -> None:
        """Take the promotion the mirror's daemon knows, for the replies' script.

        A daemon refused after a promotion (None) sends no reply that
        needs the mirror any more: no seq matches :data:`_FENCED`.
        """
        promotion = mirror.promotion
        if self._promotion != _FENCED:
            self._promotion = _FENCED if promotion is None else promotion

    # The states

    def _connect(self) -> Step:
        # Requests a read sent before handed out are on the pending list, read first below.
        self._drop_read()
        self._unsend()
        try:
            self.client.xgroup_create(self._stream, GROUP, id="0", mkstream=True)
        except redis.ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise
        # Loaded now, so that the first replies sent along with the mirror's
        # script find it (that call cannot load it: see _project).
        self.client.script_load(self._reply_script.script)
        if self.read_only is None:
            primary = self.backend.primary
            if primary is not None:
                self.read_only = str(follower_error(self.backend.path, primary))
        if self.read_only is None:
            self.client.hset(self._key, mapping={"store": self.store, "path": self.backend.path})
            self.metrics.publish(self.client, self._key)
            logger.info(
                "accepting writes for mirror database %d into store %s", self.db, self.store
            )
        else:
            self._retire(keys=[self._key], args=[self.store, self.backend.path])
            logger.warning(
                "not accepting writes for mirror database %d: %s", self.db, self.read_only
            )
        self._backlog, self._backlog_from = True, b"0"
        # The backoff restarts from its shortest once both connections have
        # done a round trip (see _worked): a failure that comes right after
        # each connect, on either, makes it grow.
        self._working = set()
        self.state = IntakeState.SERVE
        return Step(0)

    def _renew_stream(self) -> None:
        """Make the request stream anew if its ids are ahead of the server's clock.

        See :data:`_RENEW`. Called before the replies of a batch that
        refused such requests go out: their writers cannot have sent again
        yet. If requests the daemon has not refused are in the stream, it
        is left as it is: they are read (and refused) next, and this is
        tried again then; after :data:`RENEW_TRIES` such tries it is made
        anew all the same (writers that keep sending would keep it for
        ever): the requests in it that it did not refuse were never
        applied, and their writers time out ("not written").
        """
        if self._reading:
            # Redis would hand the new stream's requests to the read, or end
            # it: dropped (what it was handed stays pending, read first).
            self._drop_read()
            self._backlog, self._backlog_from = True, b"0"
        refused = [
            owed.entry_id
            for owed in (*self._sending, *self._ready, *self._owed)
            if owed.entry_id is not None and owed.reply.status == b"error"
        ]
        try:
            force = b"1" if self._renew_misses >= RENEW_TRIES else b"0"
            renewed = self._renew(
                keys=[self._stream], args=[GROUP, CLOCK_TOLERANCE_MS, force, *refused]
            )
        except redis.ResponseError as error:
            if _stream_gone(error):
                raise
            # Not the daemon's rights (see the README)? The replies still go
            # out; the next refusal tries again.
            self._stream_ahead = False
            logger.error(
                "could not make the request stream %r anew (%s): every request will be"
                " refused until its ids are no longer ahead of the Redis server's clock,"
                " or it is deleted (DEL %s in database %d, once no writer waits)",
                self._stream,
                error,
                self._stream.decode(),
                MIRROR_CURSOR_DB,
            )
            return
        if renewed < 0:
            self._renew_misses += 1
            return
        self._stream_ahead = False
        self._renew_misses = 0
        if renewed:
            logger.warning(
                "the request stream %r had ids ahead of the Redis server's clock (a client"
                " chose one, or the server's clock went back): every request in it was"
                " refused, and it is made anew",
                self._stream,
            )

    def _serve(self, mirror: Mirror) -> Step:
        self._collect_replies(mirror.seq)
        answered = len(self._ready)
        if not self._fetched and self._backlog:
            self._exchange(read=True)
        if not self._fetched:
            # Nothing is known to wait: the daemon sends the ready replies
            # and blocks for requests in wait_for_requests.
            if self._ready and self._owed:
                self._exchange(read=False)  # the mirror is behind: the daemon waits for it
            if self.read_only is None:
                self.metrics.publish_due(self.client, self._key)
            return Step(answered, wait=self.socket_timeout / 2, idle=not self._owed)
        if self.read_only is None and mirror.seq is None:
            # The mirror is incomplete (being rebuilt, or Redis failed): a write
            # committed now could not be answered until it is back, perhaps
            # after its writer has given up and been told it was not written.
            # So the requests wait, pending in Redis (those whose time runs
            # out meanwhile are answered expired, never applied).
            if not self._holding:
                self._holding = True
                logger.info("intake: requests wait until the mirror is complete again")
            if self._ready:
                self._exchange(read=False)  # (refusals, which need no mirror)
            return Step(answered, wait=HOLD_WAIT, idle=False)
        self._holding = False
        fetched, self._fetched = self._fetched, []
        if self._linger:
            fetched = self._gather(fetched)
        now_ms = self._server_time(fetched)
        with mirror.hold():
            applied = self._process(fetched, now_ms)
            if len(fetched) > 1:
                # Busy (writers' requests come while a batch commits): the
                # next read goes first, so that Redis hands it the requests
                # already waiting before it runs the mirror's scripts, and
                # the daemon commits them meanwhile.
                self._read_ahead()
            if self._owed:
                self._project(mirror)
        # A lone writer: the scripts first, which carry its reply, then the
        # read (Redis holds it, and gives it the next request as soon as a
        # writer sends one).
        self._read_ahead()
        if self._owed and self._ready:
            self._exchange(read=False)  # the mirror could not take all: send what is ready
        # After the replies, outside the hold: a sweep's commit delays no reply.
        self._sweep(now_ms)
        return Step(applied, wait=self.socket_timeout / 2, idle=not self._owed)

    def _gather(
        self, fetched: list[tuple[bytes, dict[bytes, bytes]]]
    ) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """`fetched`, and the requests that come while writers active lately are missing.

        Waits at most half the recent transactions' duration (their flush,
        mostly) and `max_linger` (see the class docstring). A request that
        comes later waits for the next batch as usual (the read sent for it
        stays out).
        """
        now = time.monotonic()
        active = self._active_writers(now)
        if len(fetched) >= active or self._backlog:
            return fetched  # (the pending list first: it is read without waiting)
        if self._gather_skip:
            self._gather_skip -= 1
            return fetched
        deadline = now + min(self._commit_s / 2, self._linger)
        wanted = min(active, self.batch)
        while len(fetched) < wanted:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._read_ahead(min(self._read_count, self.batch - len(fetched)))
            reader = self._reader.fileno()
            if reader is None or not self._reading:
                break
            poll = select.poll()
            poll.register(reader, select.POLLIN)
            if not poll.poll(left * 1000):
                break
            self._take_read()
            fetched += self._fetched
            self._fetched = []
        if len(fetched) >= wanted:
            self._gather_misses = 0
        else:
            self._gather_misses = min(self._gather_misses + 1, GATHER_MISSES)
            self._gather_skip = 2**self._gather_misses - 1
        return fetched

    def _active_writers(self, now: float) -> int:
        """How many writers sent a request lately (see :data:`ACTIVE_COMMITS`)."""
        since = now - min(ACTIVE_MAX_S, max(ACTIVE_MIN_S, ACTIVE_COMMITS * self._commit_s))
        writers = self._writers
        if len(writers) > 64 and min(writers.values()) < since:
            # Forget the writers gone quiet (only once many were seen).
            self._writers = writers = {
                token: seen for token, seen in writers.items() if seen >= since
            }
        return sum(1 for seen in writers.values() if seen >= since)

    def _project(self, mirror: Mirror) -> None:
        """Have the mirror show the owed replies' events, and send the replies with it.

        The replies ride in the same write as the mirror's script call
        (see :meth:`Mirror.catch_up`), guarded: Redis sends them only if
        the mirror's cursor then holds their events. So they reach the
        writers one round trip sooner than if sent after the mirror's
        reply came back. Those not sent so stay owed or ready, for the
        usual path (:meth:`_exchange`).

        A batch that refused requests for ids ahead of the server's clock
        first has the request stream made anew (:meth:`_renew_stream`).
        """
        if self._stream_ahead:
            self._renew_stream()
        self._settle(mirror)
        committed, self._committed = self._committed, []
        if not (self._ready or self._owed):
            return  # all went out with the step before
        pending, need, then = self._all_replies()
        ticket = mirror.send_ahead(need, then, committed)
        if ticket is not None:
            self._ready = []
            self._owed.clear()
            self._sending, self._ticket = pending, ticket
            return
        self._catch_up(mirror, pending, need, then, committed)

    def _catch_up(
        self,
        mirror: Mirror,
        pending: list[_Owed],
        need: int,
        then: tuple[Any, ...],
        committed: Sequence[Event] = (),
    ) -> None:
        """Have the mirror show event `need` now, sending `pending` (all replies owed) with it."""
        seq, answer = mirror.catch_up(need, then, committed)
        if _sent(answer, pending):
            self._ready = []
            self._owed.clear()
            self._replied(pending)
            return
        self._collect_replies(seq)

    def _settle(self, mirror: Mirror, *, catch_up: bool = True) -> None:
        """Take the answers of the mirror's step sent ahead with replies, if one is.

        Replies its script did not send (the mirror refused the step, Redis
        failed, the answer was lost) are owed again, first, and (with
        `catch_up`) the mirror is asked to show them at once, as
        :meth:`_project` does when it cannot send a step ahead.
        """
        if self._ticket is None:
            return
        sending, ticket = self._sending, self._ticket
        self._sending, self._ticket = [], None
        try:
            seq, answer, answered = mirror.collect(ticket)
        except BaseException:
            self._owe_first(sending)
            raise
        if _sent(answer, sending):
            self._replied(sending, answered)
            return
        self._owe_first(sending)
        if not catch_up:
            self._collect_replies(seq)
            return
        self._catch_up(mirror, *self._all_replies())

    def _unsend(self) -> None:
        """Owe again the replies of a step sent ahead whose answers will not be taken."""
        if self._ticket is not None:
            self._owe_first(self._sending)
            self._sending, self._ticket = [], None

    def _owe_first(self, replies: list[_Owed]) -> None:
        """Owe `replies` again, ahead of every reply owed now (they were owed before them)."""
        self._owed.extendleft(reversed(replies))

    def _all_replies(self) -> tuple[list[_Owed], int, tuple[Any, ...]]:
        """Every reply ready or owed, the last event they wait for, and the call that sends them."""
        pending = self._ready + list(self._owed)
        need = max(owed.seq for owed in pending)
        return pending, need, self._reply_command(pending, need)

    def _requests_first(self, mirror: Mirror, timeout: float) -> bool:
        """Wait up to `timeout` s for new requests or the answers of the step ahead.

        Returns
        -------
        True if requests came first; False if the answers came first,
        neither did, or they cannot be waited for apart.
        """
        reader = self._reader.fileno()
        if reader is None:
            return False
        deadline = time.monotonic() + timeout
        while True:
            # Taken again each slice: the mirror's thread may read the answers
            # (then nothing more comes on that socket) or close it meanwhile.
            ahead = mirror.fileno()
            if ahead is None:
                return False  # read by the mirror's thread: collect them
            poll = select.poll()
            try:
                poll.register(reader, select.POLLIN)
                poll.register(ahead, select.POLLIN)
                ready = dict(
                    poll.poll(max(0, min(_AHEAD_SLICE_MS, (deadline - time.monotonic()) * 1000)))
                )
            except (OSError, ValueError):
                return False  # a socket closed under it: collect (which sees the failure)
            if ready.get(reader):
                return True
            if ready.get(ahead) or time.monotonic() >= deadline:
                return False

    def _refuse_writes(self, reason: str) -> Step:
        """Refuse every request from now on, for `reason` (the store takes no writes)."""
        logger.error("intake: %s: refusing writes from now on", reason)
        self.read_only = reason
        self._fetched = []
        self._drop_read()
        self._unsend()
        # Connect again: it retires the intake key, and reads the failed
        # batch's requests again from the pending list, to refuse them.
        self.state = IntakeState.CONNECT
        return Step(0)

    def _fail(self, message: str) -> Step:
        logger.warning("intake: %s; retrying in %.1f s", message, self._delay)
        self.state = IntakeState.BACKOFF
        self._fetched = []
        self._drop_read()
        self._unsend()
        self._reader.close()
        self._wire.close()
        self._retry_at = time.monotonic() + self._delay
        wait = self._delay
        self._delay = min(self._delay * 2, self.backoff[1])
        return Step(0, wait=wait)

    # Talking to Redis

    def _exchange(self, *, read: bool) -> None:
        """Send the ready replies and (if `read`) read the pending list, in one round trip.

        A reply is ready once the sink's mirror holds its events, but
        Redis may have lost the mirror since (a restart the sink has not
        noticed yet): so the replies with events go out only if the
        mirror's cursor in Redis holds them, as those sent with the
        mirror's script (:meth:`_project`); if not, they are owed again.
        Refusals (nothing to show) go out unguarded.

        The requests read are kept in :attr:`_fetched`; replies that may
        not have gone out stay ready, to be sent again (a writer takes the
        first reply to its request id and ignores the others).
        """
        ready, self._ready = self._ready, []
        groups = [
            (group, max((owed.seq for owed in group), default=0))
            for group in (
                [owed for owed in ready if not owed.seq],
                [owed for owed in ready if owed.seq],
            )
            if group
        ]
        commands = [self._reply_command(group, need) for group, need in groups]
        if read:
            commands.append(self._read_command(None))
        if not commands:
            return
        try:
            replies = self._wire.call(*commands)
        except BaseException:
            self._ready = ready + self._ready
            raise
        unshown: list[_Owed] = []
        try:
            for (group, need), answer in zip(groups, replies):
                try:
                    sent = checked(answer)
                except redis.exceptions.NoScriptError:
                    # Redis restarted or its scripts were flushed: send again, loading it.
                    sent = self._reply_script(**self._reply_arguments(group, need))
                if _sent(sent, group):
                    self._replied(group)
                else:
                    unshown += group
        except BaseException:
            # The requests read with them are read again from the pending
            # list after the reconnect.
            self._ready = ready + self._ready
            raise
        if unshown:
            self._owe_first(unshown)
        if read:
            self._fetched = self._take_requests(checked(replies[-1]))
        self._worked("wire")

    def _read_ahead(self, count: int | None = None) -> None:
        """Send the blocking read of new requests (on its own connection), unless one is out.

        It takes at most `count` requests (:attr:`batch` if None).

        Its answer is taken by :meth:`_take_read`. Whatever it hands out
        is on the consumer group's pending list until acknowledged, so
        if its answer is lost (a failure, a restart), the pending list,
        read first after connecting, has those requests. While replies wait
        for the mirror, the daemon takes no answer: requests handed out
        meanwhile wait in the socket, as they would in the stream.
        """
        if self._reading or self._backlog:
            return
        self._reader.send(hiredis.pack_command(self._read_command(self._block_ms, count)))
        self._reading = True

    def _take_read(self) -> None:
        """Take the answer of the read sent ahead (blocking until it comes)."""
        if not self._reading:
            return
        self._reading = False  # whatever happens now: on a failure the connection is closed
        (reply,) = self._reader.receive(1)
        self._fetched = self._take_requests(checked(reply))
        self._worked("reader")

    def _worked(self, connection: str) -> None:
        """Note a round trip on `connection`; once both have done one, restart the backoff."""
        if len(self._working) < 2:
            self._working.add(connection)
            if len(self._working) == 2:
                self._delay = self.backoff[0]

    def _drop_read(self) -> None:
        """Forget a read sent ahead: close its connection (its requests stay pending)."""
        if self._reading:
            self._reading = False
            self._reader.close()

    def _read_command(self, block_ms: int | None, count: int | None = None) -> tuple[Any, ...]:
        """The XREADGROUP of the next requests (the pending ones first, after a connect)."""
        command: list[Any] = [
            b"XREADGROUP",
            b"GROUP",
            GROUP,
            GROUP,
            b"COUNT",
            count or self._read_count,
        ]
        if self._backlog:
            # The pending list (never blocks), onwards from the last entry read of it.
            command += [b"STREAMS", self._stream, self._backlog_from]
        else:
            block = [] if block_ms is None else [b"BLOCK", block_ms]
            command += [*block, b"STREAMS", self._stream, b">"]
        return tuple(command)

    def _take_requests(self, reply: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """The requests of an XREADGROUP reply (entries deleted while pending are acknowledged)."""
        entries = stream_entries(reply)
        if self._backlog:
            if not entries:
                self._backlog = False  # the pending list is done: new requests from now on
                return []
            self._backlog_from = entries[-1][0]
            # Requests whose replies are owed already (read before a reconnect,
            # committed, their replies waiting for the mirror) stay pending
            # until those go out: not applied, nor owed, again.
            owed = {owed.entry_id for owed in (*self._owed, *self._ready, *self._sending)}
            if owed:
                entries = [entry for entry in entries if entry[0] not in owed]
        # A read is bounded by its count of requests, not by their bytes (a
        # request may have MAX_REQUEST_BYTES): after large ones, the next reads
        # take as many as batch_bytes holds of the largest, their count
        # growing back twofold a read (of some requests) while they are small.
        if entries:
            largest = max(sum(map(len, fields.values())) if fields else 0 for _, fields in entries)
            self._read_count = max(
                1, min(self.batch, 2 * self._read_count, self.batch_bytes // max(largest, 1))
            )
        # A pending entry deleted meanwhile comes back with no fields: only acknowledge it.
        dropped = [entry_id for entry_id, fields in entries if fields is None]
        if dropped:
            self.client.xack(self._stream, GROUP, *dropped)
        return [(entry_id, fields) for entry_id, fields in entries if fields is not None]

    def _server_time(self, fetched: list[tuple[bytes, dict[bytes, bytes]]]) -> int:
        """The Redis server's time now, in ms: read with TIME about once a second.

        Between readings it is extrapolated with this host's monotonic
        clock. It is read again at once if the newest request's entry id
        is ahead of that by more than :data:`CLOCK_TOLERANCE_MS` (the
        server's clock may have stepped forward), so that a request is
        refused for an id ahead only by the server's own word. It is never
        raised to an entry id: a client may choose its entry's id (see the
        module docstring).
        """
        now = time.monotonic()
        # An XREADGROUP hands out entries (new or pending) in the order of their ids.
        newest = entry_time_ms(fetched[-1][0])
        if self._clock is not None and now - self._clock[1] < CLOCK_SYNC:
            server_ms = self._clock[0] + int((now - self._clock[1]) * 1000)
            if newest - server_ms <= CLOCK_TOLERANCE_MS:
                return server_ms
        seconds, micros = self.client.time()
        self._clock = (seconds * 1000 + micros // 1000, now)
        return self._clock[0]

    def _collect_replies(self, mirror_seq: int | None) -> None:
        """Ready the owed replies whose events the mirror holds (at `mirror_seq`).

        Replies owed at seq 0 (refusals: nothing to show) go out even while
        the mirror is incomplete (None), unless behind a reply that waits.
        """
        limit = 0 if mirror_seq is None else mirror_seq
        while self._owed and self._owed[0].seq <= limit:
            self._ready.append(self._owed.popleft())

    def _reply_command(self, ready: list[_Owed], need: int = 0) -> tuple[Any, ...]:
        """The script call that sends `ready` and retires their requests.

        With `need`, only once the mirror holds event `need`.
        """
        return self._reply_script.command(**self._reply_arguments(ready, need))

    def _reply_arguments(self, ready: list[_Owed], need: int = 0) -> dict[str, list[Any]]:
        """The keys and arguments of the script that sends `ready` (see :data:`_REPLY`)."""
        keys = [self._stream, self._cursor, self._promotion_key]
        args: list[Any] = [
            MIRROR_CURSOR_DB,
            GROUP,
            len(ready),
            self.store,
            need,
            self._promotion,
        ]
        for owed in ready:
            keys.append(reply_stream_key(self.db, owed.reply_to))
            reply = owed.reply
            args += (
                owed.expires_ms - owed.sent_ms + REPLY_TTL_MS,
                owed.request_id,
                reply.status,
                reply.value,
                reply.error,
                reply.message.encode(),
            )
        args += [owed.entry_id for owed in ready if owed.entry_id is not None]
        return {"keys": keys, "args": args}

    def _replied(self, sent: list[_Owed], now: float | None = None) -> None:
        """Count `sent` as replied (at monotonic time `now`, if not now)."""
        if now is None:
            now = time.monotonic()
        observe = self.metrics.latency.observe
        for owed in sent:
            observe(max(0.0, now - owed.clock_offset - owed.sent_ms / 1000))

    def _process(self, fetched: list[tuple[bytes, dict[bytes, bytes]]], now_ms: int) -> int:
        # Monotonic time minus server time: when replies go out, their age by the server's clock.
        clock_offset = time.monotonic() - now_ms / 1000
        requests: list[Request] = []
        for entry_id, fields in fetched:
            try:
                request = decode_request(entry_id, fields)
            except InvalidRequest as invalid:
                self._reject(entry_id, invalid, now_ms, clock_offset)
                continue
            if request.store != self.store:
                other = InvalidRequest(
                    f"request {entry_id!r} is for store {request.store}, this daemon writes"
                    f" store {self.store}",
                    request.request_id,
                    request.reply_to,
                )
                self._reject(entry_id, other, now_ms, clock_offset, kind=b"store")
                continue
            undecodable = _undecodable(request)
            if undecodable is not None:
                self._reject(entry_id, undecodable, now_ms, clock_offset)
                continue
            requests.append(request)
        if self._linger:
            started = time.monotonic()
            writers = self._writers
            for request in requests:
                writers[request.reply_to] = started
        self._committed = []

        def server_now() -> int:
            return int((time.monotonic() - clock_offset) * 1000)

        for chunk in _chunks(requests, self.batch_bytes):
            if self.read_only is None:
                # Each chunk is judged by the server's time once its transaction
                # has begun: the earlier chunks, the mirror's turn, and a local
                # writer holding the store's write lock may have taken long.
                outcomes = self._apply(chunk, server_now)
            else:
                outcomes = refuse_requests(self.backend, chunk, self.read_only)
            # Counted here, and added to the metric once a chunk (each increment
            # takes its lock): a later chunk that fails leaves this one counted.
            applied = 0
            for request, record in zip(chunk, outcomes):
                if record.error:
                    self.metrics.rejected.labels(record.error.decode()).inc()
                    if record.error == b"clock":
                        self._clock_refusals.log("%s", record.message)
                else:
                    applied += 1
                self._owe(request, record, clock_offset)
            if applied:
                self.metrics.applied.inc(applied)
        if self._linger and requests:
            self._commit_s += (time.monotonic() - started - self._commit_s) / 8
        return len(fetched)

    def _apply(self, chunk: list[Request], server_now: Callable[[], int]) -> list[RequestRecord]:
        """Apply `chunk` in one transaction; if the store fails it, each half apart.

        A request whose own transaction fails too (the disk is full, a
        value too large for what is left of it, the store is damaged) is
        answered with the store's error, a ``failed`` reply, as a local
        write raises it, rather than left to time out; nothing of it was
        committed. Its outcome cannot be recorded in the store, so it is
        kept in memory (:attr:`_failures`) until the request has expired: a
        copy of it (a client sends one when a reply is late, or after a
        lost connection) gets the same answer, and is never applied once
        its writer was told it failed; once the store takes a write again,
        those outcomes are recorded in it, as any other (so a daemon
        restarted after that knows them too; one restarted before has
        forgotten them: a copy still in flight would be applied). At most
        :data:`MAX_FAILURES` are kept (the oldest go first). Halving the
        batch keeps the others in few transactions: one bad request among n
        costs about 2 log2(n) failed ones.
        """
        if self._failures:
            self._prune_failures(server_now())
            known = [self._failures.get(request.request_id) for request in chunk]
            if any(record is not None for record in known):
                rest = [request for request, record in zip(chunk, known) if record is None]
                applied = iter(self._apply(rest, server_now) if rest else ())
                return [record if record is not None else next(applied) for record in known]
        try:
            outcomes = apply_requests(self.backend, chunk, server_now, self._committed)
        except StoreError as error:
            failure = error
        else:
            self.metrics.batch_size.observe(len(chunk))
            if self._failures:
                self._record_failures()
            return outcomes
        if len(chunk) == 1:
            return [self._failed(chunk[0], failure, server_now())]
        self._store_failures.log("a batch of %d requests failed: %s", len(chunk), failure)
        half = len(chunk) // 2
        return self._apply(chunk[:half], server_now) + self._apply(chunk[half:], server_now)

    def _failed(self, request: Request, error: StoreError, now_ms: int) -> RequestRecord:
        """The outcome of `request`, whose transaction the store failed with `error`."""
        message = (
            f"{request.op.value} request {request.request_id!r}: the log host's store"
            f" failed to write it: {error}"
        )
        self._store_failures.log("%s", message)
        # (Its expiry as a record's: an entry id ahead of the clock counts as now.)
        expires_ms = min(request.sent_ms, now_ms) + request.timeout_ms
        record = RequestRecord(expires_ms, 0, b"error", b"", b"failed", message)
        failures = self._failures
        failures[request.request_id] = record
        if len(failures) > MAX_FAILURES:
            del failures[next(iter(failures))]
            self._store_failures.log(
                "more than %d requests failed and wait to be recorded: forgetting the oldest"
                " (a copy of it would be applied once the store takes writes again)",
                MAX_FAILURES,
            )
        return record

    def _record_failures(self) -> None:
        """Record the outcomes of the requests the store failed, now that it takes writes.

        A request applied meanwhile (a copy, sent to a daemon restarted in
        between) keeps its own record. If the store fails again, they stay
        in memory for the next try.
        """
        failures = self._failures
        try:
            with self.backend.write() as wtxn:
                txn, meta = wtxn.txn, wtxn.tables.meta
                for request_id, record in failures.items():
                    # put(key, value, dupdata, overwrite, append, db) by position.
                    txn.put(REQUEST_PREFIX + request_id, record.encode(), True, False, False, meta)
                wtxn.changed = True
        except StoreError as error:
            self._store_failures.log("recording %d failed requests: %s", len(failures), error)
            return
        self._failures = {}

    def _prune_failures(self, now_ms: int) -> None:
        """Forget the failed requests that have expired (looked at most once a second)."""
        now = time.monotonic()
        if now < self._failures_pruned + 1.0:
            return
        self._failures_pruned = now
        # A copy carries the first's deadline (what is left of its timeout),
        # so it expires about when the first does: later by the network's
        # delays, and up to the clock's tolerance; expired, it is never applied.
        since = now_ms - CLOCK_TOLERANCE_MS - FAILURE_MARGIN_MS
        self._failures = {
            request_id: record
            for request_id, record in self._failures.items()
            if record.expires_ms > since
        }

    def _sweep(self, now_ms: int) -> None:
        """Delete some expired request records, if a sweep is due."""
        if self.read_only is None and time.monotonic() >= self._next_sweep:
            self._next_sweep = time.monotonic() + SWEEP_INTERVAL
            self._sweep_from = sweep_requests(self.backend, self._sweep_from, now_ms)

    def _owe(self, request: Request, record: RequestRecord, clock_offset: float) -> None:
        """Owe `request` the reply its outcome `record` gives (counted by the caller)."""
        # An ok carries nothing else: the common reply is the one OK.
        if record.status == b"ok":
            reply = OK
        else:
            reply = Reply(record.status, record.value, record.error, record.message)
            if record.error == b"clock":
                self._stream_ahead = True
        self._owed.append(
            _Owed(
                record.seq,
                request.entry_id,
                request.request_id,
                request.reply_to,
                reply,
                request.expires_ms,
                request.sent_ms,
                clock_offset,
            )
        )

    def _reject(
        self,
        entry_id: bytes,
        error: InvalidRequest,
        now_ms: int,
        clock_offset: float,
        kind: bytes = b"invalid",
    ) -> None:
        """Answer a bad request (if it says where to) and drop it; it blocks nothing."""
        self._rejections.log("rejected: %s", error)
        self.metrics.rejected.labels(kind.decode()).inc()
        if error.request_id is None or error.reply_to is None:
            self.client.xack(self._stream, GROUP, entry_id)
            self.client.xdel(self._stream, entry_id)
            return
        reply = Reply(b"error", error=kind, message=str(error))
        # Owed at seq 0: it goes out with the next replies, in order.
        self._owed.append(
            _Owed(
                0, entry_id, error.request_id, error.reply_to, reply, now_ms, now_ms, clock_offset
            )
        )


def retire(url: str, password: str | None = None) -> None:
    """Say, for the mirror at `url`, that no daemon accepts writes any more (best effort).

    Called by a replicator that runs without ``--accept-writes``, so that
    new clients of the mirror are told at once that it is read-only rather
    than time out.
    """
    try:
        mirror, db = connect(url, password)
        kwargs = control_kwargs(mirror, MIRROR_CURSOR_DB)
        mirror.close()
        client = redis.Redis(connection_pool=redis.ConnectionPool(**kwargs))
        try:
            if client.delete(intake_key(db)):
                logger.info("mirror database %d no longer accepts writes", db)
        finally:
            client.close()
    except (redis.RedisError, ValueError) as error:
        logger.debug("could not retire the write intake: %s", error)


def _undecodable(request: Request) -> InvalidRequest | None:
    """An error if the request's value or sub-key is not an encoded value, else None.

    Pickled values are let through undecoded (the daemon never unpickles;
    a katsdptelstate client may write them, and readers decide).
    """
    op = request.op
    if op is Op.DELETE or op is Op.CLEAR:
        return None
    name, error = "value", _decode_error(request.value)
    if error is None and op is Op.SET_INDEXED:
        name, error = "sub-key", _decode_error(request.sub_key)
    if error is None:
        return None
    return InvalidRequest(
        f"request {request.request_id!r}: the {name} does not decode: {error}",
        request.request_id,
        request.reply_to,
    )


def _decode_error(data: bytes) -> str | None:
    """Why `data` is not an encoded value; None if it is one (or a pickle)."""
    try:
        decode_value(data, allow_pickle=False)
    except DecodeError as error:
        message = str(error)
        return None if message == PICKLE_ERROR else message
    return None


def _chunks(requests: list[Request], size: int) -> list[list[Request]]:
    chunks: list[list[Request]] = []
    total = size
    for request in requests:
        if total + request.size > size and (not chunks or chunks[-1]):
            chunks.append([])
            total = 0
        chunks[-1].append(request)
        total += request.size
    return chunks


def apply_requests(
    backend: LmdbBackend,
    requests: Sequence[Request],
    now_ms: int | Callable[[], int],
    events: list[Event] | None = None,
) -> list[RequestRecord]:
    """Apply `requests` to the store in one write transaction, once each.

    Each request's outcome is recorded in the same transaction. A request
    recorded before is not applied again: its record is returned. One that
    has (nearly) expired by `now_ms` (the Redis server's time, or a
    function that gives it: called once the transaction has begun, so that
    a wait for the store's write lock, held by a local writer, counts) is
    not applied, and that is recorded: a resend of it, whose own expiry may
    be a little later (it moves with the network's delays), gets the same
    answer.

    The events the transaction appended are added to `events` (if given)
    once it has committed, as the log gives them: the mirror can project
    them without reading them back (see :meth:`Mirror.catch_up`).

    Returns
    -------
    The outcome of each request, in order.

    Raises
    ------
    StoreError
        If the store cannot be written (nothing of the batch is committed).
    """

    with backend.write() as wtxn:
        now = now_ms if isinstance(now_ms, int) else now_ms()
        applied = _Applied(wtxn)
        outcomes = [applied.apply(request, now) for request in requests]
    if events is not None:
        events += applied.events
    return outcomes


def refuse_requests(
    backend: LmdbBackend, requests: Sequence[Request], reason: str
) -> list[RequestRecord]:
    """The outcomes of `requests` to a store that takes no writes, for `reason`.

    A request applied before keeps its recorded outcome (its writer must
    learn that it was applied); the others get a ``readonly`` error, at
    seq 0 (the mirror need not move for it).
    """
    return [
        found
        if found is not None
        else RequestRecord(
            request.expires_ms,
            0,
            b"error",
            b"",
            b"readonly",
            f"{request.op.value} request {request.request_id!r} not applied: {reason}",
        )
        for request, found in zip(requests, backend.request_records(r.request_id for r in requests))
    ]


class _Applied:
    """The requests of one batch, applied in its write transaction (see :func:`apply_requests`).

    Each request costs a lookup and a put of its record besides its
    operation, so the per-request path is kept short: LMDB called with
    positional arguments (py-lmdb parses keywords slowly), the writer
    identity switched only when it changes within the batch.
    """

    __slots__ = ("wtxn", "txn", "meta", "writer", "events")

    def __init__(self, wtxn: WriteTxn) -> None:
        self.wtxn = wtxn
        self.txn = wtxn.txn
        self.meta = wtxn.tables.meta
        # The writer the next events are recorded as: this process until write_as.
        self.writer: Writer | None = None
        #: The events appended so far, as the log gives them once committed.
        self.events: list[Event] = []

    def apply(self, request: Request, now_ms: int) -> RequestRecord:
        """Apply one request (unless it was before, or is too old) and record it."""
        record_key = REQUEST_PREFIX + request.request_id
        # get(key, default, db) by position, as in layout.request_record_in.
        found = self.txn.get(record_key, None, self.meta)
        if found is not None:
            try:
                return RequestRecord.decode(found)
            except ValueError:
                pass
            # Whether it was applied is unknown, and applying it again could
            # undo later writes (a delete, a clear): its writer is told so,
            # and so are its copies, for as long as the record of any request
            # is kept (the damaged one had no expiry).
            logger.error("request %r: its record is damaged: not applied again", request.request_id)
            record = RequestRecord.damaged(
                request.sent_ms + request.timeout_ms,
                f"{request.op.value} request {request.request_id!r}",
            )
            if not self.txn.put(record_key, record.encode(), True, True, False, self.meta):
                raise StoreError(f"LMDB put refused: the record of {request.request_id!r}")
            self.wtxn.changed = True
            return record
        # An entry id ahead of `now_ms` by up to the tolerance: the clock's
        # extrapolation lags (taken as sent now). Beyond it: see below.
        ahead_ms = request.sent_ms - now_ms
        sent_ms = min(request.sent_ms, now_ms)
        expires_ms = sent_ms + request.timeout_ms
        margin = min(int(request.timeout_ms * APPLY_MARGIN), 1000)
        wtxn = self.wtxn
        if ahead_ms > CLOCK_TOLERANCE_MS:
            # Its id hides how long it waited (Redis stamps every request
            # with at least the stream's last id): it may be older than its
            # timeout. Recorded, as an expiry is, so a resend gets the same.
            message = (
                f"{request.op.value} request {request.request_id!r} not applied: its stream"
                f" entry id {request.entry_id.decode()} is {ahead_ms} ms ahead of the Redis"
                " server's clock (a client chose such an id, or the server's clock went"
                " back), so its age is unknown; the replicator makes the request stream"
                " anew: send the write again"
            )
            # (The intake logs it, a few to a minute.)
            record = RequestRecord(expires_ms, 0, b"error", b"", b"clock", message)
        elif now_ms > expires_ms - margin:
            # Recorded too: a resend of it (whose entry time, and so its
            # expiry, moves with the network's delays) may come later in
            # this batch or after, and must get the same answer, never be
            # applied after its writer was told "not applied".
            record = RequestRecord(
                expires_ms,
                0,
                b"error",
                b"",
                b"expired",
                f"{request.op.value} request {request.request_id!r} arrived"
                f" {now_ms - sent_ms} ms after it was sent, too late for its"
                f" {request.timeout_ms} ms timeout: not applied",
            )
        else:
            if request.writer != self.writer:
                wtxn.write_as(request.writer)
                self.writer = request.writer
            appended, status, value, error, message = _apply_one(wtxn, request)
            if appended:
                seq, when, chain = wtxn.last_event
                self.events.append(_event(seq, when, chain, request))
            else:
                seq = wtxn.last_seq
            record = RequestRecord(expires_ms, seq, status, value, error, message)
        # put(key, value, dupdata, overwrite, append, db) by position; as checked_put.
        if not self.txn.put(record_key, record.encode(), True, True, False, self.meta):
            raise StoreError(f"LMDB put refused: the record of request {request.request_id!r}")
        wtxn.changed = True  # the record alone must be committed too
        return record


def _event(seq: int, when: float, chain: bytes, request: Request) -> Event:
    """The event that applying `request` appended at `seq`, as the log gives it back."""
    op = request.op
    key: bytes | None = request.key
    sub_key = value = timestamp = None
    if op is Op.ADD_MUTABLE:
        value, timestamp = request.value, request.timestamp
    elif op is Op.SET_IMMUTABLE:
        value = request.value
    elif op is Op.SET_INDEXED:
        sub_key, value = request.sub_key, request.value
    elif op is Op.CLEAR:
        key = None
    return Event(seq, when, request.writer, op, key, sub_key, value, timestamp, chain)


def _apply_one(wtxn: WriteTxn, request: Request) -> tuple[bool, bytes, bytes, bytes, str]:
    """Apply one request in `wtxn`: (appended, status, value, error, message).

    `appended` says whether it appended an event (a write that changes
    nothing appends none); the rest is its reply.

    A refused operation changes nothing (see :class:`WriteTxn`), so the
    batch goes on past it.
    """
    op = request.op
    try:
        if op is Op.ADD_MUTABLE:
            assert request.timestamp is not None
            # False: the same sample was there already (no event, and ok).
            appended = wtxn.add_mutable(request.key, request.value, request.timestamp)
        elif op is Op.SET_IMMUTABLE:
            existing = wtxn.set_immutable(request.key, request.value)
            if existing is not None:
                return False, b"exists", existing, b"", ""
            appended = True
        elif op is Op.SET_INDEXED:
            existing = wtxn.set_indexed(request.key, request.sub_key, request.value)
            if existing is not None:
                return False, b"exists", existing, b"", ""
            appended = True
        elif op is Op.DELETE:
            appended = wtxn.delete(request.key)
        else:
            appended = wtxn.clear()
    except ImmutableKeyError as error:
        return False, b"error", b"", b"immutable", str(error)
    except InvalidTimestampError as error:
        return False, b"error", b"", b"timestamp", str(error)
    return appended, b"ok", b"", b"", ""


#: Each sweep looks at this fraction of the stored records (at least
#: :data:`SWEEP_CHUNK`), so that a pass over them takes about this many
#: sweeps (10 minutes at :data:`SWEEP_INTERVAL`) however fast requests
#: come (a fixed number per sweep falls behind any rate above it, and the
#: records pile up without bound).
SWEEP_PASS = 6000


def sweep_requests(backend: LmdbBackend, start: bytes, now_ms: int) -> bytes:
    """Delete the expired request records among the next few from `start` on.

    A record may go once no copy of its request can be delivered any more:
    its expiry plus the longest timeout (a resend carries the original
    deadline, so this is generous). A sweep looks at :data:`SWEEP_CHUNK`
    records, or at the :data:`SWEEP_PASS`-th part of them if that is more.

    Returns
    -------
    Where the next sweep starts.
    """
    horizon = now_ms - int(MAX_TIMEOUT * 1000)
    expires_of = RequestRecord.expires_of

    try:
        with backend.write() as wtxn:
            txn, meta = wtxn.txn, wtxn.tables.meta
            budget = max(SWEEP_CHUNK, txn.stat(meta)["entries"] // SWEEP_PASS)
            cursor = txn.cursor(meta)
            if not cursor.set_range(start):
                return REQUEST_PREFIX
            for _ in range(budget):
                key = cursor.key()
                if not key.startswith(REQUEST_PREFIX):
                    return REQUEST_PREFIX
                expires_ms = expires_of(cursor.value())
                if expires_ms == -1:
                    # Damaged: kept as such (its request's outcome unknown) for
                    # as long as any record, from now on.
                    request_id = bytes(key[len(REQUEST_PREFIX) :])
                    record = RequestRecord.damaged(now_ms, f"request {request_id!r}")
                    logger.error("the record of request %r is damaged", request_id)
                    cursor.put(key, record.encode())
                    wtxn.changed = True
                    expires_ms = now_ms
                if expires_ms >= horizon:
                    if not cursor.next():
                        return REQUEST_PREFIX
                    continue
                wtxn.changed = True
                if not cursor.delete():
                    return REQUEST_PREFIX
            return bytes(cursor.key())
    except StoreError as error:  # the next sweep tries again
        logger.warning("sweeping request records failed: %s", error)
        return start
