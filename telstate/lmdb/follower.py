"""Follower stores: copies of another store's log, changed only by its events, and promotion.

A store is a *primary* (every store, unless made otherwise) or a
*follower* of a named primary (the meta table's ``follows`` entry, see
:mod:`telstate.lmdb.layout`; the name is free text chosen by whoever made
the follower, e.g. ``host:/path`` or a Redis URL). A follower has its
primary's UUID, so its genesis chain is the primary's, and it holds a
prefix of the primary's log, record for record and chain for chain::

    create_follower (empty)  ─┐
    backup + make_follower   ─┴─▶  FOLLOWER ──promote──▶  PRIMARY
                                   │    ▲
                                   └────┘ apply_records (the primary's next events)

- Readers see a follower as any store: reads, ``wait_key``,
  :meth:`~telstate.lmdb.LmdbBackend.events`, history, replay, verify,
  export. Every other write raises :exc:`~telstate.errors.ReadOnlyError`
  naming the primary (checked inside the write transaction, so a store
  made a follower while a writer has it open refuses that writer's next
  write).
- :func:`apply_records` is the only way a follower changes: it appends
  the primary's records verbatim, checking each against the follower's
  chain (:exc:`~telstate.errors.ChainMismatchError` if one does not
  continue it), and applies each event to the state tables through the
  very operations of :class:`~telstate.lmdb.writes.WriteTxn` that the
  primary ran. All of one call is one transaction, so a crash leaves the
  follower at a whole call's boundary.
- :func:`promote` turns a follower into a primary: it appends a promotion
  event (:attr:`telstate.log.Op.PROMOTE`, which changes no key) in the
  transaction that removes ``follows``. From that event on the promoted
  store's chain differs from anything the old primary writes at the same
  seq, which is how the old primary, if it comes back, is told apart
  (and fenced off) by the mirror and the followers.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from secrets import token_hex
from typing import TYPE_CHECKING

from .. import log
from ..errors import ChainMismatchError, ImmutableKeyError, InvalidTimestampError, StoreError
from ..log import Writer
from ..utils import PathType
from .backup import _fsync, _remove_stale, _rename_new
from .bulk import is_newest
from .environment import Store, create_store
from .eventlog import append_record, log_chunk, writers_in
from .layout import FOLLOWS, MUTABLE, clear_imports_in, key_record, name_key_of, primary_in
from .samples import append_samples, latest_member
from .writes import WriteTxn, wrong_type

if TYPE_CHECKING:
    from .backend import LmdbBackend

#: The roles of a store (:attr:`LmdbBackend.role <telstate.lmdb.LmdbBackend.role>`).
PRIMARY, FOLLOWER = "primary", "follower"

#: A writer as :func:`apply_records` takes it and :func:`writers_of` gives it: (host, pid, name).
WriterFields = tuple[str, int, "str | None"]

_HOST = socket.gethostname()


class FollowerTxn(WriteTxn):
    """A write transaction that changes a store's role, or applies its primary's events.

    Used by :func:`apply_records`, :func:`make_follower` and
    :func:`promote`; the write operations of :class:`WriteTxn` run in it
    only on behalf of :meth:`apply`.

    Parameters
    ----------
    store, writer_name
        As for :class:`WriteTxn`.
    require_follower
        Refuse (StoreError on entering) a store that is a primary.

    Attributes
    ----------
    primary
        The primary the store follows as the transaction began; None if
        it is a primary.
    """

    __slots__ = ("primary", "_require_follower", "_record", "_writers")

    def __init__(self, store: Store, writer_name: str | None, require_follower: bool) -> None:
        super().__init__(store, writer_name)
        self._require_follower = require_follower
        self.primary: str | None = None
        # The record the operation in progress appends (see apply).
        self._record: bytes | None = None
        # The follower's writers table, read when the first event is applied.
        self._writers: dict[int, Writer] | None = None

    def _check_role(self) -> None:
        self.primary = primary_in(self.txn, self.tables)
        if self.primary is None and self._require_follower:
            raise StoreError(
                f"the telstate store at {self._store.path!r} is a primary, not a follower: "
                "only a follower takes another store's events (make one with "
                "create_follower, or make_follower on a `telstate backup` of the primary)"
            )
        self._primary_after = self.primary is None

    @property
    def head(self) -> tuple[int, bytes]:
        """(seq, chain) of the last event, those applied in this transaction included."""
        seq, _, chain = self._last_event()
        return seq, chain

    def follow(self, primary: str) -> None:
        """Make the store a follower of `primary` (or record a new name for its primary)."""
        self.txn.put(FOLLOWS, primary.encode(), db=self.tables.meta)
        # A copy made during an import: the primary's events will finish it.
        clear_imports_in(self.txn, self.tables)
        self.primary = primary
        self._primary_after = False
        self.changed = True

    def apply(self, record: bytes, writers: Mapping[int, WriterFields]) -> None:
        """Apply the primary's next event: its record verbatim, its effect on the state.

        Raises
        ------
        ChainMismatchError
            If `record` does not continue the store's chain.
        StoreError
            If it is not a valid record, names a writer that `writers`
            lacks or that differs from the store's writer of that id, or
            does not change this store as it changed the primary (their
            states differ).
        """
        seq, _, previous_chain = self._last_event()
        seq += 1
        if not log.chain_matches(previous_chain, record):
            raise ChainMismatchError(
                f"event {seq} does not continue the chain of the store at {self._store.path!r} "
                f"(chain {previous_chain.hex()[:16]} at seq {seq - 1}): it is of another store, "
                "of another history of this one (the primary was replaced, or this store was "
                "promoted), or it was altered"
            )
        try:
            op_code, writer_id, _, timestamp, key, sub_key, value, _ = log.decode_record(record)
        except ValueError as error:
            raise StoreError(f"event {seq}: {error}") from None
        self._adopt_writer(seq, writer_id, writers)
        self._record = record
        try:
            if op_code == log.ADD_MUTABLE:
                self.add_mutable(key, value, timestamp)
            elif op_code == log.SET_IMMUTABLE:
                self.set_immutable(key, value)
            elif op_code == log.SET_INDEXED:
                self.set_indexed(key, sub_key, value)
            elif op_code == log.DELETE:
                self.delete(key)
            elif op_code == log.CLEAR:
                self.clear()
            elif op_code == log.PROMOTE:
                self._append(log.PROMOTE, None)
            elif op_code == log.ADD_MUTABLE_MANY:
                self._add_mutable_many(key, value)
            else:
                raise StoreError(f"event {seq} has unknown operation code {op_code}")
        except (ImmutableKeyError, InvalidTimestampError) as error:
            raise self._diverged(seq, str(error)) from None
        if self._record is not None:
            self._record = None
            raise self._diverged(seq, "it changes nothing here")

    def _add_mutable_many(self, key: bytes, payload: bytes) -> None:
        """Apply an import's add_mutable_many event: its samples, then its record.

        An import records in such events only samples that follow the
        key's latest one (:func:`telstate.lmdb.bulk.load`); they go into
        sealed blocks here too, so the key's samples are the primary's,
        though not necessarily in the same blocks (the primary seals a
        whole import piece at once, the follower each event).
        """
        try:
            members = log.sample_members(payload)  # checked: sorted, distinct, short values
        except ValueError as error:
            raise StoreError(f"event {self.next_seq()}: {error}") from None
        txn, tables = self.txn, self.tables
        name_key = name_key_of(key)
        record = key_record(txn, tables, name_key)
        if record is None:
            record = self.new_key(name_key, MUTABLE, key, b"")
        elif record.type_code != MUTABLE:
            raise wrong_type(key, record, "mutable")
        elif latest_member(txn, tables, record.key_id, record.flags) >= members[0]:
            return  # apply() reports that the event does not change this store as the primary
        self._mark_format()
        newest = is_newest(txn, tables, record.key_id)
        append_samples(
            txn, tables, name_key, record.key_id, record.flags, members, self.next_seq(), newest
        )
        self._append(log.ADD_MUTABLE_MANY, name_key, key)

    def _diverged(self, seq: int, reason: str) -> StoreError:
        return StoreError(
            f"event {seq} cannot be applied to the follower at {self._store.path!r} ({reason}): "
            "its state differs from the primary's although their chains agree; the follower "
            "is damaged (check it with `telstate verify`) and must be made again"
        )

    def _adopt_writer(self, seq: int, writer_id: int, writers: Mapping[int, WriterFields]) -> None:
        """Register the primary's writer `writer_id` under the same id, unless it is here."""
        known = self._writers
        if known is None:
            known = self._writers = writers_in(self.txn, self.tables)
        writer = known.get(writer_id)
        given = writers.get(writer_id)
        if writer is not None and (given is None or tuple(writer) == tuple(given)):
            return
        if given is None:
            raise StoreError(
                f"event {seq} names writer {writer_id}, which the writers given lack "
                "(pass the primary's writers of every event applied: writers_of)"
            )
        if writer is not None:
            raise StoreError(
                f"writer {writer_id} is {tuple(writer)} in the follower at "
                f"{self._store.path!r} but {tuple(given)} in the primary: their writers differ"
            )
        host, pid, name = given
        writer = known[writer_id] = Writer(host, pid, name)
        if not self.txn.put(
            log.pack_writer_id(writer_id), log.encode_writer(writer), db=self.tables.writers
        ):
            raise StoreError(f"LMDB refused writer {writer_id} (the store may be damaged)")

    def _append(
        self,
        op_code: int,
        name_key: bytes | None,
        key: bytes = b"",
        sub_key: bytes = b"",
        value: bytes = b"",
        timestamp: float = math.nan,
    ) -> None:
        """Append the primary's record of the operation that :meth:`apply` runs, verbatim."""
        record, self._record = self._record, None
        if record is None:
            raise StoreError("a follower's operation appended an event apply() did not give")
        seq = self._last_event()[0] + 1
        append_record(self.txn, self.tables, seq, name_key, record)
        self._appended = (seq, log.record_time(record), log.record_chain(record))
        self.changed = True

    def promote(self, name: str | None) -> int:
        """Make the store the primary, recording it as a promotion event; return its seq.

        `name` names the new primary in the event (default ``host:path``).
        """
        if self.primary is None:
            raise StoreError(f"the telstate store at {self._store.path!r} is already a primary")
        seq, previous_time, previous_chain = self._last_event()
        seq += 1
        now = max(time.time(), previous_time)  # event times never go back
        path = self._store.path
        value = log.promotion_value(self.primary, name or f"{_HOST}:{path}", _HOST, path, now)
        record = log.chained_record(previous_chain, log.PROMOTE, self._writer(), now, value=value)
        append_record(self.txn, self.tables, seq, None, record)
        self.txn.delete(FOLLOWS, db=self.tables.meta)
        self._appended = (seq, now, log.record_chain(record))
        self.primary = None
        self._primary_after = True
        self.changed = True
        return seq


