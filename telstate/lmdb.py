"""The durable store: an append-only event log and the current state in one LMDB environment.

A store is a directory holding an LMDB environment. Every write that
changes the state is one LMDB write transaction that appends an event to
the log (see :mod:`telstate.log`) and updates the state tables, so the two
can never disagree and the state can always be rebuilt from the log
(:func:`replay`, :meth:`LmdbBackend.verify`). Writes that change nothing
(a key or sub-key already set, a sample already present, deleting a
missing key, clearing an empty store) and rejected writes are not events.
Reads come from the state tables only.

Tables
------
LMDB keys (and values of sorted-duplicate tables) are limited to 511
bytes, so names and sub-keys of 480 bytes or more appear in LMDB keys in
*inline form*: their first 448 bytes followed by their SHA-256 digest
(480 bytes, a length no short form has). The full bytes live in the
record. Long sample values are handled differently (see ``samples``).

``meta``
    ``format`` → log format version; ``uuid`` → the store's 16-byte
    identity, made at creation; ``next_key_id`` → 8-byte counter.
``log``
    8-byte big-endian seq → event record (:mod:`telstate.log`).
``writers``
    4-byte writer id → ``[host, pid, name]`` of a writing process.
``keys``
    ``0x01`` + inline key → key record: type (1 byte: 1 immutable,
    2 mutable, 3 indexed), key id (8 bytes, new for every creation of the
    key), flags (1 byte: 1 = long name, 2 = long sample values), the last
    timestamp sealed into blocks (float64; -1 if none), then for a long
    name its 4-byte length and the name, then the value of an immutable key.
``samples`` (sorted duplicates)
    The *tail* of each mutable key: key id → one duplicate per recent
    sample, 8-byte big-endian timestamp + value. LMDB sorts duplicates by
    bytes, which is katsdptelstate's order (timestamp, then value bytes),
    and stores an identical (timestamp, value) once. A value of 480 bytes
    or more appears as its first 448 bytes, 24 zero bytes and the 8-byte
    seq of the event that added it: the full value is read from the log
    (it is stored once), identical samples are found by comparing full
    values, and the order among equal timestamps is restored on read.
``blocks``
    Older samples of mutable keys, sealed from the tail 128 at a time: key
    id + first timestamp → count, timestamps, msgpack array of values.
    Blocks are disjoint in time and older than the tail, so ``get_range``
    seeks and reads few big records (see "mutable keys" below).
``indexed``
    key id + inline sub-key → value; for a long sub-key, 4-byte length +
    sub-key + value.
``history`` (sorted fixed-size duplicates)
    ``0x01`` + inline key → 8-byte seq of every event on that key;
    ``0x00`` → seq of every clear. :meth:`LmdbBackend.history` and
    ``events(keys=...)`` read it instead of scanning the log.

Durability
----------
A process crash (including SIGKILL) loses nothing in any mode: a write
returns after its transaction committed to the shared memory map, which
the kernel writes back to the file. What a *power failure or kernel crash*
loses depends on `durability`:

``'fsync'``
    Nothing that returned: each commit is flushed to disk (LMDB's
    two-phase sync: data pages, then the meta page) before the write returns.
``'batch'`` (default)
    Commits since the last flush, which a background thread performs every
    `flush_interval` seconds (default 1 s) while there are new commits, like
    Redis ``appendfsync everysec``. Between flushes LMDB runs without
    sync (``MDB_NOSYNC``); its documentation warns that if the disk or
    filesystem reorders those unsynced writes, a power failure can leave
    the last transactions, or the store, damaged. Use ``'fsync'`` for
    data that must survive power loss.
``'none'``
    Everything since the last :meth:`~LmdbBackend.flush` or close, bounded
    only by the kernel's dirty-page writeback (typically about 30 s), with
    the same caveat as ``'batch'``.

Processes, threads and fork
---------------------------
Any number of processes may read and write one store at once; LMDB
serialises the writers, so sequence numbers are dense and every check
(e.g. an immutable already set) happens inside the write transaction.
Each process opens the environment once per path: every
:class:`LmdbBackend` on that path (views and TelescopeStates included)
shares it, and it is opened with the strongest durability any of them
asked for. After ``os.fork`` the child reopens it on first use (a store
with an open :meth:`~LmdbBackend.snapshot` at the moment of the fork
cannot be reopened in the child). Stale reader slots of killed processes
are cleared at open, every 10 s by a housekeeping thread of each writing
process and before growing the map. The memory map starts at `map_size`
(4 MiB) and grows by doubling (by at most 1 GiB at a time) when full; the
file space is reserved with ``posix_fallocate`` so that a full disk is an
error, not a crash (LMDB writes through the map), so a store takes at most
twice its data (1 GiB more above 1 GiB) on disk. Other processes follow
a grown map on their next transaction.

Results of ``get`` and ``get_indexed`` are cached per process while no
transaction has committed since they were read (LMDB's last transaction
id, read from its lock file, tells), so repeated reads between writes are
dictionary lookups and every read still sees the latest commit.

A process waiting for a commit (``wait_key``, :meth:`~LmdbBackend.monitor_keys`,
:meth:`~LmdbBackend.wait_for_commit`) is woken by a filesystem event: while
a waiter has announced itself in the store's ``notify`` file (a heartbeat
it renews), each commit writes a byte to that file, watched with
``watchdog``. The truth is LMDB's last transaction id, polled every
50 ms in case the event never arrives (e.g. on network filesystems).
"""

from __future__ import annotations

import atexit
import bisect
import collections
import errno
import hashlib
import heapq
import itertools
import logging
import math
import mmap
import operator
import os
import socket
import struct
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import lmdb
import msgpack

from . import log
from .backend import (
    Backend,
    GetResult,
    ImmutableKeyUpdate,
    IndexedKeyUpdate,
    KeyUpdateBase,
    MutableKeyUpdate,
    Record,
)
from .errors import ImmutableKeyError, ReadOnlyError, StoreError
from .log import Event, Op, Writer
from .utils import KeyType, PathType, compile_pattern, display_str, pack_timestamp

if TYPE_CHECKING:
    from .telescope_state import TelescopeState

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Durability modes, see the module docstring.
DURABILITIES = ("fsync", "batch", "none")

_INITIAL_MAP_SIZE = 4 << 20
_MAX_GROWTH = 1 << 30
_MAX_READERS = 1024
_READER_CHECK_INTERVAL = 10.0
_POLL_INTERVAL = 0.05
_LOG_CHUNK = 4096
_LOAD_CHUNK = 10000
_MONITOR_MAX_SCAN = 10000
_CACHE_MAX_ENTRIES = 4096
_CACHE_MAX_VALUE = 65536
_NOTIFY_FILE = "notify"
_HEARTBEAT = 5.0

# Inline forms (see the module docstring).
_INLINE_LIMIT = 480
_INLINE_PREFIX = 448
_NAME = b"\x01"
_ALL_KEYS = b"\x00"
_LONG_NAME_KEY_LEN = 1 + _INLINE_LIMIT
_LONG_SAMPLE_LEN = 8 + _INLINE_LIMIT
_LONG_PADDING = bytes(_INLINE_LIMIT - _INLINE_PREFIX - 8)

_KEY_RECORD = struct.Struct(">BQBd")
_KEY_ID = struct.Struct(">Q")
_U32 = struct.Struct(">I")
_TIMESTAMP = struct.Struct(">d")
_unpack_timestamp = _TIMESTAMP.unpack_from
_pack_timestamp = _TIMESTAMP.pack
_FLAG_LONG_NAME = 1
_FLAG_LONG_VALUES = 2
_TYPE_BY_CODE = {1: KeyType.IMMUTABLE, 2: KeyType.MUTABLE, 3: KeyType.INDEXED}
_IMMUTABLE, _MUTABLE, _INDEXED = 1, 2, 3
_first8 = operator.itemgetter(slice(0, 8))
_after8 = operator.itemgetter(slice(8, None))

# Where LMDB's lock file keeps the last committed transaction id (see _LockWord).
_LOCK_MAGIC = 0xBEEFC0DE
_LOCK_TXNID_INDEX = 6
_HOST = socket.gethostname()


def _inline(data: bytes) -> bytes:
    """The form of a name, sub-key or value inside an LMDB key (see module docstring)."""
    if len(data) < _INLINE_LIMIT:
        return data
    return data[:_INLINE_PREFIX] + hashlib.sha256(data).digest()


def _name_key(key: bytes) -> bytes:
    """The keys/history table key of telstate key `key`."""
    return _NAME + (key if len(key) < _INLINE_LIMIT else _inline(key))


def _key_record(
    key_type: int, key_id: int, flags: int, key: bytes, value: bytes = b"", sealed: float = -1.0
) -> bytes:
    if len(key) >= _INLINE_LIMIT:
        header = _KEY_RECORD.pack(key_type, key_id, flags | _FLAG_LONG_NAME, sealed)
        return header + _U32.pack(len(key)) + key + value
    return _KEY_RECORD.pack(key_type, key_id, flags & ~_FLAG_LONG_NAME, sealed) + value


def _record_body_offset(record: bytes | memoryview) -> int:
    """Where the value of an immutable key starts in its key record."""
    if record[9] & _FLAG_LONG_NAME:
        return 22 + _U32.unpack_from(record, 18)[0]
    return 18


def _record_sealed(record: bytes | memoryview) -> float:
    """The last timestamp in the blocks of a mutable key (-1.0 if it has none)."""
    return _unpack_timestamp(record, 10)[0]


def _update_record(
    txn: Any,
    tables: _Tables,
    name_key: bytes,
    flags: int | None = None,
    sealed: float | None = None,
) -> None:
    record = bytearray(txn.get(name_key, db=tables.keys))
    if flags is not None:
        record[9] = flags
    if sealed is not None:
        _TIMESTAMP.pack_into(record, 10, sealed)
    txn.put(name_key, bytes(record), db=tables.keys)


def _record_name(name_key: bytes, record: bytes | memoryview) -> bytes:
    """The telstate key of a keys table entry."""
    if len(name_key) == _LONG_NAME_KEY_LEN:
        length = _U32.unpack_from(record, 18)[0]
        return bytes(record[22 : 22 + length])
    return bytes(name_key[1:])


