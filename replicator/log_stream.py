"""The log stream: every event of the store, verbatim with its chain hash, in Redis for followers.

The daemon appends each event it projects to a bounded Redis stream, from
which ``telstate-replicator follow`` (:mod:`replicator.follow`) keeps
copies of the log on other hosts. Keys, all in the replicators' database
(:data:`telstate.redis.MIRROR_CURSOR_DB`, never the mirror's own, so that
no client of the mirror lists them), for mirror database *db*:

=========================================  ================================================
``telstate-replicator:log:<db>``           stream: one entry per event, entry id
                                           ``<seq>-0``, field ``r`` = the log record
                                           exactly as the store holds it (it ends with
                                           the event's chain hash, see :mod:`telstate.log`)
``telstate-replicator:log-meta:<db>``      hash: ``store`` (UUID), ``host`` and ``path``
                                           of the primary, ``owner`` (the daemon that
                                           appends), ``seq`` and ``chain`` (hex) of the
                                           stream's last entry, ``max_len``
``telstate-replicator:log-writers:<db>``   hash: writer id (ASCII) -> the writer,
                                           msgpack ``[host, pid, name]`` as in the
                                           store's writers table, for every writer id
                                           that an entry of the stream names
``telstate-replicator:promotion:<db>``     hash: the last promotion of a follower of
                                           this mirror's store (:mod:`replicator.promotion`)
``telstate-replicator:followers:<db>``     hash: follower name -> JSON of its position
                                           (``seq``, ``chain``, ``time``, ``lag_events``,
                                           ``lag_seconds``, ``host``, ``path``)
=========================================  ================================================

Exactly once: an entry's id is its seq, and one Lua script
(:data:`_APPEND`) appends a batch, the writers it names and the new head
together, skipping the seqs the stream already has; a daemon killed at
any moment resumes from the head in the meta hash, so no event is in the
stream twice and none is missing between its first entry and its head.
The stream is trimmed (``XADD MAXLEN ~``) to about ``--log-stream-max-len``
events: a follower further behind than that starts again from a backup.

When the stream cannot be continued (Redis restarted empty, the stream
holds another store or another history of this one) the daemon starts it
again: it empties it and refills it with the newest events of the log up
to the bound, so that followers near the end of the log go on.

Fencing after a promotion: the daemon of a promoted store records its
promote event (seq and chain) in the promotion hash before it touches the
mirror. From then on a daemon whose store does not hold that event at that
seq (the old primary, come back) is refused the mirror
(:class:`replicator.redis_sink.RedisSink` stops in its FENCED state) and
the stream: every append names the promotion its daemon knows, and the
script refuses it once another has been recorded. A stream with nothing
to append reads the promotion hash at each check interval, so that an
idle old primary's daemon is refused too (it would otherwise append
nothing, and learn nothing).

States of :class:`LogStream`, advanced by :meth:`LogStream.step` (the
daemon steps it while it holds the mirror)::

    CONNECT --stream continued or started again--> TAIL (appends batches)
    TAIL --refused (owner, promotion, head moved), or idle and the promotion changed--> CONNECT
    any state --Redis failed--> BACKOFF --delay over--> CONNECT
    CONNECT --the store lacks the recorded promotion--> FENCED (for good)

Nothing else in the package knows these layouts.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import socket
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from telstate import log
from telstate.errors import StoreError
from telstate.lmdb import LmdbBackend, read_records, writers_of
from telstate.log import Writer
from telstate.redis import MIRROR_CURSOR_DB
from telstate.remote import Wire, WireScript, control_kwargs
from telstate.utils import ensure_str

from .connection import connect, redact_url
from .promotion import Promotion, damaged_refusal, promotion_key
from .redis_sink import Step

logger = logging.getLogger(__name__)

#: Events the stream keeps by default (about; Redis trims whole nodes).
DEFAULT_MAX_LEN = 100_000
#: The stream entry field that holds the record.
RECORD_FIELD = b"r"


def log_stream_key(db: int) -> bytes:
    """The stream of the events of mirror database `db`'s store."""
    return b"telstate-replicator:log:%d" % db


def log_meta_key(db: int) -> bytes:
    """The hash describing the log stream of mirror database `db`."""
    return b"telstate-replicator:log-meta:%d" % db