def _existing_store(path: PathType) -> str:
    """`path` as a string, if it holds a store (else StoreError: nothing is created)."""
    path = os.fsdecode(path)
    if not os.path.exists(os.path.join(path, "data.mdb")):
        raise StoreError(f"no telstate store at {path!r}: it has no data.mdb")
    return path


def _check_primary_name(primary: str) -> None:
    if not isinstance(primary, str) or not primary:
        raise ValueError(f"the primary must be named by a non-empty string, not {primary!r}")


def make_follower(path: PathType, primary: str) -> None:
    """Make the existing store at `path` a follower of `primary`.

    For a copy of the primary made with ``telstate backup``: from now on
    it is read-only, and :func:`apply_records` brings it up to date. A
    follower made again gets the new name.

    Raises
    ------
    ValueError
        If `primary` is empty.
    StoreError
        If there is no store at `path`, or it cannot be written.
    """
    from .backend import LmdbBackend

    _check_primary_name(primary)
    with LmdbBackend(_existing_store(path), durability="fsync") as backend:
        with FollowerTxn(backend._writable_store(), None, require_follower=False) as ftxn:
            ftxn.follow(primary)


def create_follower(path: PathType, store_uuid: uuid.UUID, primary: str) -> None:
    """Create an empty follower of `primary`, whose identity is `store_uuid`.

    Its genesis chain is then the primary's (if `store_uuid` is the
    primary's UUID), so :func:`apply_records` takes the primary's log from
    seq 1.

    A new directory (parents included) is made as a temporary sibling,
    ``.NAME.follower-HOST-PID-XXXXXXXX``, and renamed to `path` once the
    store is committed and flushed, so a process killed meanwhile leaves
    no `path` (the next creation beside it removes the dead process's
    temporary directory). An existing `path` is used in place if it holds
    no store (:func:`~telstate.lmdb.environment.holds_no_store`: an empty
    directory, such as a mount point, or what a creation there killed
    before its commit left): the store appears there in one commit.

    Raises
    ------
    ValueError
        If `primary` is empty.
    StoreError
        If `path` is a file, or a directory that holds anything else (a
        store already, say), or it cannot be made.
    """
    _check_primary_name(primary)
    meta = {FOLLOWS: primary.encode()}
    path = os.path.abspath(os.fsdecode(path))
    try:
        if os.path.lexists(path):
            create_store(path, store_uuid, meta)
            return
        parent, name = os.path.split(path)
        os.makedirs(parent, exist_ok=True)
        _remove_stale(parent, "follower")
        work = os.path.join(parent, f".{name}.follower-{_HOST}-{os.getpid()}-{token_hex(4)}")
        os.mkdir(work)
        try:
            create_store(work, store_uuid, meta)
            _fsync(os.path.join(work, "data.mdb"))
            _fsync(work)
            _rename_new(work, path)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        _fsync(parent)
    except FileExistsError:
        raise StoreError(
            f"cannot create a telstate store at {path!r}: another process made it meanwhile"
        ) from None
    except OSError as error:
        raise StoreError(f"cannot create a telstate store at {path!r}: {error}") from error


