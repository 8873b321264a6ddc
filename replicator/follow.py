"""``telstate-replicator follow``: keeps a follower store up to date from the log stream.

A follower is a full copy of a store's log on another host, with the same
UUID, read-only to everyone but this process. It reads the daemon's log
stream (:mod:`replicator.log_stream`) from its own head onwards and appends
the records verbatim with :func:`telstate.lmdb.apply_records`, which checks
the chain at every event and commits each batch in one LMDB transaction.

Its position is its store's head: nothing is kept anywhere else, so a
follower killed at any moment resumes after the last batch it committed,
with no event applied twice and none lost. Redis failing (or restarting
empty), and a meta hash that cannot be read (damaged: the daemon replaces
it), are waited out with backoff; once the daemon has refilled the
stream, the follower goes on if the stream still reaches its position.

It stops for good (:class:`FollowError`, exit status 1) when it cannot go
on without losing or inventing history:

- the stream has moved past its position (trimmed, or refilled after a
  Redis restart further on): start it again from ``telstate backup``;
- an event does not continue its chain (the primary and the follower have
  diverged: the primary was restored from an older copy, or promoted
  elsewhere);
- the stream is of another store than the follower's;
- the stream holds what the daemon never writes (an entry that is not an
  event, a writer of the writers hash that is not one, a writer id that
  comes back with another identity than the follower adopted).

States, advanced by :meth:`Follower.step`::

    CONNECT --store open, stream of its store--> FOLLOW (applies batches)
    any state --Redis failed, no stream yet--> BACKOFF --delay over--> CONNECT
    CONNECT --meta hash damaged--> BACKOFF (in FOLLOW it is said once, and skipped)

About once a second (:data:`REPORT_INTERVAL`) the follower reports its
position in the followers hash, where ``telstate-replicator status`` reads it.
"""

from __future__ import annotations

import enum
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, NoReturn

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from telstate import log
from telstate.errors import ChainMismatchError, StoreError, TelstateError
from telstate.lmdb import LmdbBackend
from telstate.log import Writer
from telstate.redis import MIRROR_CURSOR_DB
from telstate.remote import control_kwargs

from .connection import connect, redact_url
from .log_stream import (
    StreamMeta,
    first_seq,
    log_meta_key,
    read_entries,
    read_meta,
    read_writers,
    report_position,
)
from .redis_sink import Step

logger = logging.getLogger(__name__)

#: Seconds between position reports (and checks of the stream's meta hash).
REPORT_INTERVAL = 1.0
#: Longest XREAD BLOCK, so that a stop or a lost connection is noticed.
_BLOCK = 1.0
#: Entries asked for by the first read, before record sizes are known.
_FIRST_COUNT = 16


class FollowError(TelstateError):
    """The follower cannot go on: the message says why and what to do."""


class _NotYet(Exception):
    """The follower store cannot be set up yet: try again later."""


class FollowState(enum.Enum):
    """What the follower does on its next step."""

    CONNECT = "connect"
    FOLLOW = "follow"
    BACKOFF = "backoff"


#: Failures of a connection (a reply that is not RESP too: a proxy, another
#: service on the port): the daemon retries, after a backoff.
_TRANSIENT = (
    redis.ConnectionError,
    redis.TimeoutError,
    OSError,
    redis.exceptions.InvalidResponse,
)