def log_writers_key(db: int) -> bytes:
    """The hash of the writers that the log stream of mirror database `db` names."""
    return b"telstate-replicator:log-writers:%d" % db


def followers_key(db: int) -> bytes:
    """The hash in which the followers of mirror database `db` report their positions."""
    return b"telstate-replicator:followers:%d" % db


def entry_id(seq: int) -> bytes:
    """The stream entry id of event `seq`."""
    return b"%d-0" % seq


def entry_seq(entry: bytes) -> int:
    """The seq of a stream entry id.

    Raises
    ------
    ValueError
        If the id is not one the daemon writes (``<seq>-0``).
    """
    seq, _, sub = ensure_str(entry).partition("-")
    if sub != "0" or not seq.isdigit():
        raise ValueError(f"stream entry {ensure_str(entry)!r} is not an event of the log")
    return int(seq)


# The layout of the hashes as Redis holds them (text), read and written only here.


@dataclass(frozen=True)
class StreamMeta:
    """The log stream's meta hash.

    Attributes
    ----------
    store
        UUID of the store whose events the stream holds.
    seq, chain
        The stream's last event and its chain hash (hex); seq is the entry
        before the first one while a stream is new.
    host, path
        Where the primary store lives.
    owner
        The daemon that appends (the mirror's owner).
    max_len
        The bound the daemon trims the stream to.
    """

    store: str
    seq: int
    chain: str
    host: str
    path: str
    owner: str
    max_len: int

    def fields(self) -> list[str | int]:
        """Field/value pairs to HSET."""
        return [
            "store",
            self.store,
            "seq",
            self.seq,
            "chain",
            self.chain,
            "host",
            self.host,
            "path",
            self.path,
            "owner",
            self.owner,
            "max_len",
            self.max_len,
        ]

    @property
    def primary(self) -> str:
        """The primary store, named for messages and for a follower's store."""
        return f"{self.host}:{self.path}"

    @classmethod
    def from_fields(cls, fields: dict[bytes, bytes]) -> StreamMeta | None:
        """Parse the hash; None if it is missing or damaged (a field out of range included)."""
        try:
            # Strictly UTF-8: the primary's name goes into the follower store.
            text = {
                ensure_str(name): ensure_str(value, errors="strict")
                for name, value in fields.items()
            }
            meta = cls(
                store=str(uuid.UUID(text["store"])),
                seq=_count(text["seq"]),
                chain=bytes.fromhex(text["chain"]).hex(),
                host=text.get("host", "?"),
                path=text.get("path", "?"),
                owner=text.get("owner", ""),
                max_len=_count(text.get("max_len") or "0"),
            )
        except (KeyError, ValueError):
            return None
        return meta if len(meta.chain) == 2 * log.CHAIN_SIZE else None


def _count(text: str) -> int:
    """A seq or a length as the daemon writes it (decimal digits, below 2**63); else ValueError."""
    if not text.isascii() or not text.isdigit() or int(text) >= 1 << 63:
        raise ValueError(f"not a count: {text!r}")
    return int(text)


# KEYS: 1 stream, 2 meta, 3 writers, 4 promotion, all in database ARGV[1].
# ARGV[2]: the owner the caller expects in the meta hash; ARGV[3]: the chain
# of the promotion it knows ('' for none, see replicator.promotion); ARGV[4]:
# MAXLEN; ARGV[5]: seq of the
# first record; ARGV[6]: the chain (hex) after the last record; ARGV[7]:
# number n of writer id/identity pairs ARGV[8..7+2n]; the records follow.
# Returns {1, head} once appended (seqs the stream has are skipped), {0,
# reason} if the stream is no longer the caller's, {-1, head} if the first
# record does not follow the head.
_APPEND = """
redis.call('SELECT', ARGV[1])
local m = redis.call('HMGET', KEYS[2], 'owner', 'seq')
if m[1] ~= ARGV[2] then
    return {0, 'the stream is not this daemon\\'s any more (taken over, or Redis lost it)'}
end
if (redis.call('HGET', KEYS[4], 'chain') or '') ~= ARGV[3] then
    return {0, 'a promotion was recorded'}
end
local head = tonumber(m[2])
local seq = tonumber(ARGV[5])
if seq > head + 1 then
    return {-1, head}
end
local n = tonumber(ARGV[7])
if n > 0 then
    redis.call('HSET', KEYS[3], unpack(ARGV, 8, 7 + 2 * n))
end
for i = 8 + 2 * n, #ARGV do
    if seq > head then
        redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], seq .. '-0', 'r', ARGV[i])
    end
    seq = seq + 1
end
if seq - 1 > head then
    head = seq - 1
    redis.call('HSET', KEYS[2], 'seq', head, 'chain', ARGV[6])
end
return {1, head}
"""

