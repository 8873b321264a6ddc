"""One write transaction of an LMDB store: the write operations and their events.

A :class:`WriteTxn` owns one LMDB write transaction and everything that
belongs to it alone: the tables, the seq and time of the last event
appended in it, and this process's writer id if the transaction
registers it. Its methods are the write operations of
:class:`~telstate.backend.Backend`; each changes the state tables and
appends its event through :func:`telstate.lmdb.eventlog.append_event`.
Several operations may run in one transaction; it commits as one.

:meth:`LmdbBackend.write() <telstate.lmdb.LmdbBackend.write>` makes one
and commits it: the path of a write is ``TelescopeState.add`` →
``LmdbBackend.add_mutable`` → ``WriteTxn.add_mutable`` →
``add_sample`` and ``append_event``.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from threading import get_ident
from typing import Any, TypeVar

import lmdb
import numpy as np

from .. import log
from ..errors import ImmutableKeyError, InvalidTimestampError, ReadOnlyError, StoreError
from ..log import Writer
from ..utils import display_str
from .environment import Store, abort
from .eventlog import append_event, append_events, last_event
from .layout import (
    ALL_KEYS,
    IMMUTABLE,
    INDEXED,
    INLINE_LIMIT,
    KEY_ID,
    MUTABLE,
    NAME,
    U32,
    KeyRecord,
    Tables,
    checked_put,
    inline,
    key_record,
    name_key_of,
    primary_in,
)
from .samples import add_sample
from .state import delete_prefix, indexed_value

_HOST = socket.gethostname()
# The ids of the stores with a WriteTxn open (each holds its store's write lock).
_OPEN: dict[int, int] = {}


_NEW, _OPEN_STATE, _DONE = range(3)
_Txn = TypeVar("_Txn", bound="WriteTxn")

# How many forks this process is from the one that imported this module: a
# WriteTxn entered before a fork is not the child's to commit. Compared
# instead of pids, as os.getpid() is a system call on every write.
_forks = 0


def _after_fork_in_child() -> None:
    """A forked child holds none of its parent's write transactions."""
    global _forks
    _forks += 1
    _OPEN.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


