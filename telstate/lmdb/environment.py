"""The LMDB environment of a store, shared by every backend on its path in a process.

This module owns opening (and creating) a store, the registry of this
process's transactions (so that nothing remaps under a live one), LMDB's
lock word (the last committed transaction id), fork handling, the
housekeeping thread, and the wake-ups of waiters on commits by any process.

Durability
----------
A process crash (including SIGKILL) loses nothing in any mode: a write
returns after its transaction committed, its pages written to the file
(``pwrite``; the kernel keeps them across a crash of the process). What a
*power failure or kernel crash* loses depends on `durability`:

``'fsync'``
    Nothing that returned: each commit is flushed to disk (LMDB's
    two-phase sync: data pages, then the meta page) before the write
    returns. The store is never damaged.
``'batch'`` (default)
    The commits since the last flush, which a background thread performs
    every `flush_interval` seconds (default 1 s) while there are new
    commits, like Redis ``appendfsync everysec``; what was flushed stays.
    Between flushes LMDB runs without sync (``MDB_NOSYNC``) and, in every
    mode, without ``MDB_WRITEMAP``: LMDB then keeps the store consistent
    across a power cut *if the disk and filesystem keep the order of
    writes* (ZFS does; ext4 and XFS in their default modes do not promise
    it). Where they do not, a power cut less than `flush_interval` after a
    commit can leave the store damaged (the newest meta page on disk,
    pages it points to not), which :meth:`~LmdbBackend.verify` and
    ``telstate verify`` report; use ``'fsync'`` where that matters.
``'none'``
    Everything since the last :meth:`~LmdbBackend.flush` or close, bounded
    only by the kernel's dirty-page writeback (typically about 30 s), with
    the same condition on write order as ``'batch'``.

The map and the disk
--------------------
Every process maps the store with ``settings.MAP_SIZE`` (1 TiB) from the
start. Without ``MDB_WRITEMAP`` LMDB maps the file read-only and writes
pages with ``pwrite``, so the map costs address space only: the file
holds the data (it never grows to the map size), a full disk is an LMDB
error on commit (a :exc:`StoreError`, the store unchanged), not a SIGBUS,
and the map is never resized under a reader. A store made with a smaller
map (older telstate, or a smaller `map_size`) opens with the larger one.
If another process maps a store with a *larger* map and its data grow
past this process's map, this process follows (``mdb_env_set_mapsize``)
only once none of its transactions is live (see :class:`_Transactions`).
32-bit platforms are not supported (a 1 TiB map does not fit).
LMDB's lock file and the ``notify`` file are written through memory maps:
their blocks are allocated (``posix_fallocate``) before they are mapped,
so creating a store on a full disk is an error too.

Processes, threads and fork
---------------------------
Any number of processes may read and write one store at once; LMDB
serialises the writers, so sequence numbers are dense and every check
(e.g. an immutable already set) happens inside the write transaction.
Several processes may create one store at once: the first write
transaction on the empty environment makes the tables and the identity,
the others find them. Each process opens the environment once per path:
every :class:`LmdbBackend` on that path (views and TelescopeStates
included) shares it, and it is opened with the strongest durability any
of them asked for. Reads in several threads of a process run in
parallel (each its own LMDB read transaction); writes of a process take
turns. ``os.fork`` waits for a write or flush in flight, never for
reads. The child reopens the store on first use, unless another thread
was reading it (a snapshot included) at the moment of the fork: then the
child cannot use the store, as py-lmdb can neither close the inherited
environment safely nor open a second one on the same files (see
:meth:`Store.after_fork_child`).

A process killed during a read leaves its LMDB reader slot taken. Such
stale slots are cleared at open, every 10 s by a housekeeping thread of
each process that has the store open (readers included), every 32 writes
of a process, and by a read that finds no free slot; LMDB frees them all
when a process opens the store while no other has it open. A process
that cannot open the store because every slot is taken (py-lmdb begins a
read inside ``lmdb.open``, and clearing needs an open environment) tries
again for 15 s, long enough for any process using the store to clear
them, then raises :exc:`StoreError` (see :meth:`Store._open_lmdb`).

Results of ``get`` and ``get_indexed`` are cached per process while no
transaction has committed since they were read (LMDB's last transaction
id, read from its lock file, tells), so repeated reads between writes are
dictionary lookups and every read still sees the latest commit. The cache
holds at most ``settings.CACHE_MAX_BYTES`` of results (see :class:`ReadCache`).

A process forked inside a ``backend.write()`` block does not own that
block's transaction: leaving the block in the child raises
:exc:`StoreError` and commits nothing there (the parent's block goes on).

A process waiting for a commit (``wait_key``, :meth:`~LmdbBackend.monitor_keys`,
:meth:`~LmdbBackend.wait_for_commit`) is woken by a filesystem event: while
a waiter has announced itself in the store's ``notify`` file (a heartbeat
it renews), each commit writes a byte to that file, which one thread per
process watches (inotify on Linux, watchdog elsewhere; see
:mod:`telstate.lmdb.watch`); unless the only waiting process is the
committer's own, whose waiters it wakes directly (each waiting process
also announces itself in a slot of its own, see :class:`_NotifyFile`).
The truth is LMDB's last transaction id, polled every
``settings.POLL_INTERVAL`` as a fallback.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import logging
import mmap
import os
import struct
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import lmdb

from .. import log
from ..backend import GetResult
from ..errors import StoreError
from ..log import Writer
from ..utils import PathType, display_str
from . import settings, watch
from .layout import KEY_ID, Tables

if TYPE_CHECKING:
    from .backend import Snapshot

logger = logging.getLogger(__name__)

#: Durability modes, see the module docstring.
DURABILITIES = ("fsync", "batch", "none")
_NOTIFY_FILE = watch.NOTIFY_FILE
# The notify file's layout in 8-byte words, see _NotifyFile.
_NOTIFY_LEGACY_SIZE = 16
_NOTIFY_CHANGES = 2
_NOTIFY_SLOT0 = 8
_NOTIFY_SLOTS = 16
_NOTIFY_SIZE = 8 * (_NOTIFY_SLOT0 + 2 * _NOTIFY_SLOTS)
# Where LMDB's lock file keeps the last committed transaction id (see _LockWord).
_LOCK_MAGIC = 0xBEEFC0DE
_LOCK_TXNID_INDEX = 6


def _lock_file_size() -> int:
    """The size of LMDB's lock file (64-bit Linux): two cache lines of header, one per reader."""
    return 64 * (settings.MAX_READERS + 2)


