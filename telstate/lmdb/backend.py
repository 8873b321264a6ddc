""":class:`LmdbBackend`, the telstate backend on an LMDB store, and its :class:`Snapshot`.

Every write that changes the state is one LMDB write transaction that
appends an event to the log and updates the state tables; reads come from
the state tables only. See :mod:`telstate.lmdb` for the overview.
"""

from __future__ import annotations

import collections
import itertools
import os
import socket
import stat
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

import lmdb

from .. import log
from ..backend import Backend, GetResult, KeyUpdateBase, Record
from ..errors import ReadOnlyError, StoreError
from ..log import Event, Op, Writer
from ..utils import KeyType, PathType, compile_pattern
from . import bulk, settings
from .audit import ReplayedState, seq_until_in, verify_in, verify_rdb_in
from .environment import DURABILITIES, Store, attach_store, detach_store
from .eventlog import (
    chain_in,
    chunk_full,
    head_in,
    history_chunk,
    key_updates,
    last_seq_in,
    log_chunk,
    writers_in,
)
from .follower import FOLLOWER, PRIMARY
from .layout import (
    ALL_KEYS,
    IMMUTABLE,
    IMPORT_PREFIX,
    INDEXED,
    INLINE_PREFIX,
    LONG_NAME_KEY_LEN,
    MUTABLE,
    NAME,
    TIMESTAMP,
    ImportRecord,
    RequestRecord,
    Tables,
    key_record,
    key_type_of,
    name_key_of,
    primary_in,
    record_name,
    request_record_in,
    unfinished_imports_in,
)
from .samples import latest_member, sample_range
from .state import indexed_items, indexed_value, key_state_record, state_records
from .writes import WriteTxn, follower_error, wrong_type

if TYPE_CHECKING:
    from ..export import KeySelection

_T = TypeVar("_T")
_HOST = socket.gethostname()


