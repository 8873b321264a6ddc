"""Asynchronous LMDB backend: :class:`telstate.lmdb.LmdbBackend` for asyncio code.

Reads of one key (``get``, ``key_type``, ``get_indexed``) are lookups in
a memory map, each in its own LMDB read transaction, and run on the event
loop: they take no lock that another read or a write holds, so a long
``verify`` or ``get_range`` in another thread does not hold them up (only
the GIL is shared). The one wait they can meet is rare: following another
process's larger map, or reopening the store for writing, waits for this
process's transactions (snapshots included) to end (see
:mod:`telstate.lmdb.environment`). Everything that may wait (writes,
which queue for LMDB's writer lock and may fsync) or whose cost grows
with the data (``keys``, ``get_range``, ``dump``, loads) runs in the
backend's one writer thread.

Waiting: one watcher task per backend, with one thread, serves every
monitor. The thread sleeps until a commit by any process (see
:meth:`telstate.lmdb.LmdbBackend.wait_for_commit`), then reads the new
events on the watched keys from the log, once for all monitors, and the
task hands each to the monitors of its key. The watcher starts with the
first monitor and stops when the last one leaves.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from collections.abc import AsyncGenerator, Callable, Iterable
from typing import Any, BinaryIO, TypeVar

from ..backend import GetResult, KeyUpdateBase, Record
from ..errors import CancelledError
from ..lmdb import LmdbBackend as SyncLmdbBackend
from ..utils import KeyType, PathType
from .backend import Backend, Inbox, Watchers

_T = TypeVar("_T")

#: Longest sleep of the watcher thread, so that it notices promptly when
#: its watcher has stopped.
_WATCH_INTERVAL = 0.25


class LmdbBackend(Backend):
    """Telescope state in an LMDB store on local disk, for asyncio code.

    A thin layer over :class:`telstate.lmdb.LmdbBackend`, which it creates
    (or takes, see :meth:`from_sync`) and which may be used by synchronous
    code at the same time; waits here wake on commits by any process.

    Parameters
    ----------
    path
        Directory of the store; created on first open.
    **kwargs
        As for :class:`telstate.lmdb.LmdbBackend` (`durability`,
        `readonly`, `writer_name`, ...).

    Raises
    ------
    ValueError
        If an option is invalid.
    StoreError
        If the store is missing (read-only), damaged or of another format.
    """

    def __init__(self, path: PathType, **kwargs: Any) -> None:
        self._init(SyncLmdbBackend(path, **kwargs))

    def _init(self, sync: SyncLmdbBackend) -> None:
        self._sync = sync
        self._writer = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="telstate-lmdb-writer"
        )
        self._watchers = Watchers()
        self._watcher: asyncio.Task[None] | None = None
        # Log position up to which the watcher has delivered events.
        self._seq = 0
        self._close_task: asyncio.Task[None] | None = None

    @classmethod
    def from_sync(cls, sync: SyncLmdbBackend) -> LmdbBackend:
        """An asynchronous backend on the store that `sync` has open.

        Closing it closes `sync`.
        """
        backend = cls.__new__(cls)
        backend._init(sync)
        return backend

    def to_sync(self) -> SyncLmdbBackend:
        """The synchronous backend underneath."""
        return self._sync

    async def _in_writer(self, func: Callable[..., _T], *args: Any) -> _T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._writer, functools.partial(func, *args))

    async def exists(self, key: bytes) -> bool:
        return self._sync.key_type(key) is not None

    async def keys(self, filter: bytes) -> list[bytes]:
        return await self._in_writer(self._sync.keys, filter)

    async def delete(self, key: bytes) -> None:
        await self._in_writer(self._sync.delete, key)

    async def clear(self) -> None:
        await self._in_writer(self._sync.clear)

    async def key_type(self, key: bytes) -> KeyType | None:
        return self._sync.key_type(key)

    async def set_immutable(self, key: bytes, value: bytes) -> bytes | None:
        return await self._in_writer(self._sync.set_immutable, key, value)

    async def get(self, key: bytes) -> GetResult:
        return self._sync.get(key)

    async def add_mutable(self, key: bytes, value: bytes, timestamp: float) -> None:
        await self._in_writer(self._sync.add_mutable, key, value, timestamp)

    async def set_indexed(self, key: bytes, sub_key: bytes, value: bytes) -> bytes | None:
        return await self._in_writer(self._sync.set_indexed, key, sub_key, value)

    async def get_indexed(self, key: bytes, sub_key: bytes) -> bytes | None:
        return self._sync.get_indexed(key, sub_key)

    async def get_range(
        self,
        key: bytes,
        start_time: float,
        end_time: float,
        include_previous: bool,
        include_end: bool,
    ) -> list[tuple[bytes, float]] | None:
        return await self._in_writer(
            self._sync.get_range, key, start_time, end_time, include_previous, include_end
        )

    async def dump(self, key: bytes) -> bytes | None:
        return await self._in_writer(self._sync.dump, key)

    async def load_records(self, records: Iterable[Record]) -> int:
        return await self._in_writer(self._sync.load_records, records)

    async def load_from_file(self, file: PathType | BinaryIO) -> int:
        """The synchronous bulk import, all or nothing, in the writer thread."""
        return await self._in_writer(self._sync.load_from_file, file)

    async def monitor_keys(self, keys: Iterable[bytes]) -> AsyncGenerator[KeyUpdateBase, None]:
        if self._close_task is not None:
            raise CancelledError("cannot wait for keys: the LMDB backend is closed")
        keys = list(dict.fromkeys(keys))
        inbox = Inbox()
        self._watchers.add(inbox, keys)
        if self._watcher is None:
            # Before this monitor's first check, so that no event falls between.
            self._seq = self._sync.last_seq
            self._watcher = asyncio.get_running_loop().create_task(self._watch())
        try:
            # Events up to the watcher's position are not delivered to this
            # monitor, but its check at this first update sees them.
            yield KeyUpdateBase()
            while True:
                yield await inbox.get()
        finally:
            self._watchers.discard(inbox, keys)
            if not self._watchers and self._watcher is not None:
                self._watcher.cancel()
                self._watcher = None

    async def _watch(self) -> None:
        """The watcher task: hands the events on watched keys to their monitors."""
        loop = asyncio.get_running_loop()
        # The watcher's own thread; it ends after its current sleep once the
        # task is cancelled.
        thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="telstate-lmdb-watch")
        sync = self._sync
        try:
            while True:
                last = await loop.run_in_executor(
                    thread, sync.wait_for_commit, self._seq, _WATCH_INTERVAL
                )
                if last <= self._seq:
                    continue
                # The range and the keys are fixed together, here on the
                # loop: a monitor added later checks after this point.
                start, end, keys = self._seq + 1, sync.last_seq, self._watchers.keys()
                updates = await loop.run_in_executor(thread, sync.updates, start, end, list(keys))
                self._seq = end
                for key, update in updates:
                    self._watchers.deliver(key, update)
        except Exception as error:
            self._watchers.end(f"the LMDB watcher failed ({error})", error)
            raise
        finally:
            thread.shutdown(wait=False)

    def close(self) -> None:
        """Start closing: end the waits (they raise :exc:`CancelledError`) and the store.

        The synchronous backend is closed (which flushes) in the writer thread.
        """
        if self._close_task is None:
            self._close_task = asyncio.get_running_loop().create_task(self._close())

    async def _close(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        self._watchers.end("the LMDB backend was closed")
        try:
            await self._in_writer(self._sync.close)
        finally:
            self._writer.shutdown(wait=False)

    async def wait_closed(self) -> None:
        """Wait until :meth:`close` is done (closing first if it was not called)."""
        self.close()
        assert self._close_task is not None
        await self._close_task