def abort(txn: lmdb.Transaction) -> None:
    try:
        txn.abort()
    except lmdb.Error:
        pass


class _Transactions:
    """This process's live transactions on one environment, and the gate that remaps wait at.

    LMDB allows changing the map (``mdb_env_set_mapsize``, closing or
    reopening the environment) only while the process has no transaction
    in flight, and py-lmdb releases the GIL inside every cursor call, so a
    remap under another thread's live transaction (a snapshot being
    iterated) makes it read unmapped memory. Transactions register here
    while they live; :meth:`exclusive` waits until none does and holds new
    ones back while it runs. Readers never wait for each other, only for a
    remap, which is rare (another process opened the store with a larger
    map; see the module docstring).

    A thread that itself holds a live transaction is never held back (it
    would wait for itself), and cannot remap: :meth:`exclusive` raises
    :exc:`StoreError` for it.
    """

    def __init__(self) -> None:
        # `cond` waits on `lock`; taking `lock` itself is a C call, where
        # ``with cond`` is two Python calls: the per-transaction paths use it.
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        # Each live transaction (a write's token until it begins) -> its thread.
        self.live: dict[Any, int] = {}
        self.pending = 0

    def _admit(self, ident: int) -> None:
        """Wait (holding `cond`) while a remap is pending, unless this thread is in one."""
        if self.pending and ident not in self.live.values():
            self.cond.wait_for(lambda: not self.pending)

    def begin_read(self, env: lmdb.Environment, buffers: bool) -> Any:
        """A registered read transaction, or None if another process grew the map past ours.

        Raises
        ------
        lmdb.ReadersFullError
            If every reader slot is taken even after clearing those of dead processes.
        """
        ident = threading.get_ident()
        with self.lock:
            if self.pending:
                self._admit(ident)
            try:
                try:
                    txn = env.begin(buffers=True) if buffers else env.begin()
                except lmdb.ReadersFullError:
                    env.reader_check()
                    txn = env.begin(buffers=True) if buffers else env.begin()
            except lmdb.MapResizedError:
                return None
            self.live[txn] = ident
        return txn

    def enter(self, ident: int, token: object) -> None:
        """Register a transaction about to begin in thread `ident` (a write), as `token`.

        The token is for :meth:`leave` (or to be replaced in `live` by the
        transaction once it began).
        """
        with self.lock:
            if self.pending:
                self._admit(ident)
            self.live[token] = ident

    def leave(self, *keys: Any) -> None:
        """Unregister ended transactions (or tokens), letting a waiting remap go ahead."""
        with self.lock:
            try:
                for key in keys:
                    self.live.pop(key, None)  # (absent if an interrupt came before it was added)
            finally:
                if self.pending:
                    self.cond.notify_all()

    def end_read(self, txn: Any) -> None:
        """End a read transaction from :meth:`begin_read` (under `lock`, see Store.before_fork)."""
        with self.lock:
            abort(txn)
            del self.live[txn]
            if self.pending:
                self.cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self, path: str) -> Iterator[None]:
        """Wait until no transaction of this process is live, for a remap, reopen or close.

        The caller holds `cond` (released while waiting), and keeps new
        transactions out until the block ends.

        Raises
        ------
        StoreError
            If this thread holds a live transaction (an open snapshot).
        """
        if threading.get_ident() in self.live.values():
            raise StoreError(
                f"the telstate store at {path!r} must be remapped or reopened (another "
                "process opened it with a larger map, or it is reopened for writing or "
                "closed), which cannot happen while this thread has a snapshot of it "
                "open: close the snapshot first"
            )
        self.pending += 1
        try:
            self.cond.wait_for(lambda: not self.live)
            yield
        finally:
            self.pending -= 1
            self.cond.notify_all()


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


class ReadCache:
    """Results of ``get`` and ``get_indexed`` read in one snapshot (transaction id `txnid`).

    Bounded by ``settings.CACHE_MAX_BYTES`` of values (roughly) and
    ``settings.CACHE_MAX_ENTRIES`` entries: when a put would pass either,
    the cache is emptied first. Threads may put concurrently: each put is
    a few dict operations under the GIL, and a lost update of `nbytes` only
    makes the bound approximate.
    """

    __slots__ = ("txnid", "gets", "indexed", "nbytes")

    def __init__(self, txnid: int) -> None:
        self.txnid = txnid
        self.gets: dict[bytes, GetResult] = {}
        self.indexed: dict[tuple[bytes, bytes], bytes | None] = {}
        self.nbytes = 0

    def _make_room(self, size: int) -> None:
        if (
            self.nbytes + size > settings.CACHE_MAX_BYTES
            or len(self.gets) + len(self.indexed) >= settings.CACHE_MAX_ENTRIES
        ):
            self.gets.clear()
            self.indexed.clear()
            self.nbytes = 0
        self.nbytes += size

    def put_get(self, key: bytes, result: GetResult, size: int) -> None:
        """Keep the result of get(key), of about `size` bytes."""
        self._make_room(size + len(key) + _ENTRY_OVERHEAD)
        self.gets[key] = result

    def put_indexed(self, key: bytes, sub_key: bytes, value: bytes | None) -> None:
        """Keep the result of get_indexed(key, sub_key)."""
        size = len(key) + len(sub_key) + (len(value) if value is not None else 0)
        self._make_room(size + _ENTRY_OVERHEAD)
        self.indexed[key, sub_key] = value