class LmdbBackend(Backend):
    """Telescope state in an LMDB store on local disk, with an event log of every write.

    Parameters
    ----------
    path
        Directory of the store; created (with its parents) on first open.
    durability
        ``'fsync'``, ``'batch'`` or ``'none'``: what a power failure may
        lose (see :mod:`telstate.lmdb.environment`). A process crash loses nothing in
        any mode.
    flush_interval
        Seconds between background flushes in ``'batch'`` mode.
    readonly
        Open an existing store without writing to it; writes raise
        :exc:`ReadOnlyError`.
    writer_name
        Recorded with every event written through this backend.
    map_size
        Size in bytes of the memory map, the most the store can hold
        (default 1 TiB; it costs address space, not disk or memory; see
        :mod:`telstate.lmdb.environment`).

    Raises
    ------
    ValueError
        If `durability` or `flush_interval` is invalid.
    StoreError
        If the store is missing (read-only), damaged, of another format,
        or the directory is not empty and not a store.

    Attributes
    ----------
    durability, readonly, writer_name
        As given.

    Notes
    -----
    Besides the :class:`~telstate.backend.Backend` methods, the log API:
    :attr:`uuid`, :attr:`role`, :attr:`primary`, :attr:`last_seq`, :attr:`head`, :meth:`chain_at`,
    :meth:`events`, :meth:`history`, :meth:`snapshot`,
    :meth:`wait_for_commit`, :meth:`verify`, :meth:`verify_rdb`,
    :meth:`flush`, and :func:`telstate.lmdb.replay`.
    """

    def __init__(
        self,
        path: PathType,
        *,
        durability: str = "batch",
        flush_interval: float = 1.0,
        readonly: bool = False,
        writer_name: str | None = None,
        map_size: int = settings.MAP_SIZE,
    ) -> None:
        if durability not in DURABILITIES:
            raise ValueError(f"durability must be one of {DURABILITIES}, not {durability!r}")
        if not flush_interval > 0:
            raise ValueError(f"flush_interval must be positive, not {flush_interval!r}")
        self.durability = durability
        self.readonly = readonly
        self.writer_name = writer_name
        self._batch_interval = flush_interval if durability == "batch" and not readonly else None
        self._store: Store | None = attach_store(
            path,
            writable=not readonly,
            sync=durability == "fsync" and not readonly,
            batch_interval=self._batch_interval,
            map_size=max(map_size, 1 << 16),
        )

    # --- plumbing -------------------------------------------------------------------

    @property
    def path(self) -> str:
        """The store's directory (absolute, symlinks resolved)."""
        return self._get_store().path

    def _get_store(self) -> Store:
        store = self._store
        if store is None:
            raise StoreError("this LmdbBackend is closed")
        return store

    def _read(self, body: Callable[..., _T], *args: Any, buffers: bool = False) -> _T:
        """Run ``body(txn, tables, *args)`` in a fresh read transaction.

        Takes no lock: reads of several threads run in parallel.
        """
        store = self._get_store()
        try:
            txn = store.begin_read(buffers)
        except lmdb.Error as error:
            raise StoreError(f"reading the store at {store.path!r} failed: {error}") from error
        try:
            return body(txn, store.tables, *args)
        except lmdb.Error as error:
            raise StoreError(f"reading the store at {store.path!r} failed: {error}") from error
        finally:
            store.txns.end_read(txn)

    def write(self) -> WriteTxn:
        """A write transaction for several operations, committed as one.

        Example::

            with backend.write() as wtxn:
                wtxn.add_mutable(b"sensor", value, timestamp)
                wtxn.set_indexed(b"config", b"gain", gain)

        The operations of :class:`~telstate.lmdb.writes.WriteTxn` return
        what the backend's methods of the same name return (plus whether
        ``add_mutable``/``delete``/``clear`` changed anything). Other
        processes and threads see all of them or none. An exception in
        the block aborts the transaction.

        Raises
        ------
        ReadOnlyError
            If the store was opened read-only (here), or is a follower (on
            entering the block).
        StoreError
            If the store is closed, the disk is full or the store damaged.
        """
        return WriteTxn(self._writable_store(), self.writer_name)

    def _writable_store(self) -> Store:
        """The store, if this backend may write to it.

        Raises
        ------
        ReadOnlyError
            If the store was opened read-only.
        StoreError
            If the backend is closed.
        """
        store = self._get_store()
        if self.readonly:
            raise ReadOnlyError(f"the telstate store at {self.path!r} was opened read-only")
        return store

    # --- Backend: reads -------------------------------------------------------------

    def keys(self, filter: bytes) -> list[bytes]:
        """Return all keys matching `filter`, a Redis glob pattern."""
        match = None if filter == b"*" else compile_pattern(filter).fullmatch
        literal = bytes(itertools.takewhile(lambda c: c not in b"*?[\\", filter))
        return self._read(self._keys_in, NAME + literal[:INLINE_PREFIX], match, buffers=True)

    @staticmethod
    def _keys_in(
        txn: Any, tables: Tables, prefix: bytes, match: Callable[[bytes], Any] | None
    ) -> list[bytes]:
        cursor = txn.cursor(db=tables.keys)
        found = []
        if cursor.set_range(prefix):
            for name_key in cursor.iternext(keys=True, values=False):
                if name_key[: len(prefix)] != prefix:
                    break
                if len(name_key) == LONG_NAME_KEY_LEN:
                    key = record_name(name_key, cursor.value())
                else:
                    key = bytes(name_key[1:])
                if match is None or match(key):
                    found.append(key)
        return found

    def key_type(self, key: bytes) -> KeyType | None:
        """Get the type of `key`, or None if it does not exist."""
        return self._read(self._key_type_in, key, buffers=True)

    @staticmethod
    def _key_type_in(txn: Any, tables: Tables, key: bytes) -> KeyType | None:
        data = txn.get(name_key_of(key), db=tables.keys)
        return None if data is None else key_type_of(data)

    def get(self, key: bytes) -> GetResult:
        """Get the value and timestamp of a key.

        Immutable: (value, None). Mutable: (latest value, its timestamp).
        Indexed: (dict of every sub-key to value, None). Absent: (None, None).
        """
        store = self._get_store()
        # Results are cached per snapshot: valid while no commit happened since.
        cache = store.read_cache
        if store.last_txnid() == cache.txnid:
            cached = cache.gets.get(key)
            if cached is not None:
                value = cached[0]
                return (dict(value), None) if type(value) is dict else cached
        return self._read(self._get_in, key)

    def _get_in(self, txn: Any, tables: Tables, key: bytes) -> GetResult:
        record = key_record(txn, tables, name_key_of(key))
        result: GetResult
        if record is None:
            result = (None, None)
        elif record.type_code == MUTABLE:
            member = latest_member(txn, tables, record.key_id, record.flags)
            result = (member[8:], TIMESTAMP.unpack_from(member)[0])
        elif record.type_code == IMMUTABLE:
            result = (record.value, None)
        else:
            result = (indexed_items(txn, tables, record.key_id), None)
        cache = self._get_store().cache_for(txn.id())
        if cache is not None:
            size = _result_size(result[0])
            if size <= settings.CACHE_MAX_VALUE:
                cache.put_get(key, result, size)
        if type(result[0]) is dict:
            return dict(result[0]), None
        return result

    def get_indexed(self, key: bytes, sub_key: bytes) -> bytes | None:
        """Get the value of one sub-key, or None if the key exists without it.

        Raises
        ------
        KeyError
            If the key does not exist.
        ImmutableKeyError
            If the key exists and is not indexed.
        """
        store = self._get_store()
        cache = store.read_cache
        if store.last_txnid() == cache.txnid:
            cached = cache.indexed.get((key, sub_key), self)
            if cached is not self:
                return cached  # type: ignore[return-value]
        return self._read(self._get_indexed_in, key, sub_key)

    def _get_indexed_in(self, txn: Any, tables: Tables, key: bytes, sub_key: bytes) -> bytes | None:
        record = key_record(txn, tables, name_key_of(key))
        if record is None:
            raise KeyError(key)
        if record.type_code != INDEXED:
            raise wrong_type(key, record, "indexed")
        value = indexed_value(txn, tables, record.key_id, sub_key)
        cache = self._get_store().cache_for(txn.id())
        if cache is not None and (value is None or len(value) <= settings.CACHE_MAX_VALUE):
            cache.put_indexed(key, sub_key, value)
        return value

    def get_range(
        self,
        key: bytes,
        start_time: float,
        end_time: float,
        include_previous: bool,
        include_end: bool,
    ) -> list[tuple[bytes, float]] | None:
        """Return the (value, timestamp) samples of a mutable key in a time range.

        Samples are ordered by timestamp, then by value bytes. The range is
        ``[start_time, end_time)``, or ``[start_time, end_time]`` with
        `include_end`; `include_previous` adds the last sample before
        `start_time` (even if the range is empty, as Redis does). Returns
        None if the key does not exist.

        Raises
        ------
        ImmutableKeyError
            If the key exists and is not mutable.
        """
        samples = self._read(
            self._range_in, key, start_time, end_time, include_previous, include_end
        )
        return None if samples is None else list(zip(*samples))

    @staticmethod
    def _range_in(
        txn: Any,
        tables: Tables,
        key: bytes,
        start: float,
        end: float,
        include_previous: bool,
        include_end: bool,
    ) -> tuple[list[bytes], list[float]] | None:
        record = key_record(txn, tables, name_key_of(key))
        if record is None:
            return None
        if record.type_code != MUTABLE:
            raise wrong_type(key, record, "mutable")
        return sample_range(
            txn,
            tables,
            record.key_id,
            record.flags,
            record.sealed,
            start,
            end,
            include_previous,
            include_end,
        )

    # --- Backend: writes ------------------------------------------------------------

    def set_immutable(self, key: bytes, value: bytes) -> bytes | None:
        """Set an immutable key unless it exists.

        Returns
        -------
        The existing value if the key is already set (it is left unchanged,
        and no event is logged), otherwise None.

        Raises
        ------
        ImmutableKeyError
            If the key exists and is not immutable.
        ReadOnlyError
            If the store was opened read-only.
        StoreError
            If the store is closed or the disk is full.
        """
        with self.write() as wtxn:
            return wtxn.set_immutable(key, value)

    def add_mutable(self, key: bytes, value: bytes, timestamp: float) -> None:
        """Add a (value, timestamp) sample to a mutable key.

        An identical (timestamp, value) sample already present is not
        stored twice (and no event is logged).

        Raises
        ------
        ImmutableKeyError
            If the key exists and is not mutable.
        InvalidTimestampError
            If `timestamp` is negative or NaN.
        ReadOnlyError
            If the store was opened read-only.
        StoreError
            If the store is closed or the disk is full.
        """
        with self.write() as wtxn:
            wtxn.add_mutable(key, value, timestamp)

    def set_indexed(self, key: bytes, sub_key: bytes, value: bytes) -> bytes | None:
        """Set a sub-key of an indexed key unless the sub-key exists.

        Returns
        -------
        The existing value if the sub-key is already set (it is left
        unchanged, and no event is logged), otherwise None.

        Raises
        ------
        ImmutableKeyError
            If the key exists and is not indexed.
        ReadOnlyError
            If the store was opened read-only.
        StoreError
            If the store is closed or the disk is full.
        """
        with self.write() as wtxn:
            return wtxn.set_indexed(key, sub_key, value)

    def delete(self, key: bytes) -> None:
        """Delete a key (no-op, and no event, if it does not exist).

        Raises
        ------
        ReadOnlyError
            If the store was opened read-only.
        StoreError
            If the store is closed or the disk is full.
        """
        with self.write() as wtxn:
            wtxn.delete(key)

    def clear(self) -> None:
        """Remove all keys (no event if there are none).

        Raises
        ------
        ReadOnlyError
            If the store was opened read-only.
        StoreError
            If the store is closed or the disk is full.
        """
        with self.write() as wtxn:
            wtxn.clear()

    def load_records(
        self,
        records: Iterable[Record],
        source: PathType | None = None,
        progress: bulk.Progress | None = None,
    ) -> int:
        """Import whole keys (as read from an RDB file) in bulk; return how many.

        Every element is in an event: immutable keys in set_immutable events,
        each sub-key in a set_indexed event, and a mutable key's samples in
        add_mutable_many events of up to ``settings.BULK_EVENT_SAMPLES``
        samples (long values: an add_mutable event each; see
        :mod:`telstate.lmdb.bulk`). What happens to keys the store has is
        :mod:`telstate.import_rules` (elements already present are skipped,
        contradictions raise). Records are committed in chunks of at most
        ``settings.LOAD_CHUNK`` values and about ``settings.LOAD_CHUNK_BYTES``
        bytes, each checked whole before it is written (see
        :mod:`telstate.lmdb.bulk`).

        Parameters
        ----------
        records
            ``(key, key_type, value)`` records.
        source
            The file they come from, named in errors.
        progress
            Called after each committed chunk with ``"importing"`` and its
            number of values (:data:`telstate.lmdb.bulk.Progress`).

        Raises
        ------
        RdbParseError, InvalidTimestampError
            If a record is malformed (see :mod:`telstate.import_rules`).
        ImmutableKeyError
            If a record contradicts a key of the store.
        ReadOnlyError
            If the store was opened read-only.

        Chunks committed before an error (or before the process died) stay
        committed, and nothing in the store says so; :meth:`load_from_file`
        checks a file whole first and records an import in progress.
        """
        return bulk.load(self, records, source, progress)

    def load_from_file(
        self, file: PathType | BinaryIO, progress: bulk.Progress | None = None
    ) -> int:
        """Import the keys of an RDB file in bulk (see :meth:`load_records`).

        A regular file (by path or seekable file object) is read twice,
        through one descriptor: first every record is checked
        (its shape, against the store's keys and against the file's other
        copies of its key), then it is imported, so a bad file leaves the
        store unchanged. The import itself is not one transaction: if the
        process dies, or another writer creates a contradicting key between
        the two passes, the chunks committed before stay. An import of more
        than one chunk is therefore recorded in the store while it runs
        (:meth:`unfinished_imports`, reported by :meth:`verify` and
        ``telstate info``); importing the same file again completes it and
        clears the record. A pipe (``/dev/stdin``, a FIFO, by path or file
        object) is read once, and checked chunk by chunk.

        Raises
        ------
        RdbParseError, InvalidTimestampError, ImmutableKeyError, ReadOnlyError
            As :meth:`load_records`.
        """
        from .. import import_rules

        self._importable()  # before anything is read (a pipe's bytes would be lost)
        if isinstance(file, (str, bytes, os.PathLike)):
            # Opened once, for both passes: a pipe (/dev/stdin, a FIFO) read
            # once, and the file checked is the file imported.
            with open(file, "rb") as handle:
                return LmdbBackend.load_from_file(self, handle, progress)
        if import_rules.rereadable(file):
            start = file.tell()
            check_file(file, progress, self)
            file.seek(start)
        return self._load_checked(file, progress)

    def _load_checked(self, file: BinaryIO, progress: bulk.Progress | None) -> int:
        """The write pass of :meth:`load_from_file` (a rereadable `file` checked already)."""
        from .. import import_rules, rdb_reader

        self._importable()
        source = import_rules.file_source(file)
        records = rdb_reader.read_records(file, packed_members=True)
        return bulk.load(self, records, source, progress, _import_record(file, source))

    def _importable(self) -> None:
        """Raise ReadOnlyError unless the store takes imports (opened writable, not a follower)."""
        self._writable_store()
        primary = self.primary
        if primary is not None:
            raise follower_error(self.path, primary)

    def unfinished_imports(self) -> list[ImportRecord]:
        """The imports (:meth:`load_from_file`) begun in the store and not finished.

        Each names the file, with its size and modification time when the
        import began; the store holds part of it. Importing the file again
        completes it and removes it from this list.
        """
        return self._read(unfinished_imports_in)

    def forget_import(self, file: PathType) -> list[ImportRecord]:
        """Stop reporting the unfinished imports of `file`; return those forgotten.

        For a file that cannot be imported again to complete it (changed or
        deleted since the import was cut short): the keys it brought stay,
        as events in the log; only the record that the store holds part of
        a file goes (of every size and modification time the file had).
        `file` is matched as :meth:`load_from_file` records it: a path made
        absolute, or the name of a stream (``<stream>``) as listed.

        Raises
        ------
        ReadOnlyError
            If the store was opened read-only, or is a follower.
        """
        name = os.fsdecode(file)
        names = {name, os.path.abspath(name)}
        found = []
        with self.write() as wtxn:
            cursor = wtxn.txn.cursor(wtxn.tables.meta)
            going = cursor.set_range(IMPORT_PREFIX)
            while going and bytes(cursor.key()).startswith(IMPORT_PREFIX):
                record = ImportRecord.decode(cursor.value())
                if record.file in names:
                    found.append(record)
                    wtxn.changed = True  # (nothing else written: committed if it forgot one)
                    going = cursor.delete()  # the entry found (then at the next one)
                else:
                    going = cursor.next()
        return found

    def check_import(self, record: Record) -> None:
        """Raise :exc:`ImmutableKeyError` if importing a checked `record` would change a key."""
        bulk.check(self, [record])

    # --- Backend: waiting -----------------------------------------------------------

    def monitor_keys(
        self, keys: Iterable[bytes]
    ) -> Generator[KeyUpdateBase | None, float | None, None]:
        """Report changes to `keys`, made by this or any other process.

        The first yield is a bare :class:`KeyUpdateBase` (check again: the
        log position is fixed only then). After that each send of a timeout
        returns the next update to one of the keys, in log order, or None if
        there was none in time: a :class:`MutableKeyUpdate`,
        :class:`ImmutableKeyUpdate` or :class:`IndexedKeyUpdate` carrying
        the written value, or a bare :class:`KeyUpdateBase` for a delete or
        clear, or when more than 10000 events arrived at once.
        """
        keys = list(keys)
        seq = self.last_seq
        pending: collections.deque[KeyUpdateBase] = collections.deque()
        timeout = yield KeyUpdateBase()
        while True:
            deadline = time.monotonic() + (timeout or 0.0)
            while not pending:
                remaining = deadline - time.monotonic()
                last = self.wait_for_commit(seq, max(remaining, 0.0))
                if last > seq:
                    pending.extend(update for _, update in self.updates(seq + 1, last, keys))
                    seq = last
                elif remaining <= 0.0:
                    break
            timeout = yield pending.popleft() if pending else None

    def updates(
        self, start_seq: int, end_seq: int, keys: Iterable[bytes]
    ) -> list[tuple[bytes | None, KeyUpdateBase]]:
        """The key updates of the events ``start_seq..end_seq`` on `keys`, for wake-ups.

        Each comes with its key (None for a clear). More than
        ``settings.MONITOR_MAX_SCAN`` events, or events holding more than
        ``settings.MONITOR_MAX_BYTES``, give one bare
        :class:`KeyUpdateBase` (with key None) instead: check every key
        again. The sync and aio monitors both read updates through this.
        """
        if end_seq - start_seq >= settings.MONITOR_MAX_SCAN:
            return [(None, KeyUpdateBase())]
        updates: list[tuple[bytes | None, KeyUpdateBase]] = []
        size = 0
        for event in self.events(start_seq, end_seq, keys):
            size += 100 + sum(len(part or b"") for part in (event.key, event.sub_key, event.value))
            if event.values is not None:
                size += sum(map(len, event.values)) + 100 * len(event.values)
            if size > settings.MONITOR_MAX_BYTES:
                return [(None, KeyUpdateBase())]
            updates.extend((event.key, update) for update in key_updates(event))
        return updates

    def wait_for_commit(self, after_seq: int, timeout: float | None = None) -> int:
        """Wait until the log goes past `after_seq`, written by any process.

        Parameters
        ----------
        after_seq
            Return as soon as :attr:`last_seq` exceeds this.
        timeout
            Seconds to wait at most; None waits forever.

        Returns
        -------
        :attr:`last_seq` at return: greater than `after_seq` unless the
        timeout expired.
        """
        store = self._get_store()
        deadline = None if timeout is None else time.monotonic() + timeout
        store.add_waiter()
        try:
            txnid = None
            seq = after_seq
            while True:
                store.heartbeat()
                generation = store.commit_generation
                current_txnid = store.last_txnid()
                if current_txnid != txnid or current_txnid == -2:
                    txnid = current_txnid
                    seq = self.last_seq
                    if seq > after_seq:
                        return seq
                wait = settings.POLL_INTERVAL
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0.0:
                        return seq
                    wait = min(wait, remaining)
                store.wait_commit(generation, wait)
        finally:
            store.remove_waiter()

    # --- the log --------------------------------------------------------------------

    @property
    def uuid(self) -> uuid.UUID:
        """The store's identity, made when it was created (copies keep it)."""
        return self._get_store().uuid

    @property
    def role(self) -> str:
        """``"primary"``, or ``"follower"`` for a copy of another store's log that only
        its events change (see :mod:`telstate.lmdb.follower`)."""
        return PRIMARY if self.primary is None else FOLLOWER

    @property
    def primary(self) -> str | None:
        """The name of the primary this store follows; None if it is a primary."""
        return self._read(primary_in, buffers=True)

    @property
    def last_seq(self) -> int:
        """Sequence number of the last event (0 for an empty log)."""
        return self._read(last_seq_in, buffers=True)

    @property
    def head(self) -> tuple[int, bytes]:
        """(seq, chain) of the last event, read together: (0, genesis) for an empty log.

        The chain hash names the whole history up to seq (see :mod:`telstate.log`).
        """
        return self._read(head_in, log.genesis(self.uuid), buffers=True)

    def chain_at(self, seq: int) -> bytes:
        """The chain hash of the log up to event `seq`; for seq 0, the store's genesis hash.

        Raises
        ------
        ValueError
            If the log has no event `seq`.
        """
        if seq == 0:
            return log.genesis(self.uuid)
        chain = self._read(chain_in, seq) if seq > 0 else None
        if chain is None:
            raise ValueError(f"the store at {self.path!r} has no event {seq}")
        return chain

    def seq_until(self, until_time: float) -> int:
        """The last event that a replay until `until_time` applies (0 if none).

        Replaying up to this seq gives the state that ``replay(path,
        until_time=until_time)`` gives: the events before the first one
        appended after `until_time`. The log is read up to that event.
        """
        return self._read(seq_until_in, until_time, buffers=True)

    def events(
        self,
        start_seq: int = 1,
        end_seq: int | None = None,
        keys: Iterable[bytes] | None = None,
    ) -> Iterator[Event]:
        """Iterate over the events with ``start_seq <= seq <= end_seq``, lazily.

        Events are read in batches, each in its own short read transaction
        (the log is append-only, so batches are consistent).

        Parameters
        ----------
        start_seq, end_seq
            Inclusive range of sequence numbers; `end_seq` None means up to
            the last event (as of when the iteration reaches it).
        keys
            Only events on these keys (found through the history index,
            without scanning the log), plus every clear.

        Raises
        ------
        StoreError
            If a record refers to an unknown writer or operation.
        """
        if keys is None:
            return self._events_in_range(start_seq, end_seq)
        return self._events_of_keys(start_seq, end_seq, [name_key_of(key) for key in keys])

    def _events_in_range(self, start_seq: int, end_seq: int | None) -> Iterator[Event]:
        seq = max(start_seq, 1)
        while end_seq is None or seq <= end_seq:
            chunk = self._read(log_chunk, seq, end_seq)
            if not chunk:
                return
            yield from self._make_events(chunk)
            if end_seq is not None and not chunk_full(chunk):
                # The log ended within the range when the chunk was read;
                # events committed since then are the next call's.
                return
            seq = chunk[-1][0] + 1

    def _events_of_keys(
        self, start_seq: int, end_seq: int | None, name_keys: list[bytes]
    ) -> Iterator[Event]:
        seq = max(start_seq, 1)
        while end_seq is None or seq <= end_seq:
            chunk = self._read(history_chunk, name_keys + [ALL_KEYS], seq, end_seq)
            if not chunk:
                return
            yield from self._make_events(chunk)
            seq = chunk[-1][0] + 1

    def _make_events(self, chunk: list[tuple[int, bytes]]) -> Iterator[Event]:
        store = self._get_store()
        writers = store.writers
        make_event = log.make_event
        decode = log.decode_record
        for seq, record in chunk:
            try:
                raw = decode(record)
                writer = writers.get(raw[1])
                if writer is None:
                    writer = self._writer(raw[1])
                event = make_event(seq, raw, writer)
            except ValueError as error:
                raise StoreError(f"{self.path!r}: event {seq}: {error}") from None
            yield event

    def _writer(self, writer_id: int) -> Writer:
        store = self._get_store()
        store.writers.update(self._read(writers_in))
        writer = store.writers.get(writer_id)
        if writer is None:
            raise StoreError(f"the log refers to unknown writer {writer_id}")
        return writer

    def history(self, key: bytes) -> Iterator[Event]:
        """Every event that touched `key`: its writes, deletes, and the clears that removed it.

        Read through the history index, without scanning the log.
        """
        exists = False
        for event in self.events(keys=[key]):
            if event.op == Op.CLEAR:
                if exists:
                    exists = False
                    yield event
                continue
            exists = event.op != Op.DELETE
            yield event

    def record(self, key: bytes) -> Record | None:
        """Return the whole of `key` as an RDB record, read in one transaction, or None."""
        return self._read(key_state_record, key)

    def records(self) -> Iterator[Record]:
        """Every key as an RDB record, in key order, from one snapshot (see :meth:`snapshot`).

        Big mutable keys come as members read while they are iterated (see
        :meth:`Snapshot.records`), which works only until the iteration of
        the records ends and the snapshot closes: write each record as it
        comes rather than collecting them.

        Raises
        ------
        StoreError
            If the store cannot be read (for instance, it is damaged).
        """
        with self.snapshot() as snap:
            yield from snap.records()

    def request_records(self, request_ids: Iterable[bytes]) -> list[RequestRecord | None]:
        """The recorded outcome of each remote write request, read in one transaction.

        None for a request that has no record (it was never applied), and
        :meth:`RequestRecord.damaged` for a damaged one. The write intake
        (:mod:`replicator.intake`) records them as it applies requests, and
        answers from them a request delivered again.
        """

        def read(txn: Any, tables: Tables) -> list[RequestRecord | None]:
            found: list[RequestRecord | None] = []
            for request_id in request_ids:
                try:
                    found.append(request_record_in(txn, tables, request_id))
                except ValueError:
                    found.append(RequestRecord.damaged(0, f"request {request_id!r}"))
            return found

        return self._read(read)

    def snapshot(self) -> Snapshot:
        """A consistent read-only view of the whole store, for ``with`` blocks.

        Example::

            with backend.snapshot() as snap:
                write_rdb(snap.records(), seq=snap.seq, store=snap.uuid)
        """
        return Snapshot(self)

    def verify(self) -> list[str]:
        """Check the chain of the whole log, and that replaying it gives the stored state.

        Everything is read in one transaction, in memory bounded by the
        number of keys and the largest key (the log is streamed, each key
        replayed alone through the history index). Also checks that
        sequence numbers are dense, every record decodes, every event's
        writer is known and the history index lists exactly the log's
        events, each under its own key. Each problem names the event (seq)
        or key it concerns.

        The chain has no secret: a log rewritten with every chain after
        the change recomputed (and the state edited to match) passes. A
        position recorded before, such as an export's (see
        :meth:`verify_rdb`), tells the histories apart.

        Returns
        -------
        A description of each difference found, and of each unfinished
        import (:meth:`unfinished_imports`); empty if the store is sound.
        """
        return self._read(_verify_with_imports, self.uuid)

    # --- durability and lifetime ------------------------------------------------------

    def verify_rdb(
        self,
        records: Iterable[Record],
        seq: int,
        complete: bool = True,
        selection: KeySelection | None = None,
    ) -> tuple[list[str], int]:
        """Compare `records` (an RDB file's) with the state as of event `seq`.

        Each key is replayed alone from the log up to `seq`, so `seq` may be
        older than the current state. With a `selection` (the file holds
        some keys, as ``telstate export --keys/--view`` writes), `records`
        must be exactly the keys of that state that it selects. With
        `complete` false (the file holds keys of an unknown selection),
        keys missing from `records` are not differences.

        Returns
        -------
        A description of each difference (empty if the records are exactly
        the state at `seq`), and the number of records compared.
        """
        selected = None if selection is None else selection.matcher()
        return self._read(verify_rdb_in, records, seq, complete, selected)

    def flush(self) -> None:
        """Flush every commit so far (by any process) to disk.

        Raises
        ------
        StoreError
            If the backend is closed.
        """
        self._get_store().flush()

    def close(self) -> None:
        """Release this backend's share of the store; the last one flushes and closes it."""
        store, self._store = self._store, None
        if store is not None:
            detach_store(store, self._batch_interval)

    def __enter__(self) -> LmdbBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._store is None else self._store.path
        return f"LmdbBackend({state!r}, durability={self.durability!r})"