def _cacheable(value: object) -> bool:
    """Whether a read result is small enough to keep in the read cache."""
    return value is None or len(value) <= _CACHE_MAX_VALUE  # type: ignore[arg-type]


def _next_packed(packed: bytes) -> bytes:
    """The packed timestamp just above `packed` (as an exclusive bound)."""
    return _KEY_ID.pack(_KEY_ID.unpack(packed)[0] + 1)


def _begin_read(env: lmdb.Environment, buffers: bool = False) -> Any:
    """A read transaction, or None if another process grew the map (adopt it and retry).

    Raises
    ------
    lmdb.ReadersFullError
        If every reader slot is taken even after clearing those of dead processes.
    """
    try:
        try:
            return env.begin(buffers=True) if buffers else env.begin()
        except lmdb.ReadersFullError:
            env.reader_check()
            return env.begin(buffers=True) if buffers else env.begin()
    except lmdb.MapResizedError:
        return None


def _abort(txn: lmdb.Transaction) -> None:
    try:
        txn.abort()
    except lmdb.Error:
        pass


class _Tables:
    """The named databases of a store's environment."""

    NAMES = (
        "meta",
        "log",
        "writers",
        "keys",
        "samples",
        "blocks",
        "indexed",
        "history",
    )
    meta: Any
    log: Any
    writers: Any
    keys: Any
    samples: Any
    blocks: Any
    indexed: Any
    history: Any

    def __init__(self, env: lmdb.Environment, txn: lmdb.Transaction | None, create: bool) -> None:
        """Open the tables, in `txn` if it is a write transaction (py-lmdb forgets
        handles opened in a read transaction)."""
        for name in self.NAMES:
            options = {}
            if name == "samples":
                options = {"dupsort": True}
            elif name == "history":
                options = {"dupsort": True, "dupfixed": True}
            setattr(self, name, env.open_db(name.encode(), txn=txn, create=create, **options))