# What a cache entry costs besides its bytes (dict slot, tuple, bytes headers), roughly.
_ENTRY_OVERHEAD = 200


class _NotifyFile:
    """A store's mapped notify file, and this process's waiter slot in it.

    ======  ========================================================
    word    content
    ======  ========================================================
    0       the heartbeat: a float64 time until which some process
            waits (older telstate reads and renews this word only)
    1       its first byte is the byte commits write (see
            :meth:`Store.committed`)
    2       an int64 that changes whenever a waiter claims or renews
            its slot (the slot written first)
    3..7    unused (zero)
    8..39   16 slots, one per waiting process: its token (int64,
            never 0) and its expiry (float64)
    ======  ========================================================

    Older telstate made (and maps) the first 16 bytes only. A writable
    process extends such a file; a process that can only map 16 bytes of
    it (`ints` None) announces itself in word 0 alone and writes the file
    on every commit while word 0 is live, as older telstate does.

    `slot` (the word index of this process's slot, once claimed),
    `said` (what this process last wrote to word 0), `changes` (how
    often it wrote word 2) and `finding` (:meth:`others_wait`'s last
    answer) belong to this process and this file: a new file starts
    without them, and so does a forked child (see :meth:`forget_slot`).

    Closed by :meth:`Store.close`, or else when the last reference goes:
    the watch thread replaces a store's notify file (see
    :meth:`Store.reopen_notify`) while other threads may still use the old
    one, which they hold in a local variable.
    """

    __slots__ = ("changes", "fd", "finding", "ints", "map", "said", "slot", "words")

    def __init__(self, fd: int, file_map: mmap.mmap) -> None:
        self.fd = fd
        self.map = file_map
        self.words = memoryview(file_map).cast("d")
        # The same words as int64, if the file has waiter slots.
        self.ints = memoryview(file_map).cast("q") if len(file_map) == _NOTIFY_SIZE else None
        self.slot: int | None = None
        self.said: float | None = None
        self.changes = 0
        # (word 0, word 2, valid until, whether others wait).
        self.finding: tuple[float, int, float, bool] | None = None

    def forget_slot(self) -> None:
        """Forget this process's slot and findings (in a forked child: it has a new token)."""
        self.slot = None
        self.said = None
        self.changes = 0
        self.finding = None

    def others_wait(self, token: int, now: float) -> bool:
        """Whether a process other than the one of `token` may wait (word 0 is live).

        No other process waits if word 0 holds what this process wrote
        there and no slot but this process's is live; a process without
        a slot (an older one) writes its own time to word 0. Found again
        only when word 0 or word 2 changes, or a live slot expires.
        """
        ints = self.ints
        if ints is None:
            return True
        words = self.words
        heard, changes = words[0], ints[_NOTIFY_CHANGES]
        finding = self.finding
        if finding is not None and finding[0] == heard and finding[1] == changes:
            if now < finding[2]:
                return finding[3]
        until, others = heard, heard != self.said
        if not others:
            for index in range(_NOTIFY_SLOT0, _NOTIFY_SLOT0 + 2 * _NOTIFY_SLOTS, 2):
                expiry = words[index + 1]
                if expiry > now:
                    until = min(until, expiry)
                    if ints[index] != token:
                        others = True
                        break
        self.finding = (heard, changes, until, others)
        return others

    def announce(self, token: int, now: float) -> None:
        """Announce that the process of `token` waits: in its slot, if it gets one, and word 0.

        Older waiters (and one that finds no free slot) renew word 0 once
        half its time is left, one with a slot only once a quarter is left:
        so an older waiter's time is in word 0 within half a heartbeat and
        stays there while it waits, and no committer takes it for its own.
        """
        words = self.words
        if self.ints is not None and self._announce_in_slot(token, now):
            if words[0] < now + settings.HEARTBEAT / 4:
                self.said = now + settings.HEARTBEAT
                words[0] = self.said
        elif words[0] < now + settings.HEARTBEAT / 2:
            words[0] = now + settings.HEARTBEAT

    def _announce_in_slot(self, token: int, now: float) -> bool:
        """Claim a slot for `token`, or renew it at half its time; False if none is free."""
        words, ints = self.words, self.ints
        assert ints is not None
        slot = self.slot
        if slot is not None and ints[slot] == token:
            if words[slot + 1] >= now + settings.HEARTBEAT / 2:
                return True
        else:
            slot = self._free_slot(token, now)
            if slot is None:
                return False
            ints[slot] = token
            self.slot = slot
        words[slot + 1] = now + settings.HEARTBEAT
        # After the slot: a committer that sees the change sees the slot.
        self.changes += 1
        ints[_NOTIFY_CHANGES] = token ^ self.changes
        return True

    def _free_slot(self, token: int, now: float) -> int | None:
        """The word index of a slot `token` may take (its own, or an expired one)."""
        words, ints = self.words, self.ints
        assert ints is not None
        free = None
        first = token % _NOTIFY_SLOTS  # processes start apart
        for n in range(_NOTIFY_SLOTS):
            index = _NOTIFY_SLOT0 + 2 * ((first + n) % _NOTIFY_SLOTS)
            if ints[index] == token:
                return index
            if free is None and words[index + 1] < now:
                free = index
        return free

    def close(self, _close: Any = os.close) -> None:  # os.close held for interpreter exit
        if self.fd >= 0:
            self.words.release()
            if self.ints is not None:
                self.ints.release()
            self.map.close()
            _close(self.fd)
            self.fd = -1

    __del__ = close