class Snapshot:
    """A consistent read-only view of a whole store at one sequence number.

    Made by :meth:`LmdbBackend.snapshot`; use it as a context manager. It
    holds one LMDB read transaction, so keep it short: while it is open,
    pages it sees cannot be reused and the store grows, and closing the
    store (or following a larger map of another process) waits for it.

    Attributes
    ----------
    seq
        The last event included in the view.
    uuid
        The store's identity.
    """

    def __init__(self, backend: LmdbBackend) -> None:
        self._backend = backend
        self._txn: Any = None
        self._thread = 0
        self._invalid: str | None = None
        self.seq = 0
        self.uuid = backend.uuid
        self._chain = log.genesis(self.uuid)
        # Why the last event's chain hash cannot be read (its record is damaged), or None.
        self._head_damage: StoreError | None = None

    def __enter__(self) -> Snapshot:
        store = self._backend._get_store()
        try:
            self._txn = store.begin_read()
        except lmdb.Error as error:
            raise StoreError(f"reading the store at {store.path!r} failed: {error}") from error
        self._thread = threading.get_ident()
        self._store = store
        store.snapshots.add(self)
        self._tables = store.tables
        try:
            self.seq, self._chain = head_in(self._txn, self._tables, log.genesis(self.uuid))
        except StoreError as error:
            # The last event's record is damaged: the view still serves the
            # state before it (state_at, a salvage); its chain raises.
            self.seq = last_seq_in(self._txn, self._tables)  # (a damaged key raises)
            self._head_damage = error
        return self

    @property
    def chain(self) -> bytes:
        """The chain hash at :attr:`seq` (StoreError if the last event's record is damaged)."""
        if self._head_damage is not None:
            raise StoreError(str(self._head_damage))
        return self._chain

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End the view (idempotent)."""
        txn, self._txn = self._txn, None
        if txn is not None:
            self._store.snapshots.discard(self)
            self._store.txns.end_read(txn)

    def _forked(self) -> None:
        """In a forked child: forget the parent's transaction (see Store.after_fork_child)."""
        if self._txn is not None:
            self._txn = None
            self._invalid = "it was opened before this process was forked"

    def _check(self) -> Any:
        if self._invalid is not None:
            raise StoreError(f"snapshot of seq {self.seq} is no longer valid: {self._invalid}")
        if self._txn is None:
            raise StoreError("the snapshot is not open: use it in a with block")
        return self._txn

    def records(self) -> Iterator[Record]:
        """Every key of the store as a Record ``(key, KeyType, value)``, in key order.

        Values are bytes (immutable), the packed members in zset order
        (mutable) or a dict (indexed), as :meth:`Backend.load_records` takes.
        A mutable key of more than ``settings.RECORD_LIST_MAX`` members
        comes as a :class:`~telstate.lmdb.state.SnapshotMembers`, which
        reads them as it is iterated and only while the snapshot is open;
        smaller ones come as lists.

        Raises
        ------
        StoreError
            If the snapshot was closed, or opened before this process was forked.
        """
        txn = self._check()
        try:
            yield from state_records(txn, self._tables, self._check)
        except lmdb.Error as error:
            self._check()
            raise StoreError(f"reading snapshot of seq {self.seq} failed: {error}") from error

    def state_at(self, seq: int) -> ReplayedState:
        """The state as of event `seq`, rebuilt from the log one key at a time.

        What :func:`~telstate.lmdb.replay` gives (the same keys, the same
        records), in memory bounded by the number of keys and the largest
        key instead of the whole state; its records are read while the
        snapshot is open. Making it reads the log up to `seq` once.

        Raises
        ------
        ValueError
            If `seq` is negative or after the snapshot's.
        StoreError
            If an event up to `seq` is damaged (it is named), or the
            snapshot was closed, or opened before this process was forked.
        """
        if not 0 <= seq <= self.seq:
            raise ValueError(f"event {seq} is not in the snapshot (its events are 1 to {self.seq})")
        txn = self._check()
        try:
            return ReplayedState(txn, self._tables, seq, self._check)
        except lmdb.Error as error:
            self._check()
            raise StoreError(f"reading snapshot of seq {self.seq} failed: {error}") from error


