"""The asynchronous byte-level backend interface.

It mirrors :class:`telstate.backend.Backend` method for method, with
coroutines; the update classes (:class:`~telstate.backend.KeyUpdate` and
friends) and the record format are the synchronous module's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Generator, Iterable
from typing import Any, BinaryIO, NamedTuple

from ..backend import GetResult, KeyUpdateBase, Record
from ..errors import CancelledError
from ..utils import KeyType, PathType, split_timestamp

#: Records read from an RDB file per trip to the reading thread.
LOAD_BATCH = 1000


class Backend(ABC):
    """Low-level interface for asynchronous telescope state backends.

    Keys, sub-keys and values are bytes, already encoded by the frontend
    (:class:`telstate.aio.TelescopeState`). Timestamps are non-negative
    finite floats. The methods mean what they mean in
    :class:`telstate.backend.Backend`; only the waiting differs:
    :meth:`monitor_keys` is an asynchronous generator, and a backend serves
    all its concurrent monitors from one subscription or watcher rather than
    one thread or connection each.
    """

    async def exists(self, key: bytes) -> bool:
        """Whether `key` exists."""
        return await self.key_type(key) is not None

    @abstractmethod
    async def keys(self, filter: bytes) -> list[bytes]:
        """Return all keys matching `filter`, a Redis glob pattern."""

    @abstractmethod
    async def delete(self, key: bytes) -> None:
        """Delete a key (no-op if it does not exist)."""

    @abstractmethod
    async def clear(self) -> None:
        """Remove all keys."""

    @abstractmethod
    async def key_type(self, key: bytes) -> KeyType | None:
        """Get the type of `key`, or None if it does not exist."""

    @abstractmethod
    async def set_immutable(self, key: bytes, value: bytes) -> bytes | None:
        """Set an immutable key unless it exists.

        Returns
        -------
        The existing value if the key is already set (it is left unchanged),
        otherwise None.

        Raises
        ------
        ImmutableKeyError
            If the key exists and is not immutable.
        """

    @abstractmethod
    async def get(self, key: bytes) -> GetResult:
        """Get the value and timestamp of a key.

        Immutable: (value, None). Mutable: (latest value, its timestamp).
        Indexed: (dict of every sub-key to value, None). Absent: (None, None).
        """

    @abstractmethod
    async def add_mutable(self, key: bytes, value: bytes, timestamp: float) -> None:
        """Add a (value, timestamp) sample to a mutable key.

        An identical (timestamp, value) sample already present is not stored twice.

        Raises
        ------
        ImmutableKeyError
            If the key exists and is not mutable.
        """

    @abstractmethod
    async def set_indexed(self, key: bytes, sub_key: bytes, value: bytes) -> bytes | None:
        """Set a sub-key of an indexed key unless the sub-key exists.

        Returns
        -------
        The existing value if the sub-key is already set (it is left
        unchanged), otherwise None.

        Raises
        ------
        ImmutableKeyError
            If the key exists and is not indexed.
        """

    @abstractmethod
    async def get_indexed(self, key: bytes, sub_key: bytes) -> bytes | None:
        """Get the value of one sub-key, or None if the key exists without it.

        Raises
        ------
        KeyError
            If the key does not exist.
        ImmutableKeyError
            If the key exists and is not indexed.
        """

    @abstractmethod
    async def get_range(
        self,
        key: bytes,
        start_time: float,
        end_time: float,
        include_previous: bool,
        include_end: bool,
    ) -> list[tuple[bytes, float]] | None:
        """Return the (value, timestamp) samples of a mutable key in a time range.

        As :meth:`telstate.backend.Backend.get_range`; None if the key does
        not exist.

        Raises
        ------
        ImmutableKeyError
            If the key exists and is not mutable.
        """

    @abstractmethod
    async def dump(self, key: bytes) -> bytes | None:
        """Return `key` in the format of the Redis DUMP command, or None if absent."""

    async def load_from_file(self, file: PathType | BinaryIO) -> int:
        """Load the keys of an RDB file; implements :meth:`TelescopeState.load_from_file`.

        The file is parsed in a worker thread, :data:`LOAD_BATCH` records at
        a time, so the event loop keeps running and memory stays bounded
        however large the file.

        Returns
        -------
        The number of keys loaded.

        Raises
        ------
        RdbParseError
            If the file is not a valid RDB file.
        OSError
            If the file cannot be opened or read.
        """
        loop = asyncio.get_running_loop()
        # One worker thread, which also closes the file: after any read still
        # in progress if the load is cancelled, never during it.
        worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="telstate-rdb-load")
        records = _read_records(file)
        count = 0
        try:
            while batch := await loop.run_in_executor(worker, _take, records, LOAD_BATCH):
                count += await self.load_records(batch)
        finally:
            worker.submit(records.close)
            worker.shutdown(wait=False)
        return count

    async def load_records(self, records: Iterable[Record]) -> int:
        """Store whole keys as read from an RDB file, without checks; return the count.

        As :meth:`telstate.backend.Backend.load_records`. Backends override
        this with a bulk path; this default goes through the write methods.
        """
        count = 0
        for key, key_type, value in records:
            if key_type == KeyType.IMMUTABLE:
                assert isinstance(value, bytes)
                await self.set_immutable(key, value)
            elif key_type == KeyType.MUTABLE:
                assert not isinstance(value, (bytes, dict))
                for member in value:
                    sample, timestamp = split_timestamp(member)
                    await self.add_mutable(key, sample, timestamp)
            else:
                assert isinstance(value, dict)
                for sub_key, sub_value in value.items():
                    await self.set_indexed(key, sub_key, sub_value)
            count += 1
        return count

    @abstractmethod
    def monitor_keys(self, keys: Iterable[bytes]) -> AsyncGenerator[KeyUpdateBase, None]:
        """Report changes to `keys`.

        Returns an asynchronous generator of updates that runs until it is
        closed (``aclose``, which the frontend does when its wait ends or is
        cancelled). Its first update is a bare :class:`KeyUpdateBase`,
        meaning "check again": writes made before the monitor was listening
        are not reported otherwise. Later updates are
        :class:`~telstate.backend.KeyUpdate` objects that carry the new
        value, or bare ones (check again) where the backend cannot say what
        changed, e.g. after a reconnection.
        """

    def close(self) -> None:  # noqa: B027 - an optional hook, a no-op by default
        """Start releasing the backend's resources; :meth:`wait_closed` waits for the end."""

    async def wait_closed(self) -> None:  # noqa: B027 - an optional hook, a no-op by default
        """Wait until the shutdown started by :meth:`close` has completed."""