def apply_records(
    backend: LmdbBackend,
    first_seq: int,
    records: Sequence[bytes],
    writers: Mapping[int, WriterFields],
) -> tuple[int, bytes]:
    """Append a primary's log records to its follower, as events `first_seq`, `first_seq` + 1, ...

    Each record (exactly as the primary's ``log`` table holds it, chain
    hash included; see :func:`read_records`) must continue the follower's
    chain; its event changes the state as it changed the primary's. The
    writers the records name are registered under the primary's ids from
    `writers` (see :func:`writers_of`) unless the follower has them. The
    whole call is one transaction: on any error nothing is written.
    Waiters (``wait_key``, monitors, other processes) are woken as by any
    write.

    Returns
    -------
    The follower's new head: (seq, chain).

    Raises
    ------
    ChainMismatchError
        If a record does not continue the chain (it names the seq).
    StoreError
        If `first_seq` is not the follower's last seq + 1, the store is
        not a follower, a record is damaged or names a writer `writers`
        lacks, or an event does not apply (the states differ).
    ReadOnlyError
        If `backend` was opened read-only.
    """
    with FollowerTxn(backend._writable_store(), None, require_follower=True) as ftxn:
        head = ftxn.head[0]
        if first_seq != head + 1:
            raise StoreError(
                f"the follower at {backend.path!r} ends at event {head}, so its next event is "
                f"{head + 1}, not {first_seq}"
            )
        for record in records:
            ftxn.apply(record, writers)
        return ftxn.head


