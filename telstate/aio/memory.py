"""Asynchronous in-process backend: a thin layer over :class:`telstate.memory.MemoryBackend`."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncGenerator, Iterable

from ..backend import GetResult, KeyUpdateBase, Record
from ..memory import MemoryBackend as SyncMemoryBackend
from ..utils import KeyType
from .backend import Backend

logger = logging.getLogger(__name__)


class MemoryBackend(Backend):
    """Telescope state held in a dictionary in this process, for asyncio code.

    The data live in a :class:`telstate.memory.MemoryBackend`, which may be
    shared with synchronous code (:meth:`to_sync`, :meth:`from_sync`):
    writes made through either, from any thread, wake the waits of both.
    Every operation is quick and non-blocking, so it runs on the event loop.
    A wait costs an :class:`asyncio.Queue` that the writer fills; no thread
    waits for it. :meth:`close` does nothing (katsdptelstate's clears the
    data, which here may be shared).

    Parameters
    ----------
    sync
        The synchronous backend that holds the data; a new, empty one if None.
    """

    def __init__(self, sync: SyncMemoryBackend | None = None) -> None:
        self._sync = SyncMemoryBackend() if sync is None else sync

    def to_sync(self) -> SyncMemoryBackend:
        """The synchronous backend that holds the same data."""
        return self._sync

    @classmethod
    def from_sync(cls, sync: SyncMemoryBackend) -> MemoryBackend:
        """An asynchronous backend that shares its data with `sync`."""
        return cls(sync)

    async def exists(self, key: bytes) -> bool:
        return key in self._sync

    async def keys(self, filter: bytes) -> list[bytes]:
        return self._sync.keys(filter)

    async def delete(self, key: bytes) -> None:
        self._sync.delete(key)

    async def clear(self) -> None:
        self._sync.clear()

    async def key_type(self, key: bytes) -> KeyType | None:
        return self._sync.key_type(key)

    async def set_immutable(self, key: bytes, value: bytes) -> bytes | None:
        return self._sync.set_immutable(key, value)

    async def get(self, key: bytes) -> GetResult:
        return self._sync.get(key)

    async def add_mutable(self, key: bytes, value: bytes, timestamp: float) -> None:
        self._sync.add_mutable(key, value, timestamp)

    async def set_indexed(self, key: bytes, sub_key: bytes, value: bytes) -> bytes | None:
        return self._sync.set_indexed(key, sub_key, value)

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
        return self._sync.get_range(key, start_time, end_time, include_previous, include_end)

    async def dump(self, key: bytes) -> bytes | None:
        return self._sync.dump(key)

    async def load_records(self, records: Iterable[Record]) -> int:
        return self._sync.load_records(records)

    async def monitor_keys(self, keys: Iterable[bytes]) -> AsyncGenerator[KeyUpdateBase, None]:
        keys = list(dict.fromkeys(keys))
        inbox = _LoopInbox(asyncio.get_running_loop())
        # The synchronous backend hands every write to the watchers of its
        # key while holding its lock; an inbox is a watcher that forwards
        # the update to the event loop instead of waking a thread.
        sync = self._sync
        with sync._lock:
            for key in keys:
                sync._watchers.setdefault(key, []).append(inbox)  # type: ignore[arg-type]
        try:
            yield KeyUpdateBase()
            while True:
                yield await inbox.updates.get()
        finally:
            with sync._lock:
                for key in keys:
                    watchers = sync._watchers.get(key, [])
                    if inbox in watchers:
                        watchers.remove(inbox)  # type: ignore[arg-type]
                    if not watchers:
                        sync._watchers.pop(key, None)


class _LoopInbox:
    """Updates for one asynchronous wait, handed over from writers on any thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.updates: asyncio.Queue[KeyUpdateBase] = asyncio.Queue()
        self._loop = loop
        self._loop_thread = threading.get_ident()

    def put(self, update: KeyUpdateBase) -> None:
        """Queue `update` (called by the synchronous backend, with its lock held)."""
        if threading.get_ident() == self._loop_thread:
            self.updates.put_nowait(update)
            return
        try:
            self._loop.call_soon_threadsafe(self.updates.put_nowait, update)
        except RuntimeError:
            pass  # The loop is closed, so nobody is waiting any more.