class Follower:
    """Keeps the follower store at `path` up to date from the log stream of a mirror.

    Parameters
    ----------
    url, password
        The mirror (its URL names the database whose log stream to follow).
    path
        The follower store: made from seq 1 if it does not exist, or is
        an empty directory, or holds an LMDB environment with nothing in
        it (the stream must still reach seq 1), or a backup of the primary
        (made a follower), or a follower of the same store.
    name
        How the follower reports itself (default: host and path).
    batch
        Most events read and applied at once.
    batch_bytes
        Rough bound on the bytes of records read at once.
    durability
        Of the follower store's commits (see :class:`telstate.lmdb.LmdbBackend`).
    backoff
        First and longest delay between attempts while Redis fails.
    socket_timeout
        Seconds to wait for Redis before treating it as failed.
    stop
        Set it to make :meth:`run` return after the current batch.
    """

    def __init__(
        self,
        url: str,
        path: str,
        *,
        password: str | None = None,
        name: str | None = None,
        batch: int = 5000,
        batch_bytes: int = 8 << 20,
        durability: str = "batch",
        backoff: tuple[float, float] = (0.1, 10.0),
        socket_timeout: float = 10.0,
        stop: threading.Event | None = None,
    ) -> None:
        if batch < 1 or batch_bytes < 1:
            raise ValueError(
                f"batches need at least one event and one byte, not {batch} and {batch_bytes}"
            )
        self.url = redact_url(url)
        mirror, self.db = connect(url, password)
        kwargs = control_kwargs(mirror, MIRROR_CURSOR_DB)
        mirror.close()
        kwargs.update(socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout)
        kwargs.update(client_name="telstate-follower")
        self.client = redis.Redis(
            connection_pool=redis.ConnectionPool(**kwargs), retry=Retry(NoBackoff(), 0)
        )
        self.path = os.path.abspath(path)
        self.name = name or f"{socket.gethostname()}:{self.path}"
        self.batch = batch
        self.batch_bytes = batch_bytes
        # Entries asked for per read: few at first, then as many as `batch_bytes`
        # holds at the last read's mean record size (XREAD has no bound in bytes).
        self._count = min(batch, _FIRST_COUNT)
        # The largest record read so far: reads are sized from it, so that a run of
        # large records after small ones is not read thousands at once.
        self._largest = 1
        self.durability = durability
        self.backoff = backoff
        self.stop = stop or threading.Event()
        self.state = FollowState.CONNECT
        self.store: LmdbBackend | None = None
        #: The follower's position: its store's last event.
        self.seq = 0
        self._chain = b""
        self._meta: StreamMeta | None = None
        self._writers: dict[int, Writer] = {}
        self._delay = backoff[0]
        self._retry_at = 0.0
        self._next_report = 0.0
        self._failed_since: float | None = None
        # Whether Redis refused a position report (said once).
        self._unreported = False
        # Whether the meta hash was found damaged while following (said once).
        self._damage_said = False

    def run(self) -> None:
        """Follow until :attr:`stop` is set.

        Raises
        ------
        FollowError
            If the follower cannot go on (see the module docstring).
        """
        while not self.stop.is_set():
            step = self.step()
            if step.wait > 0:
                self.stop.wait(step.wait)

    def step(self) -> Step:
        """Do the next piece of work; never raises for Redis failures.

        Raises
        ------
        FollowError
            If the follower cannot go on.
        """
        try:
            if self.state == FollowState.CONNECT:
                return self._connect()
            if self.state == FollowState.FOLLOW:
                return self._follow()
            now = time.monotonic()
            if now < self._retry_at:
                return Step(0, wait=self._retry_at - now)
            self.state = FollowState.CONNECT
            return Step(0)
        except _TRANSIENT as error:
            return self._fail(f"Redis at {self.url} failed: {error}")
        except redis.ResponseError as error:
            return self._fail(f"Redis at {self.url} refused a command: {error}")

    def close(self) -> None:
        """Close the store and the connection to Redis."""
        if self.store is not None:
            self.store.close()
            self.store = None
        self.client.close()

    # The states

    def _connect(self) -> Step:
        meta = read_meta(self.client, self.db)
        if meta is None:
            if self._meta_damaged():
                return self._fail(
                    f"the log stream's meta hash in mirror {self.url} db {self.db} cannot be"
                    " read (damaged, or written by something else than a daemon): waiting"
                    " for the daemon to replace it"
                )
            return self._fail(
                f"mirror {self.url} db {self.db} has no log stream (yet): is"
                " `telstate-replicator run` running on the primary, with its log stream?"
            )
        if self.store is None:
            try:
                self.store = self._open_store(meta)
            except _NotYet as error:
                return self._fail(str(error))
            except StoreError as error:
                raise FollowError(f"cannot make the follower at {self.path}: {error}") from None
        if meta.store != str(self.store.uuid):
            raise FollowError(
                f"the log stream of mirror {self.url} db {self.db} is of store {meta.store}"
                f" ({meta.primary}), not of {self.store.uuid}, the follower at {self.path}"
            )
        self.seq, self._chain = self.store.head
        self._meta = meta
        if self._failed_since is not None:
            logger.info(
                "log stream readable again after %.1f s", time.monotonic() - self._failed_since
            )
            self._failed_since = None
        logger.info(
            "following store %s (primary %s) from seq %d, mirror %s db %d",
            meta.store,
            meta.primary,
            self.seq,
            self.url,
            self.db,
        )
        # The backoff delay is reset once a batch applies (in _follow), not
        # here: a stream that connects but cannot be applied keeps backing off.
        self.state = FollowState.FOLLOW
        return Step(0)

    def _open_store(self, meta: StreamMeta) -> LmdbBackend:
        """Open the follower store, making it first if need be."""
        from telstate.lmdb import create_follower, make_follower
        from telstate.lmdb.environment import holds_no_store

        # An empty directory (a mount point), or a follower killed while it made its
        # store there, holds no store: the follower is made there as where none exists.
        if holds_no_store(self.path):
            first = first_seq(self.client, self.db)
            if first is None:
                first = meta.seq + 1  # the stream's next entry
            if first != 1:
                raise FollowError(
                    f"there is no store at {self.path}, and the log stream of mirror {self.url}"
                    f" db {self.db} no longer reaches back to seq 1 (it starts at seq"
                    f" {first}): copy the primary with `telstate backup` ({meta.primary}) to"
                    f" {self.path}, then start the follower again"
                )
            create_follower(self.path, uuid.UUID(meta.store), meta.primary)
            logger.info("made follower %s of store %s", self.path, meta.store)
        else:
            try:
                existing = LmdbBackend(self.path, readonly=True)
            except StoreError as error:
                raise FollowError(f"cannot open the follower at {self.path}: {error}") from None
            try:
                store, role, primary = str(existing.uuid), existing.role, existing.primary
                last_seq = existing.last_seq
            finally:
                existing.close()
            if store != meta.store:
                raise FollowError(
                    f"the store at {self.path} is store {store}, not {meta.store} whose log"
                    f" stream mirror {self.url} db {self.db} holds: follow it with a new path,"
                    " or a `telstate backup` of its primary"
                )
            if role != "follower":
                if (meta.host, meta.path) == (socket.gethostname(), self.path):
                    raise FollowError(
                        f"the store at {self.path} is the primary itself: a follower is a"
                        " copy of it elsewhere (`telstate backup`)"
                    )
                if last_seq > meta.seq:
                    # A backup is never ahead of the stream, unless the daemon lags.
                    raise _NotYet(
                        f"the store at {self.path} (seq {last_seq}) is ahead of the log stream"
                        f" (seq {meta.seq}): waiting for the daemon before making it a follower"
                    )
                make_follower(self.path, meta.primary)
                logger.info("made %s (a copy of the primary) a follower", self.path)
            elif primary != meta.primary:
                make_follower(self.path, meta.primary)  # the primary's new name
                logger.info("%s now follows %s (was %s)", self.path, meta.primary, primary)
        try:
            return LmdbBackend(self.path, durability=self.durability)
        except StoreError as error:
            raise FollowError(f"cannot open the follower at {self.path}: {error}") from None

    def _follow(self) -> Step:
        from telstate.lmdb import apply_records

        assert self.store is not None
        now = time.monotonic()
        if now >= self._next_report:
            self._report()
            now = time.monotonic()
        block = max(1, int(min(_BLOCK, self._next_report - now) * 1000))
        try:
            entries = read_entries(self.client, self.db, self.seq, self._count, block)
        except ValueError as error:
            raise FollowError(f"the log stream of {self.url} db {self.db}: {error}") from None
        if not entries:
            return Step(0)
        if entries[0][0] != self.seq + 1:
            self._moved_past(entries[0][0])
        count = 1
        while count < len(entries) and entries[count][0] == self.seq + 1 + count:
            count += 1
        records = [record for _, record in entries[:count]]
        self._largest = max(self._largest, *(len(record) for _, record in entries))
        self._count = max(1, min(self.batch, self.batch_bytes // self._largest))
        writers = self._writers_of(records)
        if writers is None:
            return self._fail(
                f"the log stream of mirror {self.url} db {self.db} names writers that its"
                " writers hash lacks (Redis lost part of its data?)"
            )
        try:
            self.seq, self._chain = apply_records(self.store, self.seq + 1, records, writers)
        except ChainMismatchError as error:
            self._diverged(str(error))
        except StoreError as error:
            raise FollowError(
                f"the follower at {self.path} cannot take the events: {error}"
            ) from None
        self._delay = self.backoff[0]
        return Step(count)

    def _diverged(self, detail: str) -> NoReturn:
        raise FollowError(
            f"the log stream of mirror {self.url} db {self.db} does not continue the follower"
            f" at {self.path} (seq {self.seq}): {detail}. The primary and the follower have"
            " diverged (the primary was restored from an older copy, or another follower was"
            " promoted); start the follower again from `telstate backup` of the current primary"
        )

    def _moved_past(self, first: int) -> None:
        bound = f" (it keeps about {self._meta.max_len} events)" if self._meta else ""
        raise FollowError(
            f"the log stream of mirror {self.url} db {self.db} has moved past the follower at"
            f" {self.path}: the follower is at seq {self.seq} and the stream goes on from seq"
            f" {first}{bound}. Start the follower again from a `telstate backup` of the"
            " primary (or raise --log-stream-max-len on its daemon)"
        )

    def _writers_of(self, records: list[bytes]) -> dict[int, Writer] | None:
        """The writers the records name, from this process's cache or the stream's hash.

        None if the hash lacks one of them.
        """
        ids = {log.record_op_writer(record)[1] for record in records}
        missing = ids - self._writers.keys()
        if missing:
            try:
                self._writers.update(read_writers(self.client, self.db, missing))
            except ValueError as error:
                raise FollowError(
                    f"the log stream of mirror {self.url} db {self.db}: {error}"
                ) from None
            if missing - self._writers.keys():
                return None
        return {writer_id: self._writers[writer_id] for writer_id in ids}

    def _report(self) -> None:
        """Report the position, and check that the stream is still of this store."""
        assert self.store is not None
        meta = read_meta(self.client, self.db)
        self._next_report = time.monotonic() + REPORT_INTERVAL
        if meta is None:
            # Redis restarted empty, or the hash is damaged: the daemon refills the
            # stream, or replaces the hash when it next appends.
            if self._meta_damaged() and not self._damage_said:
                logger.warning(
                    "the log stream's meta hash in mirror %s db %d cannot be read (damaged, or"
                    " written by something else than a daemon): waiting for the daemon to"
                    " replace it",
                    self.url,
                    self.db,
                )
                self._damage_said = True
            return
        self._damage_said = False
        if meta.store != str(self.store.uuid):
            raise FollowError(
                f"the log stream of mirror {self.url} db {self.db} is now of store"
                f" {meta.store} ({meta.primary}), not of {self.store.uuid}: stopping"
            )
        self._meta = meta
        if meta.seq <= self.seq:
            try:
                chain = self.store.chain_at(meta.seq).hex()
            except ValueError as error:  # from_fields admits no such seq: defence in depth
                raise FollowError(
                    f"the log stream of mirror {self.url} db {self.db}: its head: {error}"
                ) from None
            if chain != meta.chain:
                # The stream's head is in the follower's past, and of another history:
                # no entry to come will ever continue the follower.
                self._diverged(f"the stream's chain at seq {meta.seq} is not the follower's")
        behind = max(0, meta.seq - self.seq)
        lag_seconds = 0.0
        if behind:
            try:
                following = read_entries(self.client, self.db, self.seq, 1, None)
            except ValueError as error:
                raise FollowError(
                    f"the log stream of mirror {self.url} db {self.db}: {error}"
                ) from None
            if following:
                lag_seconds = max(0.0, time.time() - log.record_time(following[0][1]))
        position: dict[str, Any] = {
            "seq": self.seq,
            "chain": self._chain.hex(),
            "time": time.time(),
            "lag_events": behind,
            "lag_seconds": lag_seconds,
            "host": socket.gethostname(),
            "path": self.path,
            "pid": os.getpid(),
        }
        try:
            report_position(self.client, self.db, self.name, position)
        except redis.exceptions.NoPermissionError as error:
            if not self._unreported:
                logger.warning(
                    "cannot report the position (%s): give the follower a Redis user with the"
                    " follower rules (see the README, 'Followers')",
                    error,
                )
            self._unreported = True

    def _meta_damaged(self) -> bool:
        """Whether the stream's meta hash exists (read_meta gave None: so it is damaged)."""
        return bool(self.client.exists(log_meta_key(self.db)))

    def _fail(self, message: str) -> Step:
        logger.warning("%s; retrying in %.1f s", message, self._delay)
        if self._failed_since is None:
            self._failed_since = time.monotonic()
        self.state = FollowState.BACKOFF
        self._retry_at = time.monotonic() + self._delay
        wait = self._delay
        self._delay = min(self._delay * 2, self.backoff[1])
        return Step(0, wait=wait)