class _LockWord:
    """LMDB's last-committed-transaction id, read straight from its lock file.

    The lock file starts with LMDB's magic; the id sits after the magic,
    the format word and the reader mutex (on 64-bit Linux), followed by the
    number of reader slots. Reading it is a memory load, where
    ``env.info()`` builds a dict. It is trusted only if the magic, the id
    and the reader count match what ``env.info()`` says at open; otherwise
    `words` is None and ``env.info()`` is used.

    POSIX releases *all* of a process's fcntl locks on a file when it closes
    *any* descriptor of it, and LMDB keeps its liveness locks on the lock
    file, so the descriptor (and the map's duplicate of it) must stay open
    until the environment is closed: :meth:`close` must come after
    ``env.close()``.
    """

    def __init__(self, path: str, env: lmdb.Environment) -> None:
        self.words: memoryview | None = None
        self.map: mmap.mmap | None = None
        try:
            self.fd: int | None = os.open(os.path.join(path, "lock.mdb"), os.O_RDONLY)
        except OSError:  # no lock file (a read-only copy opened without locking)
            self.fd = None
            return
        try:
            self.map = mmap.mmap(self.fd, 4096, prot=mmap.PROT_READ)
        except (OSError, ValueError):
            return
        words = memoryview(self.map).cast("Q")
        magic, _ = struct.unpack_from("=II", self.map, 0)
        readers = struct.unpack_from("=I", self.map, 8 * _LOCK_TXNID_INDEX + 8)[0]
        info = env.info()
        if (
            magic == _LOCK_MAGIC
            and words[_LOCK_TXNID_INDEX] == info["last_txnid"]
            and readers == info["num_readers"]
        ):
            self.words = words
        else:
            words.release()

    def close(self) -> None:
        if self.words is not None:
            self.words.release()
            self.words = None
        if self.map is not None:
            self.map.close()
            self.map = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class _Store:
    """The one LMDB environment of a store in this process, shared by its backends.

    Locks, always taken in this order: `write_lock` (one write transaction
    at a time in this process), `read_lock` (held around every short read
    transaction), `sync_lock` (held by the housekeeper while it syncs).
    Remapping the environment (growing, following a resize, reopening)
    holds all three, so no transaction of this process is in flight then,
    except snapshots, which it invalidates.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.env: lmdb.Environment | None = None
        self.tables: _Tables
        self.writable = False
        self.sync = False
        self.initial_map_size = _INITIAL_MAP_SIZE
        self.users = 0
        self.batch_intervals: list[float] = []
        self.write_lock = threading.RLock()
        self.read_lock = threading.RLock()
        self.sync_lock = threading.Lock()
        self.snapshots: weakref.WeakSet[Snapshot] = weakref.WeakSet()
        self.broken: str | None = None
        self.uuid = uuid.UUID(int=0)
        self.notify_fd: int | None = None
        self.notify_map: mmap.mmap | None = None
        self.notify_words: memoryview[float] | None = None
        self.lock_word: _LockWord | None = None
        self.lock_words: memoryview | None = None
        self.writer_ids: dict[str | None, int] = {}
        self.writers: dict[int, Writer] = {}
        # Results of get/get_indexed for the snapshot cache_txnid (see LmdbBackend.get).
        self.cache_txnid = -1
        self.get_cache: dict[bytes, GetResult] = {}
        self.indexed_cache: dict[tuple[bytes, bytes], bytes | None] = {}
        self._reset_process_state()

    def _reset_process_state(self) -> None:
        """Forget what belongs to this process only (called at creation and after fork)."""
        self.commit_condition = threading.Condition(threading.Lock())
        self.commit_generation = 0
        self.waiters = 0
        self.watch: Any = None
        self.housekeeper: threading.Thread | None = None
        self.housekeeper_stop = threading.Event()
        self.writer_ids = {}
        # (transaction id, seq, time) of this process's last commit with events:
        # while nobody else commits, the next event follows it (see _append).
        self.last_commit: tuple[int, int, float] = (-1, 0, 0.0)
        self.cache_txnid = -1
        self.get_cache = {}
        self.indexed_cache = {}

    # --- opening and closing -----------------------------------------------------------

    def attach(
        self, writable: bool, sync: bool, batch_interval: float | None, map_size: int
    ) -> None:
        """Register one more backend, opening or upgrading the environment as it needs.

        Raises
        ------
        StoreError
            If the store is missing (read-only open), is not a telstate
            store, or cannot be upgraded while a snapshot is open.
        """
        with self.write_lock, self.read_lock, self.sync_lock:
            if self.broken:
                raise StoreError(self.broken)
            self.initial_map_size = map_size
            if self.env is None or (writable and not self.writable) or (sync and not self.sync):
                if self.env is not None and self.snapshots:
                    raise StoreError(
                        f"cannot reopen {self.path!r} for writing or fsync while a snapshot "
                        "is open in this process: close the snapshot first"
                    )
                self._close_env()
                self._open_env(writable or self.writable, sync or self.sync)
            self.users += 1
            if batch_interval is not None:
                self.batch_intervals.append(batch_interval)
        self.start_housekeeper()

    def detach(self, batch_interval: float | None) -> bool:
        """Unregister a backend; close everything after the last one. True if closed."""
        with self.write_lock, self.read_lock:
            if batch_interval is not None and batch_interval in self.batch_intervals:
                self.batch_intervals.remove(batch_interval)
            self.users -= 1
            if self.users > 0:
                return False
        self.close()
        return True

    def close(self) -> None:
        """Stop the helpers, flush and close the environment."""
        self.stop_housekeeper()
        self.unwatch()
        with self.write_lock, self.read_lock, self.sync_lock:
            if self.env is not None and self.writable and not self.sync:
                try:
                    self.env.sync(True)
                except lmdb.Error as error:
                    logger.warning("final flush of %s failed: %s", self.path, error)
            self._close_env()
            if self.notify_fd is not None:
                assert self.notify_map is not None and self.notify_words is not None
                self.notify_words.release()
                self.notify_map.close()
                os.close(self.notify_fd)
                self.notify_fd = self.notify_map = self.notify_words = None

    def _close_env(self) -> None:
        for snap in list(self.snapshots):
            snap._invalidate("the store was closed or reopened")
        if self.env is not None:
            self.env.close()
            self.env = None
        self.lock_words = None
        if self.lock_word is not None:
            self.lock_word.close()  # only now: closing it releases LMDB's fcntl locks
            self.lock_word = None

    def _open_env(self, writable: bool, sync: bool) -> None:
        path = self.path
        data_file = os.path.join(path, "data.mdb")
        exists = os.path.exists(data_file)
        if not exists:
            if not writable:
                raise StoreError(f"no telstate store at {path!r}: it has no data.mdb")
            if os.path.exists(path) and not os.path.isdir(path):
                raise StoreError(f"cannot create a telstate store at {path!r}: it is a file")
            os.makedirs(path, exist_ok=True)
            strangers = set(os.listdir(path)) - {"lock.mdb", _NOTIFY_FILE}
            if strangers:
                raise StoreError(
                    f"{path!r} is not a telstate store and not empty "
                    f"(it holds {sorted(strangers)[:3]}): choose an empty or new directory"
                )
        options: dict[str, Any] = dict(
            map_size=0 if exists else self.initial_map_size,
            subdir=True,
            readonly=not writable,
            sync=sync,
            writemap=writable,
            max_readers=_MAX_READERS,
            max_dbs=len(_Tables.NAMES),
            max_spare_txns=0,
            create=writable,
        )
        try:
            try:
                env = lmdb.open(path, **options)
            except lmdb.Error as error:
                # A read-only copy without write access to its directory: no lock
                # file can exist, so open without locking (nobody can write to it).
                if writable or "ermission denied" not in str(error):
                    raise
                env = lmdb.open(path, lock=False, **options)
        except lmdb.Error as error:
            raise StoreError(f"cannot open the telstate store at {path!r}: {error}") from error
        try:
            if writable:
                env.reader_check()
            self.tables, self.uuid = self._open_tables(env, writable)
            if writable:
                self._reserve(data_file, env.info()["map_size"])
            if self.notify_fd is None:
                self._open_notify(writable)
        except BaseException:
            env.close()
            raise
        self.env = env
        self.writable = writable
        self.sync = sync
        self.lock_word = _LockWord(path, env)
        self.lock_words = self.lock_word.words

    def _open_notify(self, writable: bool) -> None:
        """Open and map the notify file: 8 bytes of heartbeat, then the byte commits write."""
        try:
            fd = os.open(
                os.path.join(self.path, _NOTIFY_FILE),
                os.O_RDWR | (os.O_CREAT if writable else 0),
                0o644,
            )
        except OSError:
            return  # a read-only copy: waiters poll
        try:
            if os.fstat(fd).st_size < 16:
                os.ftruncate(fd, 16)
            self.notify_map = mmap.mmap(fd, 16)
        except OSError:
            os.close(fd)
            return
        self.notify_fd = fd
        self.notify_words = memoryview(self.notify_map).cast("d")

    def _open_tables(self, env: lmdb.Environment, writable: bool) -> tuple[_Tables, uuid.UUID]:
        """Open the tables (creating them and the identity in a new store) and check the format.

        Raises
        ------
        StoreError
            If the environment is not a telstate store or has another format.
        """
        tables = None
        if not writable:
            tables = self._find_tables(env, None)
        with env.begin(write=writable) as txn:
            fresh = writable and txn.stat()["entries"] == 0
            if tables is None:
                tables = self._find_tables(env, txn, create=fresh)
            if fresh:
                identity = uuid.uuid4()
                txn.put(b"format", b"%d" % log.FORMAT_VERSION, db=tables.meta)
                txn.put(b"uuid", identity.bytes, db=tables.meta)
                txn.put(b"next_key_id", _KEY_ID.pack(1), db=tables.meta)
                return tables, identity
            version = txn.get(b"format", db=tables.meta)
            identity_bytes = txn.get(b"uuid", db=tables.meta)
            if version is None or identity_bytes is None:
                raise StoreError(f"{self.path!r} is not a telstate store: it has no identity")
            if version != b"%d" % log.FORMAT_VERSION:
                raise StoreError(
                    f"{self.path!r} has log format {version.decode(errors='replace')}, "
                    f"this telstate reads format {log.FORMAT_VERSION}: upgrade telstate"
                )
            return tables, uuid.UUID(bytes=identity_bytes)

    def _find_tables(self, env: lmdb.Environment, txn: Any, create: bool = False) -> _Tables:
        try:
            return _Tables(env, txn, create)
        except lmdb.NotFoundError:
            raise StoreError(
                f"{self.path!r} is an LMDB environment but not a telstate store"
            ) from None

    def caches_for(
        self, txnid: int
    ) -> tuple[dict[bytes, GetResult], dict[tuple[bytes, bytes], bytes | None]] | None:
        """The read caches for results seen in snapshot `txnid`, or None if that is stale.

        Entries are used only while no commit has happened since (see
        LmdbBackend.get), so the tag only moves forward: a result from an
        older snapshot, read by a slower thread, is not cached.
        """
        if txnid != self.cache_txnid:
            if txnid < self.cache_txnid:
                return None
            self.get_cache = {}
            self.indexed_cache = {}
            self.cache_txnid = txnid
        elif len(self.get_cache) + len(self.indexed_cache) >= _CACHE_MAX_ENTRIES:
            self.get_cache.clear()
            self.indexed_cache.clear()
        return self.get_cache, self.indexed_cache

    def last_txnid(self) -> int:
        """The id of the last committed transaction, by any process (-2 if unknown).

        A memory load when the lock word is mapped; otherwise env.info().
        """
        words = self.lock_words
        if words is not None:
            return words[_LOCK_TXNID_INDEX]
        env = self.env
        return env.info()["last_txnid"] if env is not None else -2

    # --- recovery: fork, map resize, growth ---------------------------------------------

    def ensure_open(self) -> lmdb.Environment:
        """The environment, reopened if this is a forked child.

        Raises
        ------
        StoreError
            If the store was closed, or cannot be reopened in this child.
        """
        env = self.env
        if env is not None:
            return env
        with self.write_lock, self.read_lock, self.sync_lock:
            if self.broken:
                raise StoreError(self.broken)
            if self.env is None:
                if self.users == 0:
                    raise StoreError(f"the telstate store at {self.path!r} is closed")
                self._open_env(self.writable, self.sync)
        self.start_housekeeper()
        assert self.env is not None
        return self.env

    def adopt_map_size(self) -> None:
        """Follow a map that another process grew."""
        with self.write_lock, self.read_lock, self.sync_lock:
            self._remap(0)

    def grow(self) -> None:
        """Grow the map after MapFullError (caller holds write_lock, no write txn active).

        Raises
        ------
        StoreError
            If the disk has no room for the larger map.
        """
        with self.read_lock, self.sync_lock:
            env = self.env
            assert env is not None
            if env.reader_check():
                # Dead readers were pinning old pages; retrying may be enough.
                return
            size = env.info()["map_size"]
            new_size = size + min(size, _MAX_GROWTH)
            self._reserve(os.path.join(self.path, "data.mdb"), new_size)
            logger.info("growing %s map from %d to %d bytes", self.path, size, new_size)
            self._remap(new_size)

    def _remap(self, size: int) -> None:
        for snap in list(self.snapshots):
            snap._invalidate("the store's map was resized")
        assert self.env is not None
        self.env.set_mapsize(size)

    def _reserve(self, data_file: str, size: int) -> None:
        """Allocate the file's blocks up to `size`, so writes through the map cannot hit ENOSPC.

        Raises
        ------
        StoreError
            If the disk is full.
        """
        fd = os.open(data_file, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise StoreError(
                    f"no room to grow the telstate store at {self.path!r} to {size} bytes: "
                    f"{error.strerror}; free disk space"
                ) from error
            if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
        finally:
            os.close(fd)

    # --- commits: notification and flushing --------------------------------------------

    def committed(self) -> None:
        """Tell waiters in this and other processes that a commit happened.

        Other processes are told through a write to the notify file, which
        their filesystem watch sees; it is skipped while no process has
        announced that it is waiting (see :meth:`heartbeat`).
        """
        words = self.notify_words
        if words is not None and words[0] > time.time():
            os.pwrite(self.notify_fd, b"\x00", 8)  # type: ignore[arg-type]
        if self.waiters:
            self.wake()

    def heartbeat(self) -> None:
        """Announce, in the notify file, that a process is waiting for commits.

        The announcement lasts a few seconds; waiters renew it on every
        wake-up. A waiter that cannot write the file (a read-only copy)
        relies on polling.
        """
        words = self.notify_words
        if words is not None:
            now = time.time()
            if words[0] < now + _HEARTBEAT / 2:
                words[0] = now + _HEARTBEAT

    def wake(self) -> None:
        with self.commit_condition:
            self.commit_generation += 1
            self.commit_condition.notify_all()

    def wait_commit(self, generation: int, timeout: float) -> None:
        """Sleep until a commit notification newer than `generation` or `timeout`."""
        with self.commit_condition:
            if self.commit_generation == generation:
                self.commit_condition.wait(timeout)

    def add_waiter(self) -> None:
        with self.commit_condition:
            self.waiters += 1
        if self.watch is None:
            _watch_store(self)

    def remove_waiter(self) -> None:
        with self.commit_condition:
            self.waiters -= 1

    def unwatch(self) -> None:
        if self.watch is not None:
            _unwatch_store(self)

    def start_housekeeper(self) -> None:
        """Start the thread that flushes (batch mode) and clears stale reader slots."""
        with self.sync_lock:
            if self.housekeeper is not None or not self.writable or self.env is None:
                return
            self.housekeeper_stop = threading.Event()
            self.housekeeper = threading.Thread(
                target=self._housekeeping,
                args=(self.housekeeper_stop,),
                name=f"telstate-housekeeper {self.path}",
                daemon=True,
            )
            self.housekeeper.start()

    def stop_housekeeper(self) -> None:
        housekeeper = self.housekeeper
        if housekeeper is not None:
            self.housekeeper_stop.set()
            if housekeeper is not threading.current_thread():
                housekeeper.join()
            self.housekeeper = None

    def _housekeeping(self, stop: threading.Event) -> None:
        synced = self.last_txnid()
        next_reader_check = 0.0
        while True:
            batch = not self.sync and bool(self.batch_intervals)
            if stop.wait(min(self.batch_intervals) if batch else _READER_CHECK_INTERVAL):
                return
            with self.sync_lock:
                env = self.env
                if env is None or stop.is_set():
                    return
                try:
                    txnid = self.last_txnid()
                    if batch and txnid != synced:
                        env.sync(True)
                        synced = txnid
                    if time.monotonic() >= next_reader_check:
                        next_reader_check = time.monotonic() + _READER_CHECK_INTERVAL
                        cleared = env.reader_check()
                        if cleared:
                            logger.info("cleared %d stale reader slots of %s", cleared, self.path)
                except lmdb.Error as error:
                    logger.error("housekeeping of %s failed: %s", self.path, error)

    def flush(self) -> None:
        """Flush every commit so far to disk."""
        with self.sync_lock:
            if self.env is not None and self.writable:
                self.env.sync(True)

    # --- fork ------------------------------------------------------------------------

    def before_fork(self) -> None:
        self.write_lock.acquire()
        self.read_lock.acquire()
        self.sync_lock.acquire()

    def after_fork_parent(self) -> None:
        self.sync_lock.release()
        self.read_lock.release()
        self.write_lock.release()

    def after_fork_child(self) -> None:
        # No transaction of ours is in flight (before_fork held the locks),
        # so closing the inherited environment cannot touch the parent's
        # reader slots -- unless a snapshot is open: then leave it alone.
        if self.env is not None:
            if self.snapshots:
                self.broken = (
                    f"the telstate store at {self.path!r} had a snapshot open when this "
                    "process was forked, so it cannot be reopened here: open it after forking"
                )
                self.snapshots = weakref.WeakSet()
            else:
                self.env.close()
            self.env = None
        if self.lock_word is not None:
            self.lock_word.close()  # the child holds no locks to lose
        self.lock_word = None
        self.lock_words = None
        self._reset_process_state()
        self.sync_lock = threading.Lock()
        self.read_lock = threading.RLock()
        self.write_lock = threading.RLock()


# --- the process-wide registry of open stores -------------------------------------------

_STORES: dict[str, _Store] = {}
_STORES_LOCK = threading.Lock()


def _before_fork() -> None:
    _STORES_LOCK.acquire()
    for store in _STORES.values():
        store.before_fork()


def _after_fork_parent() -> None:
    for store in _STORES.values():
        store.after_fork_parent()
    _STORES_LOCK.release()


def _after_fork_child() -> None:
    global _STORES_LOCK, _OBSERVER
    for store in _STORES.values():
        store.after_fork_child()
    _STORES_LOCK = threading.Lock()
    _OBSERVER = None


os.register_at_fork(
    before=_before_fork, after_in_parent=_after_fork_parent, after_in_child=_after_fork_child
)


@atexit.register
def _flush_at_exit() -> None:
    for store in list(_STORES.values()):
        try:
            store.flush()
        except Exception:  # pragma: no cover - best effort at interpreter exit
            pass


def _attach_store(
    path: PathType, writable: bool, sync: bool, batch_interval: float | None, map_size: int
) -> _Store:
    path = os.path.realpath(os.fsdecode(path))
    with _STORES_LOCK:
        store = _STORES.get(path)
        if store is None:
            store = _STORES[path] = _Store(path)
        try:
            store.attach(writable, sync, batch_interval, map_size)
        except BaseException:
            if store.users == 0:
                del _STORES[path]
            raise
    return store


def _detach_store(store: _Store, batch_interval: float | None) -> None:
    with _STORES_LOCK:
        if store.detach(batch_interval) and _STORES.get(store.path) is store:
            del _STORES[store.path]


# --- commit notification across processes (watchdog) ----------------------------------

_OBSERVER: Any = None


def _watch_store(store: _Store) -> None:
    """Wake `store`'s waiters on filesystem events of its notify file (best effort)."""
    global _OBSERVER
    try:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer
    except ImportError:  # pragma: no cover - watchdog is a dependency
        return
    notify_path = os.path.join(store.path, _NOTIFY_FILE)

    class CommitHandler(FileSystemEventHandler):
        def on_any_event(self, event: Any) -> None:
            if os.fsdecode(event.src_path) == notify_path:
                store.wake()

    with _STORES_LOCK:
        if store.watch is not None:
            return
        try:
            if _OBSERVER is None:
                _OBSERVER = Observer()
                _OBSERVER.daemon = True
                _OBSERVER.start()
            store.watch = _OBSERVER.schedule(CommitHandler(), store.path, recursive=False)
        except OSError as error:
            # E.g. out of inotify instances: polling still works.
            logger.debug("cannot watch %s (%s); polling for commits", store.path, error)
            store.watch = False