class _Closed:
    """Stands for the LMDB transaction of a WriteTxn outside its with block."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        raise StoreError(
            "this WriteTxn is not open: use it inside its with block "
            "(with backend.write() as wtxn: ...)"
        )


_CLOSED: Any = _Closed()


class WriteTxn:
    """One write transaction of a store: the write operations, committed as one.

    Use it as a context manager (:meth:`LmdbBackend.write
    <telstate.lmdb.LmdbBackend.write>` makes one)::

        with backend.write() as wtxn:
            wtxn.add_mutable(b"sensor", value, timestamp)
            wtxn.set_indexed(b"config", b"gain", gain)

    Entering takes the store's write lock and begins the LMDB transaction;
    on a follower store it raises :exc:`~telstate.errors.ReadOnlyError`
    instead (a follower changes only through
    :func:`telstate.lmdb.follower.apply_records`).
    Leaving the block normally commits it if an operation changed the
    state (else aborts it); leaving it by an exception aborts it, so none
    of its operations take effect. An operation that raises
    :exc:`~telstate.errors.ImmutableKeyError` or
    :exc:`~telstate.errors.InvalidTimestampError` has changed nothing, so
    the block may catch that and go on (one bad request of a batch need
    not fail the others); after any other exception, leave the block.

    Parameters
    ----------
    store
        The store to write to (opened writable).
    writer_name
        Recorded with this process's writer registration.

    Attributes
    ----------
    txn
        The LMDB write transaction (inside the with block).
    tables
        The store's tables.
    changed
        Whether any operation changed the state.

    Raises
    ------
    ReadOnlyError
        On entering the block, if the store is a follower.
    StoreError
        On leaving the block, if LMDB failed (disk or map full, damaged
        store); nothing of the block was committed.
    """

    __slots__ = (
        "_store",
        "_writer_name",
        "txn",
        "tables",
        "changed",
        "_writer_id",
        "_new_writer_id",
        "_new_remote_ids",
        "_last_commit",
        "_appended",
        "_txnid",
        "_state",
        "_forks",
        "_primary_after",
        "begun",
        "_committed",
    )

    def __init__(self, store: Store, writer_name: str | None) -> None:
        self._store = store
        self._writer_name = writer_name
        self._state = _NEW
        # The transaction begun (set by Store.begin_write) until released, and
        # whether it was committed.
        self.begun: Any = None
        self._committed = False
        self.txn: Any = _CLOSED
        self.tables: Tables = _CLOSED
        self.changed = False
        self._new_writer_id: int | None = None
        self._new_remote_ids: dict[Writer, int] | None = None
        # (seq, time, chain) of the last event appended in this transaction (or before it).
        self._appended: tuple[int, float, bytes] | None = None
        # Whether the store is a primary once this transaction commits.
        self._primary_after = True
        # Set by __enter__: what the transaction starts from.
        self._txnid: int
        self._writer_id: int | None
        self._last_commit: tuple[int, int, float, bytes]

    def __enter__(self: _Txn) -> _Txn:
        store = self._store
        if self._state != _NEW:
            raise StoreError("a WriteTxn is entered once: make a new one with backend.write()")
        if _OPEN.get(id(store)) == get_ident():
            # LMDB's writer mutex is not recursive: a second write
            # transaction in this thread would wait for itself forever.
            raise StoreError(
                f"a write transaction on the store at {store.path!r} is already open in "
                "this thread: use its WriteTxn (backend.write() blocks do not nest)"
            )
        # begin_write sets self.begun before it returns: an exception
        # (KeyboardInterrupt) from here on finds the transaction to end, and
        # the write lock to release, even one that comes as the call returns.
        try:
            txn = store.begin_write(self)
            _OPEN[id(store)] = get_ident()
            self.txn = txn
            self._txnid = txn.id()
            self.tables = store.tables
            self._check_role()
            self._writer_id = store.writer_ids.get(self._writer_name)
            self._last_commit = store.last_commit
            self._forks = _forks
            self._state = _OPEN_STATE
            return self
        except BaseException as error:
            # (Each line may be cut short too: the releases run from a finally.)
            try:
                _OPEN.pop(id(store), None)
                self.txn = _Closed()
            finally:
                try:
                    self._release()
                finally:
                    self._release()  # again, if an exception cut the first short
            if isinstance(error, lmdb.Error):
                raise StoreError(
                    f"writing to the store at {store.path!r} failed: {error}"
                ) from error
            raise

    def _check_role(self) -> None:
        """Refuse to write to a follower: only its primary's events change it.

        Skipped when the last commit is this process's, made as a primary:
        nothing can have changed the role since.
        """
        if self._store.primary_txnid == self._txnid - 1:
            return
        primary = primary_in(self.txn, self.tables)
        if primary is not None:
            raise follower_error(self._store.path, primary)

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        # An exception may come between any two lines (KeyboardInterrupt, or
        # one a signal handler raises): from the first line, the finally
        # ends the transaction and releases the write lock whatever happens,
        # and does it twice over (each step of _release may be done again).
        # One left held would hang every writer of the store, in every
        # process, for as long as this process lives. (Not one that comes as
        # this method starts, before its first line: no Python code can
        # guard that point.)
        try:
            if self._state != _OPEN_STATE:
                return  # __enter__ failed, or a misuse already raised
            self._state = _DONE
            self.txn = _CLOSED
            store = self._store
            _OPEN.pop(id(store), None)
            if self._forks != _forks:
                self.begun = None  # forked inside the block: the transaction is the parent's
                raise StoreError(
                    f"this process was forked inside a write block on the store at "
                    f"{store.path!r}: the block belongs to the parent, and is not committed here"
                )
            if exc is not None:
                meaning = self._meaning(exc)
                if meaning is not None:
                    raise meaning from exc
                return  # aborted below; the block's own exception propagates
            if not self.changed:
                return  # nothing to commit: aborted below
            try:
                self.begun.commit()
            except lmdb.Error as error:
                meaning = self._meaning(error)
                assert meaning is not None
                raise meaning from error
            self._committed = True
            store.primary_txnid = self._txnid if self._primary_after else -1
            if self._new_writer_id is not None:
                store.writer_ids[self._writer_name] = self._new_writer_id
            if self._new_remote_ids:
                store.remote_writer_ids.update(self._new_remote_ids)
            if self._appended is not None:
                store.last_commit = (self._txnid, *self._appended)
        finally:
            try:
                self._release()
            finally:
                self._release()
        store.committed()

    def _release(self) -> None:
        """End the transaction (abort it unless committed) and release the write lock, once.

        Each step may be done again (by a second call, after an exception
        cut the first short).
        """
        txn = self.begun
        if txn is None:
            return
        if not self._committed:
            abort(txn)  # (a no-op once aborted, or committed after all)
        self._store.end_write(txn)  # (a no-op once done)
        self.begun = None

    def _meaning(self, error: BaseException) -> StoreError | None:
        """What LMDB's `error` means for callers, if it is LMDB's (the write was not committed)."""
        store = self._store
        if isinstance(error, lmdb.MapFullError):
            return StoreError(
                f"the telstate store at {store.path!r} is full: it reached its map size "
                f"({store.map_size} bytes); open it with a larger map_size"
            )
        if isinstance(error, lmdb.Error):
            return StoreError(f"writing to the store at {store.path!r} failed: {error}")
        return None

    # --- the operations -------------------------------------------------------------

    def set_immutable(self, key: bytes, value: bytes) -> bytes | None:
        """Set an immutable key unless it exists; return the existing value, or None.

        Raises
        ------
        ImmutableKeyError
            If the key exists and is not immutable.
        """
        name_key = name_key_of(key)
        record = key_record(self.txn, self.tables, name_key)
        if record is not None:
            if record.type_code != IMMUTABLE:
                raise wrong_type(key, record, "immutable")
            return record.value
        self.new_key(name_key, IMMUTABLE, key, value)
        self._append(log.SET_IMMUTABLE, name_key, key, value=value)
        return None

    def add_mutable(self, key: bytes, value: bytes, timestamp: float) -> bool:
        """Add a sample to a mutable key; False if the same sample was there already.

        Raises
        ------
        ImmutableKeyError
            If the key exists and is not mutable.
        InvalidTimestampError
            If `timestamp` is negative or NaN (the sample engine keeps
            timestamps in [0, inf]).
        """
        if not timestamp >= 0.0:
            raise InvalidTimestampError(
                f"{display_str(key)}: timestamp {timestamp!r} is negative or NaN"
            )
        txn, tables = self.txn, self.tables
        name_key = NAME + key if len(key) < INLINE_LIMIT else name_key_of(key)
        record = key_record(txn, tables, name_key)
        if record is None:
            record = self.new_key(name_key, MUTABLE, key, b"")
        elif record.type_code != MUTABLE:
            raise wrong_type(key, record, "mutable")
        key_id, flags, sealed = record.key_id, record.flags, record.sealed
        # A long value points at the event that adds it (the seq it will get).
        seq = self._last_event()[0] + 1 if len(value) >= INLINE_LIMIT else 0
        # (timestamp or 0.0) turns -0.0 into 0.0, as pack_timestamp does.
        if not add_sample(
            txn, tables, name_key, key_id, flags, sealed, timestamp or 0.0, value, seq
        ):
            return False
        self._append(log.ADD_MUTABLE, name_key, key, value=value, timestamp=timestamp)
        return True

    def set_indexed(self, key: bytes, sub_key: bytes, value: bytes) -> bytes | None:
        """Set a sub-key unless it exists; return the existing value, or None.

        Raises
        ------
        ImmutableKeyError
            If the key exists and is not indexed.
        """
        txn, tables = self.txn, self.tables
        name_key = name_key_of(key)
        record = key_record(txn, tables, name_key)
        if record is None:
            key_id = self.new_key(name_key, INDEXED, key, b"").key_id
        elif record.type_code != INDEXED:
            raise wrong_type(key, record, "indexed")
        else:
            key_id = record.key_id
            existing = indexed_value(txn, tables, key_id, sub_key)
            if existing is not None:
                return existing
        data = value
        if len(sub_key) >= INLINE_LIMIT:
            data = U32.pack(len(sub_key)) + sub_key + value
        checked_put(txn, key_id + inline(sub_key), data, tables.indexed)
        self._append(log.SET_INDEXED, name_key, key, sub_key, value)
        return None

    def delete(self, key: bytes) -> bool:
        """Delete a key; False (and no event) if it does not exist."""
        txn, tables = self.txn, self.tables
        name_key = name_key_of(key)
        record = key_record(txn, tables, name_key)
        if record is None:
            return False
        txn.delete(name_key, db=tables.keys)
        if record.type_code == MUTABLE:
            txn.delete(record.key_id, db=tables.samples)
            delete_prefix(txn, tables.blocks, record.key_id)
        elif record.type_code == INDEXED:
            delete_prefix(txn, tables.indexed, record.key_id)
        self._append(log.DELETE, name_key, key)
        return True

    def clear(self) -> bool:
        """Remove all keys; False (and no event) if there are none."""
        txn, tables = self.txn, self.tables
        if txn.stat(tables.keys)["entries"] == 0:
            return False
        for db in (tables.keys, tables.samples, tables.blocks, tables.indexed):
            txn.drop(db, delete=False)
        self._append(log.CLEAR, ALL_KEYS)
        return True

    # --- the log ----------------------------------------------------------------------

    def _append(
        self,
        op_code: int,
        name_key: bytes,
        key: bytes = b"",
        sub_key: bytes = b"",
        value: bytes = b"",
        timestamp: float = float("nan"),
    ) -> None:
        """Append the event of an operation that changed the state."""
        seq, now, chain = self._next_event()
        chain = append_event(
            self.txn,
            self.tables,
            seq,
            chain,
            name_key,
            op_code,
            self._writer_id or self._writer(),
            now,
            key,
            sub_key,
            value,
            timestamp,
        )
        self._appended = (seq, now, chain)
        self.changed = True

    def append_events(
        self,
        op_code: int,
        name_key: bytes,
        key: bytes,
        values: Sequence[bytes | memoryview],
        sub_keys: Sequence[bytes] | None = None,
        timestamps: Sequence[float] | np.ndarray | None = None,
    ) -> None:
        """Append the events of changes already made to one key, in order, with one time.

        For bulk paths (:mod:`telstate.lmdb.bulk`); see
        :func:`~telstate.lmdb.eventlog.append_events` for the arguments.
        """
        if op_code == log.ADD_MUTABLE_MANY:
            self._mark_format()
        seq, now, chain = self._next_event()
        chain = append_events(
            self.txn,
            self.tables,
            seq,
            chain,
            name_key,
            op_code,
            self._writer_id or self._writer(),
            now,
            key,
            values,
            sub_keys,
            timestamps,
        )
        self._appended = (seq + len(values) - 1, now, chain)
        self.changed = True

    def _next_event(self) -> tuple[int, float, bytes]:
        """The seq and time of the next event, and the chain hash it follows."""
        previous_seq, previous_time, previous_chain = self._last_event()
        now = time.time()
        if now < previous_time:
            now = previous_time  # event times never go back, for replay(until_time=...)
        return previous_seq + 1, now, previous_chain

    def _mark_format(self) -> None:
        """Give the store log format 3, if it has not: it is to hold an add_mutable_many event.

        In the transaction that appends the event, so that no committed
        store holds one under format 2 (which older telstate would misread).
        """
        newest = b"%d" % log.FORMAT_VERSION
        if self.txn.get(b"format", db=self.tables.meta) != newest:
            checked_put(self.txn, b"format", newest, self.tables.meta)

    def next_seq(self) -> int:
        """The seq the next event appended in this transaction will get."""
        return self._last_event()[0] + 1

    def _last_event(self) -> tuple[int, float, bytes]:
        """(seq, time, chain) of the last event before the one about to be appended."""
        if self._appended is None:
            committed_txnid, seq, previous_time, chain = self._last_commit
            if committed_txnid != self._txnid - 1 or not chain:
                known = (seq, chain) if chain else None  # (this process's last event)
                seq, previous_time, chain = last_event(
                    self.txn, self.tables, self._store.uuid, known
                )
            self._appended = (seq, previous_time, chain)
        return self._appended

    @property
    def last_seq(self) -> int:
        """Seq of the log's last event as this transaction sees it (its own events included)."""
        return self._last_event()[0]

    @property
    def last_event(self) -> tuple[int, float, bytes]:
        """(seq, time, chain) of the log's last event as this transaction sees it.

        Right after an operation that appended an event, those of its event.
        """
        return self._last_event()

    def write_as(self, writer: Writer | None) -> None:
        """Record the events of the operations that follow as written by `writer`.

        For a process that writes on behalf of others: the replicator's
        write intake records the host, pid and name of each remote writer.
        None goes back to this process's own identity.
        """
        if writer is None:
            self._writer_id = self._new_writer_id or self._store.writer_ids.get(self._writer_name)
            return
        if self._new_remote_ids is None:
            self._new_remote_ids = {}
        writer_id = self._store.remote_writer_ids.get(writer) or self._new_remote_ids.get(writer)
        if writer_id is None:
            writer_id = self._new_remote_ids[writer] = self._register(writer)
        self._writer_id = writer_id

    def _writer(self) -> int:
        """This process's writer id, registered in the writers table if new."""
        if self._writer_id is None:
            writer = Writer(_HOST, os.getpid(), self._writer_name)
            self._writer_id = self._new_writer_id = self._register(writer)
        return self._writer_id

    def _register(self, writer: Writer) -> int:
        """Add `writer` to the writers table; return its new id."""
        cursor = self.txn.cursor(self.tables.writers)
        writer_id = 1
        if cursor.last():
            last = cursor.key()
            if len(last) != 4 or last == b"\xff\xff\xff\xff":
                raise StoreError(
                    f"the writers table is damaged: its last key {last.hex()} is not a writer "
                    "id that another can follow"
                )
            writer_id = log.unpack_writer_id(last) + 1
        checked_put(
            self.txn, log.pack_writer_id(writer_id), log.encode_writer(writer), self.tables.writers
        )
        return writer_id

    def new_key(self, name_key: bytes, key_type: int, key: bytes, value: bytes) -> KeyRecord:
        """Create the keys-table entry of a new key; return its record (for bulk paths too)."""
        txn, tables = self.txn, self.tables
        counter = key_counter(txn, tables)
        # A counter at or below an id whose data are stored would give a new
        # key another key's samples: refuse rather than mix them.
        if highest_key_id(txn, tables) >= counter:
            raise StoreError(
                f"the store's key id counter ({counter}) is behind the ids its data use: "
                "the store is damaged"
            )
        checked_put(txn, b"next_key_id", KEY_ID.pack(counter + 1), tables.meta)
        key_id = KEY_ID.pack(counter)
        record = KeyRecord.new(key_type, key_id, key, value)
        checked_put(txn, name_key, record.encode(), tables.keys)
        return record