def read_records(backend: LmdbBackend, from_seq: int, limit: int) -> list[tuple[int, bytes]]:
    """The raw records (seq, record) of events `from_seq` on, as :func:`apply_records` takes them.

    At most `limit` events, ``settings.LOG_CHUNK`` events and about
    ``settings.LOG_CHUNK_BYTES`` bytes (at least one event, if there is
    one), read in one read transaction. Empty past the end of the log.

    Raises
    ------
    ValueError
        If `limit` is less than 1.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")
    return backend._read(log_chunk, max(from_seq, 1), max(from_seq, 1) + limit - 1)


def writers_of(backend: LmdbBackend, ids: Iterable[int]) -> dict[int, WriterFields]:
    """The writers table's rows of `ids`: id -> (host, pid, name), as :func:`apply_records` takes.

    Raises
    ------
    StoreError
        If the store has no writer of one of the ids.
    """
    known = backend._read(writers_in)
    found: dict[int, WriterFields] = {}
    for writer_id in ids:
        writer = known.get(writer_id)
        if writer is None:
            raise StoreError(f"the store at {backend.path!r} has no writer {writer_id}")
        found[writer_id] = (writer.host, writer.pid, writer.name)
    return found


def promote(path: PathType, name: str | None = None) -> int:
    """Make the follower at `path` a primary; return the seq of its promotion event.

    The promotion event (:attr:`telstate.log.Op.PROMOTE`; its value says
    which primary the store followed, `name` of the new primary, default
    ``host:path``, and when) is appended in the transaction that makes the
    store writable, flushed to disk before this returns.

    Raises
    ------
    StoreError
        If there is no store at `path`, or it is a primary already.
    """
    from .backend import LmdbBackend

    with LmdbBackend(_existing_store(path), durability="fsync") as backend:
        store = backend._writable_store()
        with FollowerTxn(store, "telstate promote", require_follower=False) as ftxn:
            return ftxn.promote(name)


__all__ = [
    "FOLLOWER",
    "PRIMARY",
    "FollowerTxn",
    "WriterFields",
    "apply_records",
    "create_follower",
    "make_follower",
    "promote",
    "read_records",
    "writers_of",
]