def _unwatch_store(store: _Store) -> None:
    watch, store.watch = store.watch, None
    if watch and _OBSERVER is not None:
        try:
            _OBSERVER.unschedule(watch)
        except (KeyError, OSError):
            pass


# --- the state model used by replay and verify -----------------------------------------


_MODEL_TYPES: dict[type, KeyType] = {
    bytes: KeyType.IMMUTABLE,
    set: KeyType.MUTABLE,
    dict: KeyType.INDEXED,
}


class _StateModel:
    """The state a sequence of events leads to, as plain Python containers."""

    def __init__(self) -> None:
        # bytes: immutable; set of packed members: mutable; dict: indexed.
        self.data: dict[bytes, Any] = {}

    def apply(self, raw: log.RawEvent) -> None:
        op_code, _, _, timestamp, key, sub_key, value = raw
        data = self.data
        if op_code == log.ADD_MUTABLE:
            members = data.get(key)
            if members is None:
                members = data[key] = set()
            members.add(pack_timestamp(timestamp) + value)
        elif op_code == log.SET_IMMUTABLE:
            data[key] = value
        elif op_code == log.SET_INDEXED:
            sub_keys = data.get(key)
            if sub_keys is None:
                sub_keys = data[key] = {}
            sub_keys[sub_key] = value
        elif op_code == log.DELETE:
            data.pop(key, None)
        elif op_code == log.CLEAR:
            data.clear()
        else:
            raise StoreError(f"unknown operation code {op_code} in the log")

    def records(self) -> Iterator[Record]:
        """Every key as a Record, in key order."""
        for key in sorted(self.data):
            value = self.data[key]
            if isinstance(value, bytes):
                yield key, KeyType.IMMUTABLE, value
            elif isinstance(value, set):
                yield key, KeyType.MUTABLE, sorted(value)
            else:
                yield key, KeyType.INDEXED, dict(value)


# --- mutable keys: a tail of recent samples and sealed blocks of older ones -------------
#
# A mutable key's samples live in two places. The *tail* holds its recent
# samples, one sorted duplicate each in the samples table, so an add is one
# put. When the tail reaches _TAIL_MAX samples, all but those with its last
# timestamp are *sealed* into a block: one record of the blocks table, key
# id + first timestamp -> count n, n big-endian timestamps and a msgpack
# array of the values, sorted like the zset. Blocks are disjoint in time
# and all older than the tail (the key record keeps the last sealed
# timestamp), so reading a long history is a scan of a few big records. A
# late sample (not after the sealed timestamp) goes into its block, which
# splits in two at a timestamp boundary when it outgrows _BLOCK_MAX. Keys
# with sample values of 480 bytes or more (arrays, mostly) are not sealed:
# their reads are dominated by copying the values anyway.

_TAIL_MAX = 128
_BLOCK_MAX = 512


def _encode_block(members: list[bytes]) -> bytes:
    """One block of members (8-byte timestamp + full value), in order."""
    return b"".join(
        [
            _U32.pack(len(members)),
            *map(_first8, members),
            msgpack.packb(list(map(_after8, members))),
        ]
    )


class _Block:
    """A block read from the blocks table: timestamps decoded at once, values on demand."""

    __slots__ = ("data", "count", "stamps", "_values")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.count = count = _U32.unpack_from(data)[0]
        self.stamps: tuple[float, ...] = struct.unpack_from(f">{count}d", data, 4)
        self._values: list[bytes] | None = None

    def values(self) -> list[bytes]:
        if self._values is None:
            self._values = msgpack.unpackb(self.data[4 + 8 * self.count :])
        return self._values

    def member(self, index: int) -> bytes:
        return self.data[4 + 8 * index : 12 + 8 * index] + self.values()[index]

    def members(self) -> list[bytes]:
        stamps = self.data[4 : 4 + 8 * self.count]
        return [stamps[8 * i : 8 * i + 8] + value for i, value in enumerate(self.values())]

    def before(self, start: float) -> int:
        """Index of the greatest member not above the packed `start`, or -1.

        That is the last sample before `start`, or one at `start` with an
        empty value (ZREVRANGEBYLEX's inclusive bound, which Redis uses).
        """
        index = bisect.bisect_left(self.stamps, start)
        if index < self.count and self.stamps[index] == start and not self.values()[index]:
            return index
        return index - 1


def _long_value(txn: Any, tables: _Tables, member: bytes) -> bytes:
    """The full value of a long tail member, from the event that added it."""
    record = txn.get(member[-8:], db=tables.log)
    if record is None:
        raise StoreError(f"the log lacks event {log.unpack_seq(member[-8:])} of a sample")
    return log.decode_record(record)[6]


def _tail_members(txn: Any, tables: _Tables, members: list) -> list[bytes]:
    """Tail members as full members: long values fetched, and the order they lost restored."""
    resolved = []
    for member in members:
        member = bytes(member)
        if len(member) == _LONG_SAMPLE_LEN:
            member = member[:8] + _long_value(txn, tables, member)
        resolved.append(member)
    resolved.sort()
    return resolved


def _max_of_run(txn: Any, tables: _Tables, key_id: bytes, cursor: Any) -> bytes:
    """The greatest member with the timestamp of the tail member at `cursor`.

    Long values lost their order, so every member of the run is compared.
    """
    member = bytes(cursor.value())
    stamp = member[:8]
    run = [member]
    while cursor.prev_dup() and cursor.value()[:8] == stamp:
        run.append(bytes(cursor.value()))
    return _tail_members(txn, tables, run)[-1]


def _latest_member(txn: Any, tables: _Tables, key_id: bytes, flags: int) -> bytes:
    """The greatest (timestamp, value) member of a mutable key (always in its tail)."""
    cursor = txn.cursor(tables.samples)
    if not (cursor.set_key(key_id) and cursor.last_dup()):
        raise StoreError(f"mutable key id {key_id.hex()} has no samples")
    if flags & _FLAG_LONG_VALUES:
        return _max_of_run(txn, tables, key_id, cursor)
    return bytes(cursor.value())


def _previous_member(
    txn: Any, tables: _Tables, key_id: bytes, flags: int, sealed: float, start: float
) -> bytes | None:
    """The greatest member not above the packed `start` (> 0), or None (see _Block.before)."""
    bound = _pack_timestamp(start)
    if start > sealed:
        cursor = txn.cursor(tables.samples)
        if start < math.inf and cursor.set_range_dup(key_id, bound):
            if cursor.value() == bound:
                return bound
            found = cursor.prev_dup()
        else:
            found = cursor.set_key(key_id) and cursor.last_dup()
        if found:
            if flags & _FLAG_LONG_VALUES:
                return _max_of_run(txn, tables, key_id, cursor)
            return bytes(cursor.value())
    if sealed < 0.0:
        return None
    # In the block that starts at `start` (an empty value) or the last one before.
    cursor = txn.cursor(tables.blocks)
    found = cursor.set_range(key_id + bound)
    if found and cursor.key() == key_id + bound and not _Block(cursor.value()).values()[0]:
        return bound
    if not (cursor.prev() if found else cursor.last()) or cursor.key()[:8] != key_id:
        return None
    block = _Block(cursor.value())
    return block.member(block.before(start))


def _add_member(values: list[bytes], stamps: list[float], member: bytes | None) -> None:
    if member is not None:
        values.append(member[8:])
        stamps.append(_unpack_timestamp(member)[0])