class Store:
    """The one LMDB environment of a store in this process, shared by its backends.

    Every transaction registers in `txns` (see :class:`_Transactions`);
    reads take no other lock, so they run in parallel. A write enters
    `txns` first, then takes `write_lock` (one write transaction at a time
    in this process; never the other way round, so a write never holds
    `write_lock` while waiting for a remap); it leaves `txns` before
    releasing `write_lock` (only a brief wait for ``txns.lock``, never for
    a remap, happens under `write_lock`). Remapping, reopening and
    closing the environment happen inside ``txns.exclusive()``, with
    `sync_lock` (held by the housekeeper while it syncs) taken inside it.
    The fork hooks take `write_lock`, ``txns.cond`` and `sync_lock`, in
    that order, none of which a read holds.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.env: lmdb.Environment | None = None
        self.tables: Tables
        self.writable = False
        self.sync = False
        self.map_size = settings.MAP_SIZE
        self.users = 0
        self.writes = 0
        self.batch_intervals: list[float] = []
        self.txns = _Transactions()
        self.write_lock = threading.RLock()
        self.sync_lock = threading.Lock()
        self.snapshots: weakref.WeakSet[Snapshot] = weakref.WeakSet()
        self.broken: str | None = None
        self.uuid = uuid.UUID(int=0)
        self.notify: _NotifyFile | None = None
        self.lock_word: _LockWord | None = None
        self.lock_words: memoryview | None = None
        self.writer_ids: dict[str | None, int] = {}
        # Writer ids of other processes this one writes for (remote writes).
        self.remote_writer_ids: dict[Writer, int] = {}
        self.writers: dict[int, Writer] = {}
        # Results of get/get_indexed for one snapshot (see backend.LmdbBackend.get).
        self.read_cache = ReadCache(-1)
        self._reset_process_state()

    def _reset_process_state(self) -> None:
        """Forget what belongs to this process only (called at creation and after fork)."""
        self.commit_condition = threading.Condition(threading.Lock())
        # Taken to replace or close `notify`; new after a fork, which may
        # have happened while the parent's watch thread held it.
        self.notify_lock = threading.Lock()
        # Marks this process's waiter slot in the notify file (nonzero).
        self.notify_token = int.from_bytes(os.urandom(8), "little", signed=True) | 1
        notify = self.notify
        if notify is not None:
            notify.forget_slot()
        self.commit_generation = 0
        self.waiters = 0
        # None: not watched yet; False: cannot be (waiters poll); else the
        # watch's own token (see watch.py).
        self.watch: Any = None
        self.housekeeper: threading.Thread | None = None
        self.housekeeper_stop = threading.Event()
        self.writer_ids = {}
        self.remote_writer_ids = {}
        # (transaction id, seq, time, chain) of this process's last commit with events:
        # while nobody else commits, the next event follows it (see writes.WriteTxn._last_event).
        self.last_commit: tuple[int, int, float, bytes] = (-1, 0, 0.0, b"")
        # Transaction id of this process's last commit if the store was a primary
        # after it (see writes.WriteTxn._check_role); -1 if unknown.
        self.primary_txnid = -1
        self.read_cache = ReadCache(-1)

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
        with self.txns.cond:
            if self.broken:
                raise StoreError(self.broken)
            self.map_size = max(self.map_size, map_size) if self.env is not None else map_size
            reopen = (
                self.env is None or (writable and not self.writable) or (sync and not self.sync)
            )
            if reopen:
                with self.txns.exclusive(self.path), self.sync_lock:
                    self._close_env()
                    self._open_env(writable or self.writable, sync or self.sync)
            self.users += 1
            # A housekeeper already running (for readers, or a longer flush
            # interval) sleeps out its old interval: a new one starts with the new.
            restart = reopen
            if batch_interval is not None:
                restart |= batch_interval < min(self.batch_intervals, default=float("inf"))
                self.batch_intervals.append(batch_interval)
        if restart:
            self.stop_housekeeper()
        self.start_housekeeper()

    def detach(self, batch_interval: float | None) -> bool:
        """Unregister a backend; close everything after the last one. True if closed."""
        with self.txns.cond:
            if batch_interval is not None and batch_interval in self.batch_intervals:
                self.batch_intervals.remove(batch_interval)
            self.users -= 1
            if self.users > 0:
                return False
        self.close()
        return True

    def close(self) -> None:
        """Stop the helpers, flush and close the environment.

        Waits for the transactions of other threads to end; snapshots this
        thread holds are closed.
        """
        self.stop_housekeeper()
        self.unwatch()
        mine = threading.get_ident()
        for snap in list(self.snapshots):
            if snap._thread == mine:
                snap.close()
        with self.txns.cond, self.txns.exclusive(self.path), self.sync_lock:
            if self.env is not None and self.writable and not self.sync:
                try:
                    self.env.sync(True)
                except lmdb.Error as error:
                    logger.warning("final flush of %s failed: %s", self.path, error)
            self._close_env()
            with self.notify_lock:
                if self.notify is not None:
                    self.notify.close()
                    self.notify = None

    def _close_env(self) -> None:
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
        if not os.path.exists(data_file):
            if not writable:
                raise StoreError(f"no telstate store at {path!r}: it has no data.mdb")
            if os.path.exists(path) and not os.path.isdir(path):
                raise StoreError(f"cannot create a telstate store at {path!r}: it is a file")
            os.makedirs(path, exist_ok=True)
            # Another process may be creating the store right now: its files are
            # no strangers (LMDB serialises the creation, _open_tables the rest).
            strangers = set(os.listdir(path)) - {"data.mdb", "lock.mdb", _NOTIFY_FILE}
            if strangers:
                raise StoreError(
                    f"{path!r} is not a telstate store and not empty "
                    f"(it holds {sorted(strangers)[:3]}): choose an empty or new directory"
                )
        if writable:
            # LMDB writes its lock file through a memory map: its blocks must
            # exist before, or a full disk is a SIGBUS instead of an error.
            self._allocate(os.path.join(path, "lock.mdb"), _lock_file_size())
        options = _env_options(self.map_size, writable, sync)
        try:
            env = self._open_lmdb(options)
        except lmdb.Error as error:
            raise StoreError(f"cannot open the telstate store at {path!r}: {error}") from error
        try:
            env.reader_check()
            self.tables, self.uuid = self._open_tables(env, writable)
            if self.notify is None or (writable and self.notify.ints is None):
                # (An older file, mapped while this process could not extend it, gets its slots.)
                notify = self._open_notify(writable)
                if notify is not None:
                    with self.notify_lock:
                        self.notify = notify
        except lmdb.Error as error:
            env.close()
            raise StoreError(f"cannot open the telstate store at {path!r}: {error}") from error
        except BaseException:
            env.close()
            raise
        self.env = env
        self.writable = writable
        self.sync = sync
        self.lock_word = _LockWord(path, env)
        self.lock_words = self.lock_word.words

    def _open_lmdb(self, options: dict[str, Any]) -> lmdb.Environment:
        """``lmdb.open`` the store, trying again while every reader slot is taken.

        py-lmdb begins a read transaction inside ``lmdb.open`` (writable
        or not), which fails if every slot of the reader table is taken.
        Slots that processes killed during a read left stay taken until a
        process that has the store open clears them (each does every
        ``settings.READER_CHECK_INTERVAL``, see :meth:`_housekeeping`), or
        until every process using the store has exited (LMDB resets the
        table when a process opens the store alone). This process cannot
        clear them itself: that needs an open environment, and a helper
        process would fail to open just the same. So the open is tried
        again for ``settings.READERS_FULL_WAIT``, longer than that interval.

        Raises
        ------
        StoreError
            If every reader slot stays taken that long.
        lmdb.Error
            If the open fails otherwise.
        """
        path = self.path
        deadline = time.monotonic() + settings.READERS_FULL_WAIT
        pause = 0.01
        while True:
            try:
                return lmdb.open(path, **options)
            except lmdb.ReadersFullError as error:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StoreError(
                        f"cannot open the telstate store at {path!r}: every reader slot in "
                        f"its lock file stayed taken for {settings.READERS_FULL_WAIT:g} s, most "
                        "likely by processes killed while reading the store. A process of this "
                        "telstate that has the store open clears those within "
                        f"{settings.READER_CHECK_INTERVAL:g} s, and LMDB frees every slot once "
                        "no process has the store open: so the processes that have it open do "
                        "not clear them (an older telstate, another LMDB program, a stopped "
                        "process); end them and open the store again. Less likely, that many "
                        "read transactions are really open at once"
                    ) from error
                time.sleep(min(pause, left))
                pause = min(2 * pause, 0.5)
            except lmdb.Error as error:
                # A read-only copy without write access to its directory: no lock
                # file can exist, so open without locking (nobody can write to it).
                if not options["readonly"] or "ermission denied" not in str(error):
                    raise
                return lmdb.open(path, lock=False, **options)

    def _open_notify(self, writable: bool) -> _NotifyFile | None:
        """Open and map the notify file (made or extended if `writable`); None if impossible.

        An older telstate's file (16 bytes) that this process cannot
        extend is mapped as it is (see :class:`_NotifyFile`).
        """
        try:
            fd = os.open(
                os.path.join(self.path, _NOTIFY_FILE),
                os.O_RDWR | (os.O_CREAT if writable else 0),
                0o644,
            )
        except OSError:
            return None  # a read-only copy, or no writer made it yet: waiters poll
        try:
            if writable:
                # Written through the map below: allocated first, as lock.mdb.
                self._allocate(fd, _NOTIFY_SIZE)
            size = os.fstat(fd).st_size
            if size < _NOTIFY_LEGACY_SIZE:
                os.close(fd)
                return None
            size = _NOTIFY_SIZE if size >= _NOTIFY_SIZE else _NOTIFY_LEGACY_SIZE
            return _NotifyFile(fd, mmap.mmap(fd, size))
        except OSError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise

    def reopen_notify(self) -> None:
        """Map the notify file anew after it appeared or was replaced (from the watch thread).

        A store opened read-only before any writer made the file, or whose
        file was deleted and made again, would otherwise announce its waits
        where no committer looks.
        """
        with self.notify_lock:
            if not self.watch:
                return  # closed (or unwatched) meanwhile
            # None while the process making the file has not sized it yet:
            # the watch calls again on the file's next event. The old file
            # (deleted or replaced) closes once no thread uses it (see _NotifyFile).
            self.notify = self._open_notify(writable=False)

    def _open_tables(self, env: lmdb.Environment, writable: bool) -> tuple[Tables, uuid.UUID]:
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
                _initialise(txn, tables, identity)
                return tables, identity
            version = txn.get(b"format", db=tables.meta)
            identity_bytes = txn.get(b"uuid", db=tables.meta)
            if version is None or identity_bytes is None:
                raise StoreError(f"{self.path!r} is not a telstate store: it has no identity")
            if version == b"1":
                raise StoreError(
                    f"{self.path!r} has log format 1 (events without chain hashes); "
                    f"this telstate reads formats {log.BASE_FORMAT} and {log.FORMAT_VERSION}: run "
                    f"`telstate upgrade {self.path}` (with no process using the store)"
                )
            if version not in {b"%d" % known for known in log.FORMATS}:
                raise StoreError(
                    f"{self.path!r} has log format "
                    f"{version.decode() if version.isdigit() else display_str(version)}, "
                    f"this telstate reads formats {log.BASE_FORMAT} and {log.FORMAT_VERSION}: "
                    "upgrade telstate"
                )
            if len(identity_bytes) != 16:
                raise StoreError(
                    f"{self.path!r} has a damaged identity (meta uuid {identity_bytes!r})"
                )
            return tables, uuid.UUID(bytes=identity_bytes)

    def _find_tables(self, env: lmdb.Environment, txn: Any, create: bool = False) -> Tables:
        try:
            return Tables(env, txn, create)
        except lmdb.NotFoundError:
            raise StoreError(
                f"{self.path!r} is an LMDB environment but not a telstate store"
            ) from None

    def cache_for(self, txnid: int) -> ReadCache | None:
        """The read cache for results seen in snapshot `txnid`, or None if that is stale.

        Entries are used only while no commit has happened since (see
        LmdbBackend.get), so the tag only moves forward: a result from an
        older snapshot, read by a slower thread, is not cached. A new
        snapshot gets a new cache object, swapped in by one assignment, so
        a thread still holding the old one fills only that (its tag says
        which snapshot its entries come from).
        """
        cache = self.read_cache
        if txnid == cache.txnid:
            return cache
        if txnid < cache.txnid:
            return None
        cache = ReadCache(txnid)
        self.read_cache = cache
        return cache

    def last_txnid(self) -> int:
        """The id of the last committed transaction, by any process (-2 if unknown).

        A memory load when the lock word is mapped; otherwise env.info().
        """
        words = self.lock_words
        if words is not None:
            return words[_LOCK_TXNID_INDEX]
        env = self.env
        return env.info()["last_txnid"] if env is not None else -2

    # --- transactions, remaps, reopening after fork ------------------------------------

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
        with self.txns.cond:
            if self.broken:
                raise StoreError(self.broken)
            if self.env is None:
                if self.users == 0:
                    raise StoreError(f"the telstate store at {self.path!r} is closed")
                with self.txns.exclusive(self.path), self.sync_lock:
                    self._open_env(self.writable, self.sync)
        self.start_housekeeper()
        assert self.env is not None
        return self.env

    def begin_read(self, buffers: bool = False) -> Any:
        """A read transaction, registered in `txns`; end it with ``txns.end_read``.

        Raises
        ------
        StoreError
            If the store is closed, must be remapped while this thread
            holds a snapshot, or every reader slot is taken even after
            clearing those of dead processes.
        """
        while True:
            env = self.env or self.ensure_open()
            try:
                txn = self.txns.begin_read(env, buffers)
            except lmdb.ReadersFullError as error:
                raise StoreError(
                    f"cannot read the telstate store at {self.path!r}: every reader slot "
                    "of its lock file is held by a live process (those of dead processes "
                    "were just cleared), so more read transactions are open at once than "
                    "it has slots; close snapshots, or read from fewer threads or processes"
                ) from error
            if txn is not None:
                if env is self.env:
                    return txn
                self.txns.end_read(txn)  # reopened meanwhile
                continue
            self.adopt_map_size()

    def begin_write(self, owner: Any) -> Any:
        """A write transaction; the caller holds `write_lock` until :meth:`end_write`.

        The transaction is also set as ``owner.begun`` before it is returned,
        so that the caller can end it after an exception that comes as the
        call returns (KeyboardInterrupt), before it could keep the result.

        Raises
        ------
        StoreError
            If the store is closed, or must be remapped while this thread
            holds a snapshot.
        """
        ident = threading.get_ident()
        while True:
            env = self.env or self.ensure_open()
            txns = self.txns
            # Made here, not by enter: an exception (KeyboardInterrupt) as enter
            # returns must find it (see _unwind_write; so must one as the lock
            # is taken or the transaction begins).
            token = object()
            txn = None
            begun = False
            try:
                txns.enter(ident, token)
                self.write_lock.acquire()
                if env is self.env:
                    # begin(db, parent, write) by position: py-lmdb parses keywords slowly.
                    txn = env.begin(None, None, True)
                    live = txns.live
                    live[txn] = ident
                    del live[token]
                    owner.begun = txn
                    begun = True
                    return txn
            except lmdb.MapResizedError:
                pass  # (another process grew the map: undone below, then tried again)
            finally:
                if not begun:
                    # Undone whatever happened, from a finally (an exception may
                    # come as any function starts, _unwind_write too), and twice
                    # over: each of its steps may be done again. (An exception
                    # after owner.begun was set leaves the caller's _release
                    # nothing more to undo.)
                    try:
                        self._unwind_write(token, txn)
                    finally:
                        self._unwind_write(token, txn)
            if env is self.env:
                self.adopt_map_size()

    def _unwind_write(self, token: object, txn: Any) -> None:
        """Undo what of :meth:`begin_write` was done: `txn` (if begun), `token`, the lock."""
        try:
            if txn is not None:
                abort(txn)
        finally:
            self._leave_write(token, txn)

    def _leave_write(self, *keys: Any) -> None:
        """Unregister a write (its token, its transaction), then release the write lock.

        Each step may be done again (see WriteTxn._release): an exception
        between two lines (KeyboardInterrupt) must not leave the write lock
        held, nor release it twice. Unregistered before the write lock
        goes: a fork (which takes the write lock first) never finds an
        ended write still registered, which would leave the child unable to
        use the store.
        """
        try:
            self.txns.leave(*keys)
        finally:
            # Held by this thread only for this write (writes do not nest).
            if self.write_lock._is_owned():  # type: ignore[attr-defined]
                self.write_lock.release()

    def end_write(self, txn: Any) -> None:
        """Release a write transaction from :meth:`begin_write`, after its commit or abort.

        Every ``settings.READER_CHECK_WRITES`` writes, clears the reader
        slots of dead processes: a process killed during a read leaves a
        slot that pins the pages it saw, and the file would grow until the
        housekeeper's next check.
        """
        self.writes += 1
        if self.writes % settings.READER_CHECK_WRITES == 0:
            assert self.env is not None
            try:
                self.env.reader_check()
            except lmdb.Error as error:
                logger.warning("clearing stale readers of %s failed: %s", self.path, error)
        self._leave_write(txn)

    def adopt_map_size(self) -> None:
        """Follow another process that opened the store with a larger map than this one.

        Every telstate process maps ``settings.MAP_SIZE`` (1 TiB) up front,
        so this happens only when another process asked for a larger
        `map_size`, once its data lie beyond this process's map.
        """
        with self.txns.cond, self.txns.exclusive(self.path):
            if self.env is not None:
                self.env.set_mapsize(0)
                self.map_size = self.env.info()["map_size"]

    def _allocate(self, file: str | int, size: int) -> None:
        """Allocate the first `size` bytes of `file` (a path or descriptor) on disk.

        Raises
        ------
        StoreError
            If the disk is full.
        """
        fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644) if isinstance(file, str) else file
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise StoreError(
                    f"no room for the telstate store at {self.path!r}: {error.strerror}; "
                    "free disk space"
                ) from error
            if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
            # No fallocate on this filesystem: at least give the file its size.
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
        finally:
            if isinstance(file, str):
                os.close(fd)

    # --- commits: notification and flushing --------------------------------------------

    def committed(self) -> None:
        """Tell waiters in this and other processes that a commit happened.

        Other processes are told through a write to the notify file, which
        their filesystem watch sees; it is skipped while no process has
        announced that it is waiting, or only this one (see
        :meth:`heartbeat`): its waiters are woken directly, and its own
        watch would only wake them again.
        """
        notify = self.notify
        if notify is not None:
            now = time.time()
            if notify.words[0] > now and notify.others_wait(self.notify_token, now):
                os.pwrite(notify.fd, b"\x00", 8)
        if self.waiters:
            self.wake()

    def heartbeat(self) -> None:
        """Announce, in the notify file, that a process is waiting for commits.

        The announcement lasts a few seconds; waiters renew it on every
        wake-up. A waiter that cannot write the file (a read-only copy)
        relies on polling.

        Word 0 says that some process waits: committers of older telstate
        read only it. A process also announces itself in a slot of its own,
        so that a committer that finds no live slot but its own, and its
        own time in word 0, knows that no other process waits (see
        :meth:`_NotifyFile.announce`).
        """
        notify = self.notify
        if notify is not None:
            notify.announce(self.notify_token, time.time())

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
            watch.watch(self)

    def remove_waiter(self) -> None:
        with self.commit_condition:
            self.waiters -= 1

    def unwatch(self) -> None:
        if self.watch is not None:
            watch.unwatch(self)

    def start_housekeeper(self) -> None:
        """Start the thread that flushes (batch mode) and clears stale reader slots.

        Every process runs one, readers too: were the store held open by
        readers alone, the slots of killed readers would stay taken, until
        new processes could not open it at all (see :meth:`_open_lmdb`).
        """
        with self.sync_lock:
            if self.housekeeper is not None or self.env is None:
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
            if stop.wait(min(self.batch_intervals) if batch else settings.READER_CHECK_INTERVAL):
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
                        next_reader_check = time.monotonic() + settings.READER_CHECK_INTERVAL
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
        # Writes, syncs and the start of a read are short; reads (however
        # long) are not waited for (see after_fork_child).
        self.write_lock.acquire()
        self.txns.cond.acquire()
        self.sync_lock.acquire()

    def after_fork_parent(self) -> None:
        self.sync_lock.release()
        self.txns.cond.release()
        self.write_lock.release()

    def after_fork_child(self) -> None:
        # Reads of other threads, and snapshots, may have been live at the
        # fork (it does not wait for them). The child must then never close
        # the inherited environment: py-lmdb would wait forever for their
        # calls to return, or end them, clearing their reader slots, which
        # are the parent's (LMDB's lock table is a shared map), so that the
        # parent's readers would stop pinning the pages they read. It is kept
        # (one reference never dropped, not even at exit), and as py-lmdb
        # opens a store's files once per process, the child cannot reopen
        # the store. Without live reads (the fork waited for writes and
        # syncs) the environment is closed and reopened on first use.
        live = any(isinstance(txn, lmdb.Transaction) for txn in self.txns.live)
        for snap in list(self.snapshots):
            snap._forked()
        if self.env is not None:
            if live:
                ctypes.pythonapi.Py_IncRef(ctypes.py_object(self.env))
                self.broken = (
                    f"the telstate store at {self.path!r} had a transaction in progress (a "
                    "read by another thread, a snapshot, or a write block) when this process "
                    "was forked, so it cannot be reopened here: open it after forking, or "
                    "fork while no transaction is in progress"
                )
            else:
                self.env.close()
            self.env = None
        if self.lock_word is not None:
            self.lock_word.close()  # the child holds no locks to lose
        self.lock_word = None
        self.lock_words = None
        self._reset_process_state()
        self.snapshots = weakref.WeakSet()
        self.txns = _Transactions()
        self.sync_lock = threading.Lock()
        self.write_lock = threading.RLock()


def _env_options(map_size: int, writable: bool, sync: bool) -> dict[str, Any]:
    """The options of ``lmdb.open`` for a store."""
    return dict(
        map_size=map_size,
        subdir=True,
        readonly=not writable,
        sync=sync,
        writemap=False,
        max_readers=settings.MAX_READERS,
        max_dbs=len(Tables.NAMES),
        max_spare_txns=0,
        create=writable,
    )


def _initialise(txn: Any, tables: Tables, identity: uuid.UUID) -> None:
    """Write the meta entries of a new store with identity `identity`."""
    txn.put(b"format", b"%d" % log.BASE_FORMAT, db=tables.meta)
    txn.put(b"uuid", identity.bytes, db=tables.meta)
    txn.put(b"next_key_id", KEY_ID.pack(1), db=tables.meta)


#: The files of a store's directory: LMDB's two, and the notify file.
_STORE_FILES = frozenset({"data.mdb", "lock.mdb", _NOTIFY_FILE})


def creation_refused(path: PathType) -> str | None:
    """Why no store could be made at `path`, which holds none yet; None if nothing says so.

    Looks at the nearest directory that exists (`path` itself, or the
    parent the store's directories would be made in): it must be a
    directory this process may write in (a read-only file system counts
    as not writable). Cheap, so that a long job (checking a large file)
    learns before it starts what creating the store would only find out
    after; creating it can still fail otherwise (a full disk).
    """
    # Resolved as creating it resolves it (create_store, attach_store): a
    # symlink followed, then '..' (abspath would take '..' lexically), and a
    # dangling symlink to its target, which os.makedirs then makes.
    path = os.path.realpath(os.fsdecode(path))
    nearest = path
    while not os.path.lexists(nearest):
        nearest = os.path.dirname(nearest)
    if not os.path.isdir(nearest):
        return f"{nearest!r} is not a directory"
    effective = os.access in os.supports_effective_ids
    if not os.access(nearest, os.W_OK | os.X_OK, effective_ids=effective):
        return (
            f"no permission to make files in {nearest!r} (to write in it and search it),"
            " or its file system is read-only"
        )
    return None


def holds_no_store(path: PathType) -> bool:
    """Whether there is nothing at `path` that a new store there would replace.

    True if `path` does not exist, is an empty directory (a mount point,
    say), or a directory that holds only an LMDB environment with nothing
    in it (no table, no entry): what a process killed while it created a
    store, before its first commit, leaves. False for anything else, a
    directory with any other file in it included.
    """
    path = os.fsdecode(path)
    try:
        if not os.path.lexists(path):
            return True
        if not os.path.isdir(path):
            return False
        names = set(os.listdir(path))
        if names - _STORE_FILES:
            return False
        data_file = os.path.join(path, "data.mdb")
        if "data.mdb" not in names or os.path.getsize(data_file) == 0:
            return True
    except OSError:
        return False
    try:
        # Without the lock file: this process may have the environment open (a
        # second lock-file descriptor, closed, would release that one's locks).
        env = lmdb.open(path, subdir=True, readonly=True, lock=False, max_dbs=0)
    except lmdb.Error:
        return False
    try:
        return bool(env.stat()["entries"] == 0)
    finally:
        env.close()


def create_store(path: PathType, identity: uuid.UUID, meta: dict[bytes, bytes]) -> None:
    """Create an empty store at `path` with the given identity and extra meta entries.

    For a follower (:func:`telstate.lmdb.follower.create_follower`), whose
    identity is its primary's. `path` may exist if :func:`holds_no_store`
    (an empty directory, or what a creation killed before its commit
    left). The store is flushed and closed; open it with
    :class:`~telstate.lmdb.LmdbBackend`.

    Raises
    ------
    StoreError
        If `path` is a file, a directory that holds anything else, or
        already holds a store (a process creating one at the same moment
        included).
    """
    path = os.path.realpath(os.fsdecode(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise StoreError(f"cannot create a telstate store at {path!r}: it is a file")
    os.makedirs(path, exist_ok=True)
    if not holds_no_store(path):
        raise StoreError(
            f"cannot create a telstate store at {path!r}: the directory is not empty "
            f"(it holds {sorted(os.listdir(path))[:3]}); choose a new directory"
        )
    try:
        env = lmdb.open(path, **_env_options(settings.MAP_SIZE, writable=True, sync=True))
    except lmdb.Error as error:
        raise StoreError(f"cannot create a telstate store at {path!r}: {error}") from error
    try:
        with env.begin(write=True) as txn:
            if txn.stat()["entries"] != 0:
                raise StoreError(
                    f"cannot create a telstate store at {path!r}: another process created one"
                )
            tables = Tables(env, txn, create=True)
            _initialise(txn, tables, identity)
            for name, value in meta.items():
                txn.put(name, value, db=tables.meta)
    except lmdb.Error as error:
        raise StoreError(f"cannot create a telstate store at {path!r}: {error}") from error
    finally:
        env.close()


# --- the process-wide registry of open stores -------------------------------------------

_STORES: dict[str, Store] = {}
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
    global _STORES_LOCK
    for store in _STORES.values():
        store.after_fork_child()
    _STORES_LOCK = threading.Lock()


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


def attach_store(
    path: PathType, writable: bool, sync: bool, batch_interval: float | None, map_size: int
) -> Store:
    path = os.path.realpath(os.fsdecode(path))
    with _STORES_LOCK:
        store = _STORES.get(path)
        if store is None:
            store = _STORES[path] = Store(path)
        try:
            store.attach(writable, sync, batch_interval, map_size)
        except BaseException:
            if store.users == 0:
                del _STORES[path]
            raise
    return store


def detach_store(store: Store, batch_interval: float | None) -> None:
    with _STORES_LOCK:
        if store.detach(batch_interval) and _STORES.get(store.path) is store:
            del _STORES[store.path]