class Inbox:
    """The updates waiting for one monitor, put there by its backend's watcher.

    :meth:`get` returns them in order, and raises once the backend has
    ended the monitor (see :meth:`end`).
    """

    def __init__(self) -> None:
        self._items: asyncio.Queue[Any] = asyncio.Queue()

    def put(self, item: Any) -> None:
        """Queue an update (what it is, is up to the backend)."""
        self._items.put_nowait(item)

    def end(self, reason: str, cause: BaseException | None = None) -> None:
        """Make :meth:`get` raise :exc:`~telstate.errors.CancelledError` after the queued items."""
        self._items.put_nowait(_End(reason, cause))

    async def get(self) -> Any:
        """The next update, waiting for one if need be.

        Raises
        ------
        CancelledError
            If the backend ended the monitor (e.g. it was closed).
        """
        item = await self._items.get()
        if isinstance(item, _End):
            raise CancelledError(f"wait for keys ended: {item.reason}") from item.cause
        return item


class Watchers:
    """The monitors of one backend, by watched key: the registry behind one shared watcher."""

    def __init__(self) -> None:
        self._inboxes: dict[bytes, set[Inbox]] = {}

    def __bool__(self) -> bool:
        """Whether any key is watched."""
        return bool(self._inboxes)

    def __contains__(self, key: bytes) -> bool:
        return key in self._inboxes

    def keys(self) -> list[bytes]:
        """The watched keys."""
        return list(self._inboxes)

    def add(self, inbox: Inbox, keys: Iterable[bytes]) -> list[bytes]:
        """Deliver updates of `keys` to `inbox`; return the keys nobody watched before."""
        new = []
        for key in keys:
            inboxes = self._inboxes.get(key)
            if inboxes is None:
                inboxes = self._inboxes[key] = set()
                new.append(key)
            inboxes.add(inbox)
        return new

    def discard(self, inbox: Inbox, keys: Iterable[bytes]) -> list[bytes]:
        """Stop delivering updates of `keys` to `inbox`; return the keys nobody watches now."""
        gone = []
        for key in keys:
            inboxes = self._inboxes.get(key)
            if inboxes is not None:
                inboxes.discard(inbox)
                if not inboxes:
                    del self._inboxes[key]
                    gone.append(key)
        return gone

    def deliver(self, key: bytes | None, item: Any) -> None:
        """Put `item` into the inbox of every monitor of `key` (of every monitor if None)."""
        inboxes = self._inboxes.get(key, ()) if key is not None else self._all()
        for inbox in inboxes:
            inbox.put(item)

    def end(self, reason: str, cause: BaseException | None = None) -> None:
        """End every monitor (see :meth:`Inbox.end`)."""
        for inbox in self._all():
            inbox.end(reason, cause)

    def _all(self) -> set[Inbox]:
        return {inbox for inboxes in self._inboxes.values() for inbox in inboxes}


class _End(NamedTuple):
    reason: str
    cause: BaseException | None


def _read_records(file: PathType | BinaryIO) -> Generator[Record, None, None]:
    """The records of an RDB file, from a generator that closes the file when closed."""
    from ..rdb_reader import read_records

    yield from read_records(file)


def _take(records: Iterable[Record], count: int) -> list[Record]:
    return list(itertools.islice(records, count))