# KEYS as _APPEND's. ARGV[2]: 'resume' or 'restart'; ARGV[3]: the owner the
# caller found ('' for none); ARGV[4]: the chain of the promotion it found
# ('' for none); ARGV[5..]: the meta fields. A restart empties the stream first.
_CLAIM = """
redis.call('SELECT', ARGV[1])
if (redis.call('HGET', KEYS[2], 'owner') or '') ~= ARGV[3] then
    return 0
end
if (redis.call('HGET', KEYS[4], 'chain') or '') ~= ARGV[4] then
    return 0
end
if ARGV[2] == 'restart' then
    redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
end
redis.call('HSET', KEYS[2], unpack(ARGV, 5))
return 1
"""


class StreamState(enum.Enum):
    """What the log stream does on its next step."""

    CONNECT = "connect"
    TAIL = "tail"
    BACKOFF = "backoff"
    FENCED = "fenced"


#: Failures of a connection (a reply that is not RESP too: a proxy, another
#: service on the port): the daemon retries, after a backoff.
_TRANSIENT = (
    redis.ConnectionError,
    redis.TimeoutError,
    OSError,
    redis.exceptions.InvalidResponse,
)


class LogStream:
    """Appends a store's events to the log stream of one mirror database.

    Parameters
    ----------
    source
        The store (its raw log is read with :func:`telstate.lmdb.read_records`
        and :func:`telstate.lmdb.writers_of`).
    url, password
        The mirror, as for :class:`~replicator.redis_sink.RedisSink`.
    owner
        Who appends: the mirror's owner (the daemon steps the stream only
        while it holds the mirror).
    max_len
        About how many events the stream keeps.
    batch_events, batch_bytes
        Most events, and roughly most bytes of records, appended in one step.
    backoff
        First and longest delay between attempts while Redis fails.
    socket_timeout
        Seconds to wait for Redis before treating it as failed.
    check_interval
        While idle, how often to check that the promotion hash still records
        the promotion the stream was claimed under (an old primary's daemon
        is fenced once another is recorded, even if no event comes).

    Attributes
    ----------
    refusal
        Why the stream is FENCED (None otherwise).
    """

    def __init__(
        self,
        source: LmdbBackend,
        url: str,
        *,
        owner: str,
        password: str | None = None,
        max_len: int = DEFAULT_MAX_LEN,
        batch_events: int = 5000,
        batch_bytes: int = 8 << 20,
        backoff: tuple[float, float] = (0.1, 10.0),
        socket_timeout: float = 10.0,
        check_interval: float = 1.0,
    ) -> None:
        if max_len < 1 or batch_events < 1 or batch_bytes < 1:
            raise ValueError(
                f"the log stream needs a bound and batches of at least 1, not {max_len},"
                f" {batch_events} events and {batch_bytes} bytes"
            )
        self.source = source
        self.url = redact_url(url)
        mirror, self.db = connect(url, password)
        kwargs = control_kwargs(mirror, MIRROR_CURSOR_DB)
        mirror.close()
        kwargs.update(socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout)
        kwargs.update(client_name="telstate-replicator-log")
        self.client = redis.Redis(
            connection_pool=redis.ConnectionPool(**kwargs), retry=Retry(NoBackoff(), 0)
        )
        self.owner = owner
        self.max_len = max_len
        self.batch_events = batch_events
        self.batch_bytes = batch_bytes
        self.backoff = backoff
        self.state = StreamState.CONNECT
        self.refusal: str | None = None
        #: The stream's last event, as this daemon last appended or found it.
        self.head: int | None = None
        # The chain (hex) after the stream's last event, as this daemon wrote it.
        self._chain = ""
        self._keys = [
            log_stream_key(self.db),
            log_meta_key(self.db),
            log_writers_key(self.db),
            promotion_key(self.db),
        ]
        # Appended over a connection of its own (see telstate.remote.Wire):
        # through redis-py's client the call cost more Python than Redis time.
        self._wire = Wire(self.client.connection_pool)
        self._append = WireScript(self._wire, _APPEND.encode())
        self._claim = self.client.register_script(_CLAIM)
        # The promotion (its chain, '' for none) the stream was claimed under.
        self._promotion = b""
        # Writer ids whose identity the stream's writers hash holds.
        self._writers_sent: set[int] = set()
        self._delay = backoff[0]
        self._retry_at = 0.0
        self.check_interval = check_interval
        self._next_check = 0.0

    def step(self) -> Step:
        """Do the next piece of work; never raises for Redis failures."""
        try:
            if self.state == StreamState.CONNECT:
                return self._connect()
            if self.state == StreamState.TAIL:
                return self._tail()
            if self.state == StreamState.BACKOFF:
                now = time.monotonic()
                if now < self._retry_at:
                    return Step(0, wait=self._retry_at - now)
                self.state = StreamState.CONNECT
                return Step(0)
            return Step(0, wait=self.backoff[1])
        except _TRANSIENT as error:
            return self._fail(f"Redis at {self.url} failed: {error}")
        except StoreError as error:
            return self._fail(f"reading the store failed: {error}")
        except redis.ResponseError as error:
            return self._fail(f"Redis at {self.url} refused a command: {error}")

    def close(self) -> None:
        """Close the connections to Redis."""
        self._wire.close()
        self.client.close()

    def _connect(self) -> Step:
        with self.client.pipeline(transaction=False) as pipe:
            pipe.hgetall(self._keys[1])
            pipe.hgetall(self._keys[3])
            meta_fields, promotion_fields = pipe.execute()
        meta = StreamMeta.from_fields(meta_fields)
        promotion = Promotion.from_fields(promotion_fields)
        refusal = None
        if promotion is not None:
            refusal = promotion.refusal(self.source)
        elif promotion_fields:
            refusal = damaged_refusal(self.db, promotion_fields)
        if refusal is not None:
            self.refusal = refusal
            self.state = StreamState.FENCED
            logger.error("log stream of mirror %s db %d: %s", self.url, self.db, refusal)
            return Step(0, wait=self.backoff[1])
        # The claim compares with the hashes' raw values, as read.
        promoted: bytes = promotion_fields.get(b"chain", b"")
        found: bytes = meta_fields.get(b"owner", b"")
        reason = self._mismatch(meta)
        if meta is None and meta_fields:
            reason = "its meta hash is damaged (foreign or partial write)"
            logger.warning(
                "log stream of mirror %s db %d: the meta hash %r cannot be read; starting the"
                " stream again",
                self.url,
                self.db,
                ensure_str(self._keys[1]),
            )
        last_seq = self.source.last_seq
        if reason is None:
            assert meta is not None
            start = meta.seq + 1
            mode = "resume"
        else:
            start = max(1, last_seq - self.max_len + 1)
            mode = "restart"
        chain = self.source.chain_at(start - 1).hex()
        new = StreamMeta(
            store=str(self.source.uuid),
            seq=start - 1,
            chain=chain,
            host=socket.gethostname(),
            path=self.source.path,
            owner=self.owner,
            max_len=self.max_len,
        )
        fields = new.fields()
        if mode == "resume":
            fields = fields[6:]  # host, path, owner, max_len: the head stays
        if not self._claim(
            keys=self._keys, args=[MIRROR_CURSOR_DB, mode, found, promoted, *fields]
        ):
            # Changed meanwhile (or another daemon claims it too): look again, later.
            return self._fail("the stream's meta or promotion hash changed while claiming it")
        if mode == "restart":
            logger.info(
                "log stream of mirror %s db %d starts again at seq %d (%s)",
                self.url,
                self.db,
                start,
                reason,
            )
        else:
            logger.info(
                "log stream of mirror %s db %d resumes after seq %d", self.url, self.db, start - 1
            )
        self.head = start - 1
        self._chain = chain
        self._promotion = promoted
        self._writers_sent = set()
        self._delay = self.backoff[0]
        self.state = StreamState.TAIL
        return Step(0)

    def _mismatch(self, meta: StreamMeta | None) -> str | None:
        """Why the stream cannot be continued, or None if it can."""
        if meta is None:
            return "it has no meta hash: a new stream, or Redis lost its data"
        if meta.store != str(self.source.uuid):
            return f"it held store {meta.store}"
        try:
            chain = self.source.chain_at(meta.seq).hex()
        except ValueError:
            return f"its head (seq {meta.seq}) is past the end of the log"
        if chain != meta.chain:
            return (
                f"its chain at seq {meta.seq} is not the store's: it held another history"
                " of the store (an old primary's, or the store was restored from an older copy)"
            )
        return None

    def _meta_changed(self, fields: dict[bytes, bytes]) -> str | None:
        """What differs in the meta hash from what this stream wrote (None if nothing).

        Appends check only its owner, and move its seq and chain: a field
        damaged otherwise (by hand, or a foreign write) would stay while
        appends go on, and new followers would wait for it to be replaced.
        """
        meta = StreamMeta.from_fields(fields)
        if meta is None:
            return "its meta hash is missing or damaged: replacing it"
        if (meta.store, meta.seq, meta.chain, meta.host, meta.path, meta.owner, meta.max_len) != (
            str(self.source.uuid),
            self.head,
            self._chain,
            socket.gethostname(),
            self.source.path,
            self.owner,
            self.max_len,
        ):
            return "its meta hash is not as this replicator wrote it: claiming it again"
        return None

    def _tail(self) -> Step:
        assert self.head is not None
        batch: list[tuple[int, bytes]] = []
        size = 0
        for seq, record in read_records(self.source, self.head + 1, self.batch_events):
            batch.append((seq, record))
            size += len(record)
            if size >= self.batch_bytes:
                break
        if not batch:
            now = time.monotonic()
            if now >= self._next_check:
                self._next_check = now + self.check_interval
                with self.client.pipeline(transaction=False) as pipe:
                    pipe.hget(self._keys[3], "chain")
                    pipe.hgetall(self._keys[1])
                    promoted, meta_fields = pipe.execute()
                changed = (
                    "the promotion hash changed"
                    if (promoted or b"") != self._promotion
                    else self._meta_changed(meta_fields)
                )
                if changed is not None:
                    # CONNECT fences the stream if the store lacks the promotion,
                    # replaces a damaged meta hash, or claims the stream again.
                    logger.info("log stream of mirror %s db %d: %s", self.url, self.db, changed)
                    self.state = StreamState.CONNECT
                    return Step(0)
            return Step(0, wait=self.backoff[1], idle=True)
        ids = {log.record_op_writer(record)[1] for _, record in batch} - self._writers_sent
        writers: list[Any] = []
        if ids:
            for writer_id, writer in writers_of(self.source, ids).items():
                writers += (writer_id, log.encode_writer(Writer(*writer)))
        first, last = batch[0][0], batch[-1][0]
        done, head = self._append(
            keys=self._keys,
            args=[
                MIRROR_CURSOR_DB,
                self.owner,
                self._promotion,
                self.max_len,
                first,
                log.record_chain(batch[-1][1]).hex(),
                len(writers) // 2,
                *writers,
                *(record for _, record in batch),
            ],
        )
        if done != 1:
            why = ensure_str(head) if done == 0 else f"its head is seq {int(head)}"
            logger.warning(
                "log stream of mirror %s db %d refused events %d-%d: %s",
                self.url,
                self.db,
                first,
                last,
                why,
            )
            self.state = StreamState.CONNECT
            return Step(0)
        self._writers_sent |= ids
        if int(head) > last:
            # The meta hash says the stream holds events the log does not (its
            # seq raised by hand): start it again.
            logger.warning(
                "log stream of mirror %s db %d: its meta hash says it holds seq %d, past the"
                " log's %d: starting it again",
                self.url,
                self.db,
                int(head),
                last,
            )
            self.state = StreamState.CONNECT
            return Step(0)
        self.head = int(head)
        self._chain = (
            log.record_chain(batch[-1][1]).hex()
            if self.head == last
            else self.source.chain_at(self.head).hex()
        )
        if len(batch) < self.batch_events and size < self.batch_bytes:
            # Level with the log as it was read: new commits call for the next step.
            return Step(last - first + 1, wait=self.backoff[1], idle=True)
        return Step(last - first + 1)

    def _fail(self, message: str) -> Step:
        logger.warning("log stream: %s; retrying in %.1f s", message, self._delay)
        self.state = StreamState.BACKOFF
        self._wire.close()
        self._retry_at = time.monotonic() + self._delay
        wait = self._delay
        self._delay = min(self._delay * 2, self.backoff[1])
        return Step(0, wait=wait)