def _blocks_from(txn: Any, tables: _Tables, key_id: bytes, start: float) -> Iterator[_Block]:
    """The blocks of a key from the one that may hold `start` on."""
    cursor = txn.cursor(tables.blocks)
    positioned = False
    if start > 0.0:
        target = key_id + _pack_timestamp(start)
        found = cursor.set_range(target)
        if found and cursor.key() == target:
            positioned = True
        elif (cursor.prev() if found else cursor.last()) and cursor.key()[:8] == key_id:
            positioned = True  # the block before may hold samples from `start` on
    if not positioned and not cursor.set_range(key_id):
        return
    while cursor.key()[:8] == key_id:
        yield _Block(cursor.value())
        if not cursor.next():
            return


def _samples(
    txn: Any,
    tables: _Tables,
    key_id: bytes,
    flags: int,
    sealed: float,
    start: float,
    end: float,
    include_previous: bool,
    include_end: bool,
) -> tuple[list[bytes], list[float]]:
    """Values and timestamps of the samples in [start, end) or [start, end], in order.

    `include_previous` adds the last sample before a positive `start` first.
    """
    values: list[bytes] = []
    stamps: list[float] = []
    want_previous = include_previous and start > 0.0
    if want_previous and start > sealed:
        _add_member(values, stamps, _previous_member(txn, tables, key_id, flags, sealed, start))
        want_previous = False
    empty = start == math.inf or end < 0.0
    if start <= sealed and not (empty and not want_previous):
        below_end = bisect.bisect_right if include_end else bisect.bisect_left
        for block in _blocks_from(txn, tables, key_id, start):
            low = bisect.bisect_left(block.stamps, start) if start > block.stamps[0] else 0
            if want_previous:
                # The first block holds the previous sample, unless it starts at `start`.
                want_previous = False
                index = block.before(start)
                if index >= 0:
                    _add_member(values, stamps, block.member(index))
                elif block.stamps[0] == start:
                    previous = _previous_member(txn, tables, key_id, flags, sealed, start)
                    _add_member(values, stamps, previous)
            if empty or block.stamps[0] > end or (block.stamps[0] == end and not include_end):
                break
            high = below_end(block.stamps, end)
            if low == 0 and high == block.count:
                values += block.values()
                stamps += block.stamps
            else:
                values += block.values()[low:high]
                stamps += block.stamps[low:high]
            if high < block.count:
                return values, stamps
    if empty:
        return values, stamps
    if end > sealed:
        cursor = txn.cursor(tables.samples)
        if (
            cursor.set_range_dup(key_id, _pack_timestamp(start))
            if start > 0.0
            else cursor.set_key(key_id)
        ):
            members = cursor.iternext_dup(keys=False)
            if end < math.inf:
                bound = _pack_timestamp(end)
                members = itertools.takewhile(
                    (_next_packed(bound) if include_end else bound).__gt__, members
                )
            tail = list(members)
            if flags & _FLAG_LONG_VALUES:
                tail = _tail_members(txn, tables, tail)
            values += map(_after8, tail)
            stamps += struct.unpack(f">{len(tail)}d", b"".join(map(_first8, tail)))
    return values, stamps


def _all_members(txn: Any, tables: _Tables, key_id: bytes, flags: int) -> list[bytes]:
    """Every member of a mutable key, in order."""
    members = []
    for block in _blocks_from(txn, tables, key_id, -1.0):
        members += block.members()
    cursor = txn.cursor(tables.samples)
    tail = list(cursor.iternext_dup(keys=False)) if cursor.set_key(key_id) else []
    if flags & _FLAG_LONG_VALUES:
        return members + _tail_members(txn, tables, tail)
    return members + [bytes(member) for member in tail]


def _add_sample(
    txn: Any,
    tables: _Tables,
    name_key: bytes,
    key_id: bytes,
    flags: int,
    sealed: float,
    stamp: float,
    value: bytes,
    seq: int,
) -> bool:
    """Store one sample of a mutable key, added by event `seq`; False if it is already there."""
    if stamp <= sealed:
        return _insert_into_block(txn, tables, key_id, stamp, value)
    cursor = txn.cursor(tables.samples)
    if len(value) < _INLINE_LIMIT:
        if not cursor.put(key_id, _pack_timestamp(stamp) + value, False):
            return False
    else:
        prefix = _pack_timestamp(stamp) + value[:_INLINE_PREFIX]
        if cursor.set_range_dup(key_id, prefix):
            for member in cursor.iternext_dup(keys=False):
                if member[: len(prefix)] != prefix:
                    break
                if len(member) == _LONG_SAMPLE_LEN and _long_value(txn, tables, member) == value:
                    return False
        cursor.put(key_id, prefix + _LONG_PADDING + log.pack_seq(seq))
        if not flags & _FLAG_LONG_VALUES:
            flags |= _FLAG_LONG_VALUES
            _update_record(txn, tables, name_key, flags=flags)
    count = cursor.count()
    if count >= _TAIL_MAX and not flags & _FLAG_LONG_VALUES:
        _seal(txn, tables, name_key, key_id)
    return True


def _seal(txn: Any, tables: _Tables, name_key: bytes, key_id: bytes) -> None:
    """Move all tail samples but those with the last timestamp into a new block.

    Only for keys without long values in the tail: blocks speed up reading
    many small samples, while sealing big ones would only copy them.
    """
    cursor = txn.cursor(tables.samples)
    cursor.set_key(key_id)
    tail = list(cursor.iternext_dup(keys=False))
    last = tail[-1][:8]
    keep = len(tail)
    while keep and tail[keep - 1][:8] == last:
        keep -= 1
    if not keep:
        return  # every sample has the same timestamp: nothing can be sealed yet
    moving = tail[:keep]
    txn.delete(key_id, db=tables.samples)  # every duplicate at once, then put back the rest
    for member in tail[keep:]:
        cursor.put(key_id, member)
    txn.put(key_id + moving[0][:8], _encode_block(moving), db=tables.blocks)
    _update_record(txn, tables, name_key, sealed=_unpack_timestamp(moving[-1])[0])


def _insert_into_block(
    txn: Any, tables: _Tables, key_id: bytes, stamp: float, value: bytes
) -> bool:
    """Add a late sample to the block its timestamp falls in; False if already there."""
    cursor = txn.cursor(tables.blocks)
    target = key_id + _pack_timestamp(stamp)
    found = cursor.set_range(target)
    if not (found and cursor.key() == target):
        if not (cursor.prev() if found else cursor.last()) or cursor.key()[:8] != key_id:
            cursor.set_range(key_id)  # before every block: the first one takes it
    block_key = cursor.key()
    members = _Block(cursor.value()).members()
    member = _pack_timestamp(stamp) + value
    index = bisect.bisect_left(members, member)
    if index < len(members) and members[index] == member:
        return False
    members.insert(index, member)
    txn.delete(block_key, db=tables.blocks)
    for part in _split_block(members):
        txn.put(key_id + part[0][:8], _encode_block(part), db=tables.blocks)
    return True


def _split_block(members: list[bytes]) -> list[list[bytes]]:
    """`members` as one block, or two split at the timestamp boundary nearest the middle."""
    if len(members) <= _BLOCK_MAX:
        return [members]
    middle = len(members) // 2
    for offset in range(middle):
        for index in (middle - offset, middle + offset):
            if 0 < index < len(members) and members[index][:8] != members[index - 1][:8]:
                return [members[:index], members[index:]]
    return [members]  # one timestamp throughout: it cannot be split


# --- reading the other state tables ---------------------------------------------------


def _indexed_items(txn: Any, tables: _Tables, key_id: bytes) -> dict[bytes, bytes]:
    """Every sub-key of an indexed key."""
    cursor = txn.cursor(db=tables.indexed)
    items: dict[bytes, bytes] = {}
    if not cursor.set_range(key_id):
        return items
    for entry_key, data in cursor.iternext():
        if entry_key[:8] != key_id:
            break
        if len(entry_key) == 8 + _INLINE_LIMIT:
            length = _U32.unpack_from(data)[0]
            items[bytes(data[4 : 4 + length])] = bytes(data[4 + length :])
        else:
            items[bytes(entry_key[8:])] = bytes(data)
    return items


def _indexed_value(txn: Any, tables: _Tables, key_id: bytes, sub_key: bytes) -> bytes | None:
    data = txn.get(key_id + _inline(sub_key), db=tables.indexed)
    if data is None:
        return None
    if len(sub_key) >= _INLINE_LIMIT:
        length = _U32.unpack_from(data)[0]
        if bytes(data[4 : 4 + length]) != sub_key:
            raise StoreError(f"SHA-256 collision between sub-keys of length {len(sub_key)}")
        return bytes(data[4 + length :])
    return bytes(data)


def _state_record(txn: Any, tables: _Tables, key: bytes, record: bytes) -> Record:
    """The whole of one key, from its keys-table record, as an RDB Record."""
    key_type, key_id_int, flags, _ = _KEY_RECORD.unpack_from(record)
    key_id = _KEY_ID.pack(key_id_int)
    if key_type == _IMMUTABLE:
        return key, KeyType.IMMUTABLE, bytes(record[_record_body_offset(record) :])
    if key_type == _MUTABLE:
        return key, KeyType.MUTABLE, _all_members(txn, tables, key_id, flags)
    if key_type == _INDEXED:
        return key, KeyType.INDEXED, _indexed_items(txn, tables, key_id)
    raise StoreError(f"key {display_str(key)} has unknown type code {key_type}")


def _state_records(txn: Any, tables: _Tables) -> Iterator[Record]:
    """Every key of the state tables as a Record, in key order.

    The keys table is in key order except among keys that share their
    first 448 bytes and are that long: their inline forms order by digest,
    so each such group is sorted before it is given out.
    """
    group: list[tuple[bytes, bytes]] = []
    for name_key, record in txn.cursor(db=tables.keys).iternext():
        key = _record_name(name_key, record)
        if group and key[:_INLINE_PREFIX] != group[0][0][:_INLINE_PREFIX]:
            yield from (_state_record(txn, tables, *entry) for entry in sorted(group))
            group = []
        if len(key) >= _INLINE_PREFIX:
            group.append((key, record))
        else:
            yield _state_record(txn, tables, key, record)
    yield from (_state_record(txn, tables, *entry) for entry in sorted(group))