def key_counter(txn: Any, tables: Tables) -> int:
    """The next key id to give out (meta ``next_key_id``), checked to be a counter."""
    counter_data = txn.get(b"next_key_id", db=tables.meta)
    if counter_data is None or len(counter_data) != KEY_ID.size:
        raise StoreError("the store's key id counter is missing or damaged")
    return int(KEY_ID.unpack(counter_data)[0])


def highest_key_id(txn: Any, tables: Tables) -> int:
    """The highest key id the samples, blocks and indexed tables use (0 if none)."""
    highest = 0
    for table in (tables.samples, tables.blocks, tables.indexed):
        cursor = txn.cursor(table)
        if cursor.last():
            prefix = cursor.key()[: KEY_ID.size]
            if len(prefix) == KEY_ID.size:
                highest = max(highest, int(KEY_ID.unpack(prefix)[0]))
    return highest


def follower_error(path: str, primary: str) -> ReadOnlyError:
    """The error for a write to the follower store at `path`, which follows `primary`."""
    return ReadOnlyError(
        f"the telstate store at {path!r} is a follower of {primary}: it is read-only "
        "(only its primary's events change it); write to the primary, or make this "
        f"store the primary with `telstate promote {path}`"
    )


def wrong_type(key: bytes, record: KeyRecord, wanted: str) -> ImmutableKeyError:
    """The error for an operation on `key` that needs it of type `wanted`."""
    return ImmutableKeyError(f"{display_str(key)} is {record.key_type.name.lower()}, not {wanted}")