# --- what followers read and report ----------------------------------------------------


def read_meta(client: redis.Redis, db: int) -> StreamMeta | None:
    """The log stream's meta hash (`client` on the replicators' database)."""
    fields: Any = client.hgetall(log_meta_key(db))
    return StreamMeta.from_fields(fields)


def first_seq(client: redis.Redis, db: int) -> int | None:
    """The seq of the stream's first entry; None if it is empty."""
    entries: Any = client.xrange(log_stream_key(db), count=1)
    return entry_seq(entries[0][0]) if entries else None


def read_entries(
    client: redis.Redis, db: int, after_seq: int, count: int, block_ms: int | None
) -> list[tuple[int, bytes]]:
    """The stream's entries after `after_seq`, as (seq, record), waiting up to `block_ms`.

    Raises
    ------
    ValueError
        If an entry is not an event of the log (a foreign write): its id is
        not a seq, or it holds no record or one too short to be a record.
    """
    reply: Any = client.xread(
        {log_stream_key(db): entry_id(after_seq)}, count=count, block=block_ms
    )
    entries = []
    for _, items in reply or ():
        for entry, fields in items:
            record = fields.get(RECORD_FIELD)
            if record is None:
                raise ValueError(f"stream entry {ensure_str(entry)!r} holds no record")
            if len(record) < log.MIN_RECORD_SIZE:
                raise ValueError(
                    f"stream entry {ensure_str(entry)!r} holds {len(record)} bytes, too few for a"
                    f" log record (at least {log.MIN_RECORD_SIZE})"
                )
            entries.append((entry_seq(entry), record))
    return entries