def _key_state_record(txn: Any, tables: _Tables, key: bytes) -> Record | None:
    record = txn.get(_name_key(key), db=tables.keys)
    return None if record is None else _state_record(txn, tables, key, record)


def _last_seq(txn: Any, tables: _Tables) -> int:
    cursor = txn.cursor(db=tables.log)
    return log.unpack_seq(cursor.key()) if cursor.last() else 0


def _raw_log(txn: Any, tables: _Tables, start_seq: int) -> Iterator[tuple[int, bytes]]:
    """(seq, record) of every event from `start_seq` on, in one transaction."""
    cursor = txn.cursor(db=tables.log)
    if not cursor.set_range(log.pack_seq(max(start_seq, 1))):
        return
    unpack_seq = log.unpack_seq
    for seq_key, record in cursor.iternext():
        yield unpack_seq(seq_key), record


class _LogAudit:
    """Checks made on every event while :meth:`LmdbBackend.verify` replays the log."""

    def __init__(self, writers: set[int]) -> None:
        self.writers = writers
        self.problems: list[str] = []
        self.expected_seq = 1
        # Events per history-table entry, to compare with the history index.
        self.counts: collections.Counter[bytes] = collections.Counter()

    def see(self, seq: int, raw: log.RawEvent) -> None:
        if seq != self.expected_seq:
            self.problems.append(f"log: seq {self.expected_seq - 1} is followed by {seq}")
        self.expected_seq = seq + 1
        if raw[1] not in self.writers:
            self.problems.append(f"log: event {seq} has unknown writer {raw[1]}")
            self.writers.add(raw[1])
        self.counts[_name_key(raw[4]) if raw[0] != log.CLEAR else _ALL_KEYS] += 1


def _replay_model(
    txn: Any,
    tables: _Tables,
    until_seq: int | None = None,
    until_time: float | None = None,
    audit: _LogAudit | None = None,
) -> _StateModel:
    """Apply the log, up to the limits, to an empty model."""
    model = _StateModel()
    apply = model.apply
    decode = log.decode_record
    for seq, record in _raw_log(txn, tables, 1):
        if until_seq is not None and seq > until_seq:
            break
        raw = decode(record)
        if until_time is not None and raw[2] > until_time:
            break
        if audit is not None:
            audit.see(seq, raw)
        apply(raw)
    return model


# --- the backend ----------------------------------------------------------------------