def _result_size(value: object) -> int:
    """About how many bytes a get result holds (an indexed key's dict: its keys and values)."""
    if value is None:
        return 0
    if type(value) is dict:
        return sum(len(sub_key) + len(item) + 100 for sub_key, item in value.items())
    return len(value)  # type: ignore[arg-type]


def _verify_with_imports(txn: Any, tables: Tables, store: uuid.UUID) -> list[str]:
    return verify_in(txn, tables, store) + [
        f"unfinished import of {record.file!r}: the store holds part of it; "
        "import the file again to complete it (or forget_import it, if it changed since)"
        for record in unfinished_imports_in(txn, tables)
    ]


def check_file(
    file: BinaryIO, progress: bulk.Progress | None = None, backend: LmdbBackend | None = None
) -> None:
    """The check pass of :meth:`LmdbBackend.load_from_file`: read `file` whole, writing nothing.

    Against the store of `backend`, or as against an empty store (for an
    import into a store not made yet, so that a refused file leaves none).

    Raises
    ------
    RdbParseError, InvalidTimestampError, ImmutableKeyError
        As :meth:`LmdbBackend.load_records`.
    """
    from .. import import_rules, rdb_reader

    records = rdb_reader.read_records(file, packed_members=True)
    bulk.check(backend, records, import_rules.file_source(file), progress)


def _import_record(file: PathType | BinaryIO, source: PathType | None) -> ImportRecord:
    """The record of an import of `file` in progress: its name, and size and time if it has them."""
    try:
        if isinstance(file, (str, bytes, os.PathLike)):
            status = os.stat(file)
        else:
            status = os.fstat(file.fileno())
    except (AttributeError, OSError, ValueError):
        status = None
    name = "<stream>" if source is None else os.fsdecode(source)
    if status is None or not stat.S_ISREG(status.st_mode):
        # A pipe, say: "<stdin>", not a path; its own, whatever others are named.
        return ImportRecord(name, None, None, os.urandom(8).hex())
    return ImportRecord(os.path.abspath(name), status.st_size, status.st_mtime_ns)