def read_writers(client: redis.Redis, db: int, ids: Iterable[int]) -> dict[int, Writer]:
    """The writers with these ids that the stream names (missing ones are left out).

    Raises
    ------
    ValueError
        If the hash holds something else than a writer for one of them (its id is named).
    """
    wanted = sorted(ids)
    if not wanted:
        return {}
    values: Any = client.hmget(log_writers_key(db), wanted)
    writers = {}
    for writer_id, value in zip(wanted, values):
        if value is not None:
            try:
                writer = log.decode_writer(value)
            except ValueError as error:
                raise ValueError(f"writer {writer_id} of the writers hash: {error}") from None
            if not (
                isinstance(writer.host, str)
                and type(writer.pid) is int
                and isinstance(writer.name, (str, type(None)))
            ):
                raise ValueError(f"writer {writer_id} of the writers hash is not one: {writer!r}")
            writers[writer_id] = writer
    return writers


def report_position(client: redis.Redis, db: int, name: str, position: dict[str, Any]) -> None:
    """Record follower `name`'s position (JSON) in the followers hash."""
    client.hset(followers_key(db), name, json.dumps(position, sort_keys=True))


def positions_from(fields: dict[bytes, bytes]) -> dict[str, dict[str, Any]]:
    """Every follower's last reported position, by name, from the followers hash's fields.

    Reports that cannot be read are left out.
    """
    positions = {}
    for name, value in fields.items():
        try:
            position = json.loads(value)
        except ValueError:
            continue
        if not isinstance(position, dict) or type(position.get("seq")) is not int:
            continue
        reported = position.get("time", 0.0)
        if type(reported) not in (int, float) or not math.isfinite(reported):
            continue  # not a report a follower writes: a foreign or damaged one
        positions[ensure_str(name)] = position
    return positions