class LmdbBackend(Backend):
    """Telescope state in an LMDB store on local disk, with an event log of every write.

    Parameters
    ----------
    path
        Directory of the store; created (with its parents) on first open.
    durability
        ``'fsync'``, ``'batch'`` or ``'none'``: what a power failure may
        lose (see the module docstring). A process crash loses nothing in
        any mode.
    flush_interval
        Seconds between background flushes in ``'batch'`` mode.
    readonly
        Open an existing store without writing to it; writes raise
        :exc:`ReadOnlyError`.
    writer_name
        Recorded with every event written through this backend.
    map_size
        Initial size in bytes of the memory map of a new store (the map
        grows automatically; this only matters for tests and tuning).

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
    :attr:`uuid`, :attr:`last_seq`, :meth:`events`, :meth:`history`,
    :meth:`snapshot`, :meth:`wait_for_commit`, :meth:`verify`,
    :meth:`flush`, and :func:`replay` in this module.
    """

    def __init__(
        self,
        path: PathType,
        *,
        durability: str = "batch",
        flush_interval: float = 1.0,
        readonly: bool = False,
        writer_name: str | None = None,
        map_size: int = _INITIAL_MAP_SIZE,
    ) -> None:
        if durability not in DURABILITIES:
            raise ValueError(f"durability must be one of {DURABILITIES}, not {durability!r}")
        if not flush_interval > 0:
            raise ValueError(f"flush_interval must be positive, not {flush_interval!r}")
        self.durability = durability
        self.readonly = readonly
        self.writer_name = writer_name
        self._batch_interval = flush_interval if durability == "batch" and not readonly else None
        self._store: _Store | None = _attach_store(
            path,
            writable=not readonly,
            sync=durability == "fsync" and not readonly,
            batch_interval=self._batch_interval,
            map_size=max(map_size, 1 << 16),
        )
        # State of the write transaction in progress (see _write and _append).
        self._new_writer_id: int | None = None
        self._appended: tuple[int, float] | None = None

    # --- plumbing -------------------------------------------------------------------

    @property
    def path(self) -> str:
        """The store's directory (absolute, symlinks resolved)."""
        return self._get_store().path

    def _get_store(self) -> _Store:
        store = self._store
        if store is None:
            raise StoreError("this LmdbBackend is closed")
        return store

    def _read(self, body: Callable[..., _T], *args: Any, buffers: bool = False) -> _T:
        """Run ``body(txn, tables, *args)`` in a fresh read transaction."""
        store = self._get_store()
        while True:
            env = store.env or store.ensure_open()
            with store.read_lock:
                if env is not store.env:
                    continue  # reopened meanwhile
                txn = _begin_read(env, buffers)
                if txn is not None:
                    try:
                        return body(txn, store.tables, *args)
                    except lmdb.Error as error:
                        raise StoreError(
                            f"reading the store at {store.path!r} failed: {error}"
                        ) from error
                    finally:
                        txn.abort()
            store.adopt_map_size()

    def _write(self, body: Callable[..., tuple[_T, bool]], *args: Any) -> _T:
        """Run ``body(txn, tables, *args)`` in a write transaction, committed if it says so.

        `body` returns (result, changed); it must have no effect outside the
        transaction, as it is run again after the map grows or is resized.
        """
        store = self._store
        if store is None or self.readonly:
            self._get_store()
            raise ReadOnlyError(f"the telstate store at {self.path!r} was opened read-only")
        with store.write_lock:
            while True:
                env = store.env or store.ensure_open()
                try:
                    txn = env.begin(None, None, True)
                except lmdb.MapResizedError:
                    store.adopt_map_size()
                    continue
                self._new_writer_id = None
                self._appended = None
                txnid = txn.id()
                try:
                    result, changed = body(txn, store.tables, *args)
                    if changed:
                        txn.commit()
                    else:
                        txn.abort()
                except lmdb.MapFullError:
                    _abort(txn)
                    store.grow()
                    continue
                except lmdb.Error as error:
                    _abort(txn)
                    message = f"writing to the store at {store.path!r} failed: {error}"
                    raise StoreError(message) from error
                except BaseException:
                    _abort(txn)
                    raise
                break
            if changed:
                if self._new_writer_id is not None:
                    store.writer_ids[self.writer_name] = self._new_writer_id
                if self._appended is not None:
                    store.last_commit = (txnid, *self._appended)
        if changed:
            store.committed()
        return result

    def _register_writer(self, txn: Any, tables: _Tables) -> int:
        """The writer id of this process and name, added to the writers table if new."""
        if self._new_writer_id is not None:
            return self._new_writer_id
        cursor = txn.cursor(tables.writers)
        writer_id = log.unpack_writer_id(cursor.key()) + 1 if cursor.last() else 1
        writer = Writer(_HOST, os.getpid(), self.writer_name)
        txn.put(log.pack_writer_id(writer_id), log.encode_writer(writer), db=tables.writers)
        self._new_writer_id = writer_id
        return writer_id

    def _append(
        self,
        txn: Any,
        tables: _Tables,
        op_code: int,
        name_key: bytes,
        key: bytes = b"",
        sub_key: bytes = b"",
        value: bytes = b"",
        timestamp: float = math.nan,
    ) -> None:
        """Append one event to the log and the history index."""
        store: _Store = self._store  # type: ignore[assignment]
        previous_time = self._last_event(txn, tables)[1]
        seq = self._appended[0] + 1  # type: ignore[index]
        now = time.time()
        if now < previous_time:
            now = previous_time  # keep event times monotonic for replay(until_time=...)
        writer_id = store.writer_ids.get(self.writer_name) or self._register_writer(txn, tables)
        seq_key = log.pack_seq(seq)
        record = log.encode_record(op_code, writer_id, now, key, sub_key, value, timestamp)
        # Both appends: seqs grow, in the log and among each key's duplicates.
        txn.put(seq_key, record, True, True, True, tables.log)
        txn.put(name_key, seq_key, True, True, True, tables.history)
        self._appended = (seq, now)

    def _last_event(self, txn: Any, tables: _Tables) -> tuple[int, float]:
        """(seq, time) of the last event before the one about to be appended.

        Usually known without a look at the log: the last one appended in
        this transaction, or this process's last commit if nobody else
        committed since.
        """
        if self._appended is None:
            committed_txnid, seq, previous_time = self._store.last_commit  # type: ignore[union-attr]
            if committed_txnid != txn.id() - 1:
                cursor = txn.cursor(tables.log)
                if cursor.last():
                    seq = log.unpack_seq(cursor.key())
                    previous_time = log.record_time(cursor.value())
                else:
                    seq, previous_time = 0, 0.0
            self._appended = (seq, previous_time)
        return self._appended

    def _new_key(
        self, txn: Any, tables: _Tables, name_key: bytes, key_type: int, key: bytes, value: bytes
    ) -> bytes:
        """Create the keys-table entry of a new key; return its key id."""
        key_id = _KEY_ID.unpack(txn.get(b"next_key_id", db=tables.meta))[0]
        txn.put(b"next_key_id", _KEY_ID.pack(key_id + 1), db=tables.meta)
        txn.put(name_key, _key_record(key_type, key_id, 0, key, value), db=tables.keys)
        return _KEY_ID.pack(key_id)

    # --- Backend: reads -------------------------------------------------------------

    def keys(self, filter: bytes) -> list[bytes]:
        """Return all keys matching `filter`, a Redis glob pattern."""
        match = None if filter == b"*" else compile_pattern(filter).fullmatch
        literal = bytes(itertools.takewhile(lambda c: c not in b"*?[\\", filter))
        return self._read(self._keys_in, _NAME + literal[:_INLINE_PREFIX], match, buffers=True)

    @staticmethod
    def _keys_in(
        txn: Any, tables: _Tables, prefix: bytes, match: Callable[[bytes], Any] | None
    ) -> list[bytes]:
        cursor = txn.cursor(db=tables.keys)
        found = []
        if cursor.set_range(prefix):
            for name_key in cursor.iternext(keys=True, values=False):
                if name_key[: len(prefix)] != prefix:
                    break
                if len(name_key) == _LONG_NAME_KEY_LEN:
                    key = _record_name(name_key, cursor.value())
                else:
                    key = bytes(name_key[1:])
                if match is None or match(key):
                    found.append(key)
        return found

    def key_type(self, key: bytes) -> KeyType | None:
        """Get the type of `key`, or None if it does not exist."""
        return self._read(self._key_type_in, key, buffers=True)

    @staticmethod
    def _key_type_in(txn: Any, tables: _Tables, key: bytes) -> KeyType | None:
        record = txn.get(_name_key(key), db=tables.keys)
        return None if record is None else _TYPE_BY_CODE[record[0]]

    def get(self, key: bytes) -> GetResult:
        """Get the value and timestamp of a key.

        Immutable: (value, None). Mutable: (latest value, its timestamp).
        Indexed: (dict of every sub-key to value, None). Absent: (None, None).
        """
        store = self._get_store()
        # Results are cached per snapshot: valid while no commit happened since.
        if store.last_txnid() == store.cache_txnid:
            cached = store.get_cache.get(key)
            if cached is not None:
                value = cached[0]
                return (dict(value), None) if type(value) is dict else cached
        return self._read(self._get_in, key)

    def _get_in(self, txn: Any, tables: _Tables, key: bytes) -> GetResult:
        record = txn.get(_name_key(key), db=tables.keys)
        result: GetResult
        if record is None:
            result = (None, None)
        elif record[0] == _MUTABLE:
            member = _latest_member(txn, tables, record[1:9], record[9])
            result = (member[8:], _unpack_timestamp(member)[0])
        elif record[0] == _IMMUTABLE:
            result = (record[_record_body_offset(record) :], None)
        else:
            result = (_indexed_items(txn, tables, record[1:9]), None)
        caches = self._get_store().caches_for(txn.id())
        if caches is not None and _cacheable(result[0]):
            caches[0][key] = result
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
        if store.last_txnid() == store.cache_txnid:
            cached = store.indexed_cache.get((key, sub_key), self)
            if cached is not self:
                return cached  # type: ignore[return-value]
        return self._read(self._get_indexed_in, key, sub_key)

    def _get_indexed_in(
        self, txn: Any, tables: _Tables, key: bytes, sub_key: bytes
    ) -> bytes | None:
        record = txn.get(_name_key(key), db=tables.keys)
        if record is None:
            raise KeyError(key)
        if record[0] != _INDEXED:
            raise ImmutableKeyError(
                f"{display_str(key)} is {_TYPE_BY_CODE[record[0]].name.lower()}, not indexed"
            )
        value = _indexed_value(txn, tables, record[1:9], sub_key)
        caches = self._get_store().caches_for(txn.id())
        if caches is not None and _cacheable(value):
            caches[1][key, sub_key] = value
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
        tables: _Tables,
        key: bytes,
        start: float,
        end: float,
        include_previous: bool,
        include_end: bool,
    ) -> tuple[list[bytes], list[float]] | None:
        record = txn.get(_name_key(key), db=tables.keys)
        if record is None:
            return None
        if record[0] != _MUTABLE:
            raise ImmutableKeyError(
                f"{display_str(key)} is {_TYPE_BY_CODE[record[0]].name.lower()}, not mutable"
            )
        sealed = _record_sealed(record)
        return _samples(
            txn, tables, record[1:9], record[9], sealed, start, end, include_previous, include_end
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
        return self._write(self._set_immutable_in, key, value)

    def _set_immutable_in(
        self, txn: Any, tables: _Tables, key: bytes, value: bytes
    ) -> tuple[bytes | None, bool]:
        name_key = _name_key(key)
        record = txn.get(name_key, db=tables.keys)
        if record is not None:
            if record[0] != _IMMUTABLE:
                raise ImmutableKeyError(
                    f"{display_str(key)} is {_TYPE_BY_CODE[record[0]].name.lower()}, not immutable"
                )
            return record[_record_body_offset(record) :], False
        self._new_key(txn, tables, name_key, _IMMUTABLE, key, value)
        self._append(txn, tables, log.SET_IMMUTABLE, name_key, key, b"", value)
        return None, True

    def add_mutable(self, key: bytes, value: bytes, timestamp: float) -> None:
        """Add a (value, timestamp) sample to a mutable key.

        An identical (timestamp, value) sample already present is not
        stored twice (and no event is logged).

        Raises
        ------
        ImmutableKeyError
            If the key exists and is not mutable.
        ReadOnlyError
            If the store was opened read-only.
        StoreError
            If the store is closed or the disk is full.
        """
        self._write(self._add_mutable_in, key, value, timestamp)

    def _add_mutable_in(
        self, txn: Any, tables: _Tables, key: bytes, value: bytes, timestamp: float
    ) -> tuple[None, bool]:
        name_key = _NAME + key if len(key) < _INLINE_LIMIT else _name_key(key)
        record = txn.get(name_key, db=tables.keys)
        if record is None:
            key_id = self._new_key(txn, tables, name_key, _MUTABLE, key, b"")
            flags, sealed = 0, -1.0
        elif record[0] != _MUTABLE:
            raise ImmutableKeyError(
                f"{display_str(key)} is {_TYPE_BY_CODE[record[0]].name.lower()}, not mutable"
            )
        else:
            key_id = record[1:9]
            flags = record[9]
            sealed = _unpack_timestamp(record, 10)[0]
        # A long value points at the event that adds it (the seq it will get).
        seq = self._last_event(txn, tables)[0] + 1 if len(value) >= _INLINE_LIMIT else 0
        # (timestamp or 0.0) turns -0.0 into 0.0, as pack_timestamp does.
        if not _add_sample(
            txn, tables, name_key, key_id, flags, sealed, timestamp or 0.0, value, seq
        ):
            return None, False
        self._append(txn, tables, log.ADD_MUTABLE, name_key, key, b"", value, timestamp)
        return None, True

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
        return self._write(self._set_indexed_in, key, sub_key, value)

    def _set_indexed_in(
        self, txn: Any, tables: _Tables, key: bytes, sub_key: bytes, value: bytes
    ) -> tuple[bytes | None, bool]:
        name_key = _name_key(key)
        record = txn.get(name_key, db=tables.keys)
        if record is None:
            key_id = self._new_key(txn, tables, name_key, _INDEXED, key, b"")
        elif record[0] != _INDEXED:
            raise ImmutableKeyError(
                f"{display_str(key)} is {_TYPE_BY_CODE[record[0]].name.lower()}, not indexed"
            )
        else:
            key_id = record[1:9]
            existing = _indexed_value(txn, tables, key_id, sub_key)
            if existing is not None:
                return existing, False
        data = value
        if len(sub_key) >= _INLINE_LIMIT:
            data = _U32.pack(len(sub_key)) + sub_key + value
        txn.put(key_id + _inline(sub_key), data, db=tables.indexed)
        self._append(txn, tables, log.SET_INDEXED, name_key, key, sub_key, value)
        return None, True

    def delete(self, key: bytes) -> None:
        """Delete a key (no-op, and no event, if it does not exist).

        Raises
        ------
        ReadOnlyError
            If the store was opened read-only.
        StoreError
            If the store is closed or the disk is full.
        """
        self._write(self._delete_in, key)

    def _delete_in(self, txn: Any, tables: _Tables, key: bytes) -> tuple[None, bool]:
        name_key = _name_key(key)
        record = txn.get(name_key, db=tables.keys)
        if record is None:
            return None, False
        key_type, key_id = record[0], record[1:9]
        txn.delete(name_key, db=tables.keys)
        if key_type == _MUTABLE:
            txn.delete(key_id, db=tables.samples)
            self._delete_prefix(txn, tables.blocks, key_id)
        elif key_type == _INDEXED:
            self._delete_prefix(txn, tables.indexed, key_id)
        self._append(txn, tables, log.DELETE, name_key, key)
        return None, True

    @staticmethod
    def _delete_prefix(txn: Any, db: Any, prefix: bytes) -> None:
        cursor = txn.cursor(db=db)
        found = cursor.set_range(prefix)
        while found and cursor.key()[: len(prefix)] == prefix:
            found = cursor.delete()

    def clear(self) -> None:
        """Remove all keys (no event if there are none).

        Raises
        ------
        ReadOnlyError
            If the store was opened read-only.
        StoreError
            If the store is closed or the disk is full.
        """
        self._write(self._clear_in)

    def _clear_in(self, txn: Any, tables: _Tables) -> tuple[None, bool]:
        if txn.stat(tables.keys)["entries"] == 0:
            return None, False
        for db in (tables.keys, tables.samples, tables.blocks, tables.indexed):
            txn.drop(db, delete=False)
        self._append(txn, tables, log.CLEAR, _ALL_KEYS)
        return None, True

    def load_records(self, records: Iterable[Record]) -> int:
        """Store whole keys (as read from an RDB file), each element as one event.

        Immutable keys become set_immutable events, each sample of a mutable
        key an add_mutable event and each sub-key a set_indexed event;
        elements already present are skipped (no event). Events are
        committed in batches of up to 10000.

        Returns
        -------
        The number of keys loaded.

        Raises
        ------
        ImmutableKeyError
            If a key exists with another type (the batches before it stay
            committed).
        ReadOnlyError
            If the store was opened read-only.
        """
        count = 0
        batch: list[tuple[Callable[..., tuple[Any, bool]], tuple]] = []
        for key, key_type, value in records:
            count += 1
            if key_type == KeyType.IMMUTABLE:
                assert isinstance(value, bytes)
                batch.append((self._set_immutable_in, (key, value)))
            elif key_type == KeyType.MUTABLE:
                assert isinstance(value, list)
                for member in value:
                    stamp = _unpack_timestamp(member)[0]
                    batch.append((self._add_mutable_in, (key, member[8:], stamp)))
            else:
                assert isinstance(value, dict)
                for sub_key, sub_value in value.items():
                    batch.append((self._set_indexed_in, (key, sub_key, sub_value)))
            if len(batch) >= _LOAD_CHUNK:
                self._write(self._batch_in, batch)
                batch = []
        if batch:
            self._write(self._batch_in, batch)
        return count

    @staticmethod
    def _batch_in(
        txn: Any, tables: _Tables, batch: list[tuple[Callable[..., tuple[Any, bool]], tuple]]
    ) -> tuple[None, bool]:
        changed = False
        for body, args in batch:
            changed = body(txn, tables, *args)[1] or changed
        return None, changed

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
                    if last - seq > _MONITOR_MAX_SCAN:
                        pending.append(KeyUpdateBase())
                    else:
                        pending.extend(map(_key_update, self.events(seq + 1, last, keys)))
                    seq = last
                elif remaining <= 0.0:
                    break
            timeout = yield pending.popleft() if pending else None

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
                wait = _POLL_INTERVAL
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
    def last_seq(self) -> int:
        """Sequence number of the last event (0 for an empty log)."""
        return self._read(_last_seq, buffers=True)

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
        return self._events_of_keys(start_seq, end_seq, [_name_key(key) for key in keys])

    def _events_in_range(self, start_seq: int, end_seq: int | None) -> Iterator[Event]:
        seq = max(start_seq, 1)
        while end_seq is None or seq <= end_seq:
            chunk = self._read(self._log_chunk, seq, end_seq)
            if not chunk:
                return
            yield from self._make_events(chunk)
            seq = chunk[-1][0] + 1

    @staticmethod
    def _log_chunk(
        txn: Any, tables: _Tables, start_seq: int, end_seq: int | None
    ) -> list[tuple[int, bytes]]:
        chunk = list(itertools.islice(_raw_log(txn, tables, start_seq), _LOG_CHUNK))
        if end_seq is not None:
            while chunk and chunk[-1][0] > end_seq:
                chunk.pop()
        return chunk

    def _events_of_keys(
        self, start_seq: int, end_seq: int | None, name_keys: list[bytes]
    ) -> Iterator[Event]:
        seq = max(start_seq, 1)
        while end_seq is None or seq <= end_seq:
            chunk = self._read(self._history_chunk, name_keys + [_ALL_KEYS], seq, end_seq)
            if not chunk:
                return
            yield from self._make_events(chunk)
            seq = chunk[-1][0] + 1

    @staticmethod
    def _history_chunk(
        txn: Any, tables: _Tables, name_keys: list[bytes], start_seq: int, end_seq: int | None
    ) -> list[tuple[int, bytes]]:
        start = log.pack_seq(start_seq)
        # 8-byte big-endian seqs compare like the numbers.
        limit = log.pack_seq(end_seq) if end_seq is not None else b"\xff" * 8
        streams = []
        for name_key in dict.fromkeys(name_keys):
            cursor = txn.cursor(db=tables.history)
            if cursor.set_range_dup(name_key, start):
                seqs = list(itertools.islice(cursor.iternext_dup(keys=False), _LOG_CHUNK))
                if len(seqs) == _LOG_CHUNK:
                    # Cut short: later seqs of the other keys wait for the next chunk.
                    limit = min(limit, seqs[-1])
                streams.append(seqs)
        seq_keys = list(itertools.takewhile(limit.__ge__, heapq.merge(*streams)))
        get = txn.get
        return [(log.unpack_seq(seq), get(seq, db=tables.log)) for seq in seq_keys]

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
        store.writers.update(self._read(self._writers_in))
        writer = store.writers.get(writer_id)
        if writer is None:
            raise StoreError(f"the log refers to unknown writer {writer_id}")
        return writer

    @staticmethod
    def _writers_in(txn: Any, tables: _Tables) -> dict[int, Writer]:
        try:
            return {
                log.unpack_writer_id(key): log.decode_writer(value)
                for key, value in txn.cursor(db=tables.writers).iternext()
            }
        except (ValueError, struct.error) as error:
            raise StoreError(f"the writers table is damaged: {error}") from None

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
        return self._read(_key_state_record, key)

    def records(self) -> Iterator[Record]:
        """Every key as an RDB record, in key order, from one snapshot (see :meth:`snapshot`).

        Raises
        ------
        StoreError
            If the map is resized by this process while the records are read.
        """
        with self.snapshot() as snap:
            yield from snap.records()

    def snapshot(self) -> Snapshot:
        """A consistent read-only view of the whole store, for ``with`` blocks.

        Example::

            with backend.snapshot() as snap:
                write_rdb(snap.records(), seq=snap.seq, store=snap.uuid)
        """
        return Snapshot(self)

    def verify(self) -> list[str]:
        """Rebuild the state from the log and compare it with the stored state.

        Everything is read in one transaction. Also checks that sequence
        numbers are dense, that every event's writer is known and that the
        history index counts every event.

        Returns
        -------
        A description of each difference found; empty if the store is sound.
        """
        return self._read(self._verify_in)

    @staticmethod
    def _verify_in(txn: Any, tables: _Tables) -> list[str]:
        audit = _LogAudit(set(LmdbBackend._writers_in(txn, tables)))
        problems = audit.problems
        try:
            expected = _replay_model(txn, tables, audit=audit).data
        except (StoreError, struct.error) as error:
            return problems + [f"log: unreadable record ({error})"]
        for key, key_type, value in _state_records(txn, tables):
            name = display_str(key)
            logged = expected.pop(key, None)
            if logged is None:
                problems.append(f"key {name}: in the state but not in the log")
                continue
            logged_type = _MODEL_TYPES[type(logged)]
            if key_type != logged_type:
                problems.append(
                    f"key {name}: {key_type.name.lower()} in the state, "
                    f"{logged_type.name.lower()} in the log"
                )
            elif value != (sorted(logged) if logged_type == KeyType.MUTABLE else logged):
                problems.append(f"key {name}: value differs between state and log")
        for key in sorted(expected):
            problems.append(f"key {display_str(key)}: in the log but not in the state")
        history = txn.cursor(db=tables.history)
        indexed: collections.Counter[bytes] = collections.Counter()
        for name_key in history.iternext_nodup(keys=True, values=False):
            indexed[name_key] = history.count()
        wrong = sum(
            1
            for name_key in indexed.keys() | audit.counts.keys()
            if indexed[name_key] != audit.counts[name_key]
        )
        if wrong:
            problems.append(f"history index: wrong event counts for {wrong} keys")
        return problems

    # --- durability and lifetime ------------------------------------------------------

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
            _detach_store(store, self._batch_interval)

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
    pages it sees cannot be reused and the store grows.

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
        self._invalid: str | None = None
        self.seq = 0
        self.uuid = backend.uuid

    def __enter__(self) -> Snapshot:
        store = self._backend._get_store()
        while True:
            env = store.env or store.ensure_open()
            with store.read_lock:
                if env is not store.env:
                    continue
                self._txn = _begin_read(env)
                if self._txn is not None:
                    store.snapshots.add(self)
                    break
            store.adopt_map_size()
        self._tables = store.tables
        self.seq = _last_seq(self._txn, self._tables)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End the view (idempotent)."""
        store = self._backend._store
        if store is not None:
            store.snapshots.discard(self)
        if self._txn is not None:
            _abort(self._txn)
            self._txn = None

    def _invalidate(self, reason: str) -> None:
        self._invalid = reason
        if self._txn is not None:
            _abort(self._txn)
            self._txn = None

    def _check(self) -> Any:
        if self._invalid is not None:
            raise StoreError(f"snapshot of seq {self.seq} is no longer valid: {self._invalid}")
        if self._txn is None:
            raise StoreError("the snapshot is not open: use it in a with block")
        return self._txn

    def records(self) -> Iterator[Record]:
        """Every key of the store as a Record ``(key, KeyType, value)``, in key order.

        Values are bytes (immutable), the sorted list of packed members
        (mutable) or a dict (indexed), as :meth:`Backend.load_records` takes.

        Raises
        ------
        StoreError
            If the snapshot was closed or invalidated (its map was resized
            by this process, which can happen when the store grows).
        """
        txn = self._check()
        try:
            yield from _state_records(txn, self._tables)
        except lmdb.Error as error:
            self._check()
            raise StoreError(f"reading snapshot of seq {self.seq} failed: {error}") from error


def _key_update(event: Event) -> KeyUpdateBase:
    """The KeyUpdate the frontend expects for an event."""
    assert event.key is not None or event.op == Op.CLEAR
    if event.op == Op.ADD_MUTABLE:
        assert event.key is not None and event.value is not None
        assert event.timestamp is not None
        return MutableKeyUpdate(event.key, event.value, event.timestamp)
    if event.op == Op.SET_IMMUTABLE:
        assert event.key is not None and event.value is not None
        return ImmutableKeyUpdate(event.key, event.value)
    if event.op == Op.SET_INDEXED:
        assert event.key is not None and event.value is not None and event.sub_key is not None
        return IndexedKeyUpdate(event.key, event.sub_key, event.value)
    return KeyUpdateBase()


def replay(
    path: PathType, until_seq: int | None = None, until_time: float | None = None
) -> TelescopeState:
    """The state of a store as of an event, rebuilt from its log into memory.

    Parameters
    ----------
    path
        Directory of the store (opened read-only).
    until_seq
        Apply events up to and including this sequence number.
    until_time
        Apply events appended at or before this wall-clock time (seconds
        since the epoch). With both limits, the earlier one applies.

    Returns
    -------
    A :class:`~telstate.TelescopeState` on a :class:`~telstate.memory.MemoryBackend`.

    Raises
    ------
    StoreError
        If there is no store at `path` or its log is damaged.
    """
    from .memory import MemoryBackend
    from .telescope_state import TelescopeState

    backend = LmdbBackend(path, readonly=True)
    try:
        model = backend._read(_replay_model, until_seq, until_time)
    finally:
        backend.close()
    memory = MemoryBackend()
    memory.load_records(model.records())
    return TelescopeState(memory)
