"""The byte-level backend interface and the key-update notifications.

A backend stores keys and encoded values as bytes; the frontend
(:class:`telstate.TelescopeState`) owns namespaces and value encoding.
"""

from __future__ import annotations

import itertools
import operator
import os
import struct
import time
from abc import ABC, abstractmethod
from collections.abc import Collection, Generator, Iterable, Iterator, Sequence
from typing import BinaryIO, overload

import numpy as np

from .utils import KeyType, PathType, pack_timestamp, split_timestamp

#: What :meth:`Backend.get` returns: (value, timestamp) for each key type.
GetResult = (
    tuple[None, None] | tuple[bytes, None] | tuple[bytes, float] | tuple[dict[bytes, bytes], None]
)

#: The members of a mutable key: packed members (8-byte big-endian timestamp
#: + value). A sized collection: a list (from an RDB file, in any order), a
#: :class:`PackedMembers` (sorted and distinct), or the lazy
#: :class:`telstate.lmdb.state.SnapshotMembers` of a big key (sorted and
#: distinct, read as it is iterated, valid only while its snapshot is open).
#: Consumers take ``len()`` and iterate (:func:`member_chunks` for pieces);
#: they never need it whole.
Members = Collection[bytes]
#: The contents of one key, as found in an RDB file or a store: immutable ->
#: bytes, mutable -> :data:`Members`, indexed -> dict of sub-key to value.
#: Every backend's ``load_records`` and the RDB writer take any of them.
RecordValue = bytes | Members | dict[bytes, bytes]
Record = tuple[bytes, KeyType, RecordValue]


_first = operator.itemgetter(0)


def split_members(buffer: bytes, size: int) -> list[bytes]:
    """Cut `buffer` into members of `size` bytes each (`size` divides its length).

    :meth:`struct.Struct.iter_unpack` makes the bytes objects in C, about
    twice as fast as slicing in a loop.
    """
    if size <= 0:
        raise ValueError(f"members of {size} bytes")
    return list(map(_first, struct.Struct(f"{size}s").iter_unpack(buffer)))


def in_zset_order(members: Sequence[bytes]) -> bool:
    """Whether `members` are distinct and in order (byte order, as in a Redis zset)."""
    return all(map(operator.lt, members, itertools.islice(members, 1, None)))


def member_chunks(members: Members, size: int) -> Iterator[Sequence[bytes]]:
    """The members in pieces of at most `size`, in their order, never all copied at once."""
    if isinstance(members, Sequence):
        for start in range(0, len(members), size):
            yield members[start : start + size]
        return
    remaining = iter(members)
    while chunk := list(itertools.islice(remaining, size)):
        yield chunk


class PackedMembers(Sequence[bytes]):
    """The members of a mutable key that all have one length, held in one buffer.

    A sensor's members usually all have the same length (a float sample is
    an 8-byte timestamp and a 10-byte value). Millions of them as separate
    bytes objects cost a slice each to make and about 50 bytes each of
    overhead; here a member is only cut out of the buffer when it is read.
    Behaves as the sorted list of distinct members that it stands for
    (indexing, slicing to a list, iteration, :func:`bisect.bisect_left`).
    Immutable: to change a key, make a list of it.

    Make one with :meth:`from_buffer`, which puts the members in zset order.
    """

    __slots__ = ("_buffer", "_size", "_count")

    def __init__(self, buffer: bytes, size: int) -> None:
        # Private: callers go through from_buffer, which guarantees the order.
        self._buffer = buffer
        self._size = size
        self._count = len(buffer) // size

    @classmethod
    def from_buffer(cls, buffer: bytes, size: int) -> PackedMembers:
        """Members of `size` bytes each, concatenated in any order, with any repeats.

        Sorted and made distinct as in a Redis zset (byte order, which for
        packed members is time order). Members in order (files written from
        a zset) or in reverse order (Redis writes its skiplists backwards)
        cost one vectorised comparison.

        Raises
        ------
        ValueError
            If `size` is not positive or does not divide the buffer's length.
        """
        if size <= 0 or len(buffer) % size:
            raise ValueError(f"a buffer of {len(buffer)} bytes is not members of {size} bytes")
        # Fixed-width byte strings compare as bytes do (numpy pads with NUL,
        # the smallest byte, and every row has the same width).
        rows = np.frombuffer(buffer, dtype=f"S{size}")
        if len(rows) > 1:
            if not (rows[1:] > rows[:-1]).all():
                if (rows[1:] < rows[:-1]).all():
                    buffer = rows[::-1].tobytes()
                else:
                    buffer = np.unique(rows).tobytes()
        return cls(buffer, size)

    def __len__(self) -> int:
        return self._count

    @property
    def buffer(self) -> bytes:
        """The members, concatenated in zset order (read only)."""
        return self._buffer

    @property
    def size(self) -> int:
        """The length of every member."""
        return self._size

    @overload
    def __getitem__(self, index: int) -> bytes: ...

    @overload
    def __getitem__(self, index: slice) -> list[bytes]: ...

    def __getitem__(self, index: int | slice) -> bytes | list[bytes]:
        size = self._size
        if isinstance(index, slice):
            start, stop, step = index.indices(self._count)
            if step == 1:
                return split_members(self._buffer[start * size : stop * size], size)
            buffer = self._buffer
            return [buffer[i : i + size] for i in range(start * size, stop * size, step * size)]
        if index < 0:
            index += self._count
        if not 0 <= index < self._count:
            raise IndexError("member index out of range")
        start = index * size
        return self._buffer[start : start + size]

    def __iter__(self) -> Iterator[bytes]:
        return iter(split_members(self._buffer, self._size))

    def part(self, start: int, stop: int) -> PackedMembers:
        """Members `start` to `stop` (as in a slice with step 1), still packed in one buffer."""
        start, stop, _ = slice(start, stop).indices(self._count)
        size = self._size
        return PackedMembers(self._buffer[start * size : max(start, stop) * size], size)

    def __repr__(self) -> str:
        return f"<PackedMembers: {self._count} members of {self._size} bytes>"


class KeyUpdateBase:
    """Tells the monitor's caller to check its condition again.

    It says nothing about what changed; subclasses do.
    """


class KeyUpdate(ABC, KeyUpdateBase):
    """Update notification for one key (base of the type-specific classes)."""

    def __init__(self, key: bytes, value: bytes) -> None:
        self.key = key
        self.value = value

    @property
    @abstractmethod
    def key_type(self) -> KeyType:
        """The type of the updated key."""


class MutableKeyUpdate(KeyUpdate):
    """A (value, timestamp) sample was added to a mutable key."""

    def __init__(self, key: bytes, value: bytes, timestamp: float) -> None:
        super().__init__(key, value)
        self.timestamp = timestamp

    @property
    def key_type(self) -> KeyType:
        return KeyType.MUTABLE


class ImmutableKeyUpdate(KeyUpdate):
    """An immutable key was set."""

    @property
    def key_type(self) -> KeyType:
        return KeyType.IMMUTABLE


class IndexedKeyUpdate(KeyUpdate):
    """A sub-key of an indexed key was set."""

    def __init__(self, key: bytes, sub_key: bytes, value: bytes) -> None:
        super().__init__(key, value)
        self.sub_key = sub_key

    @property
    def key_type(self) -> KeyType:
        return KeyType.INDEXED


class Backend(ABC):
    """Low-level interface for telescope state backends.

    Keys, sub-keys and values are bytes, already encoded by the frontend.
    Timestamps are non-negative finite floats (the frontend checks them).
    """

    def __contains__(self, key: bytes) -> bool:
        """Whether `key` exists."""
        return self.key_type(key) is not None

    @abstractmethod
    def keys(self, filter: bytes) -> list[bytes]:
        """Return all keys matching `filter`, a Redis glob pattern."""

    @abstractmethod
    def delete(self, key: bytes) -> None:
        """Delete a key (no-op if it does not exist)."""

    @abstractmethod
    def clear(self) -> None:
        """Remove all keys."""

    @abstractmethod
    def key_type(self, key: bytes) -> KeyType | None:
        """Get the type of `key`, or None if it does not exist."""

    @abstractmethod
    def set_immutable(self, key: bytes, value: bytes) -> bytes | None:
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
    def get(self, key: bytes) -> GetResult:
        """Get the value and timestamp of a key.

        Immutable: (value, None). Mutable: (latest value, its timestamp).
        Indexed: (dict of every sub-key to value, None). Absent: (None, None).
        """

    @abstractmethod
    def add_mutable(self, key: bytes, value: bytes, timestamp: float) -> None:
        """Add a (value, timestamp) sample to a mutable key.

        An identical (timestamp, value) sample already present is not stored twice.

        Raises
        ------
        ImmutableKeyError
            If the key exists and is not mutable.
        """

    @abstractmethod
    def set_indexed(self, key: bytes, sub_key: bytes, value: bytes) -> bytes | None:
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
    def get_indexed(self, key: bytes, sub_key: bytes) -> bytes | None:
        """Get the value of one sub-key, or None if the key exists without it.

        Raises
        ------
        KeyError
            If the key does not exist.
        ImmutableKeyError
            If the key exists and is not indexed.
        """

    @abstractmethod
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
        `start_time`. `start_time` may be negative or infinite; `end_time`
        is non-negative (possibly infinite). Returns None if the key does
        not exist.

        Raises
        ------
        ImmutableKeyError
            If the key exists and is not mutable.
        """

    def record(self, key: bytes) -> Record | None:
        """Return the whole of `key` as an RDB record, or None if it is absent.

        Mutable keys give their members (packed timestamp + value) sorted
        and distinct, as in the Redis zset.
        """
        key_type = self.key_type(key)
        if key_type == KeyType.MUTABLE:
            samples = self.get_range(key, -1.0, float("inf"), False, True)
            if samples is None:
                return None
            return key, key_type, [pack_timestamp(ts) + value for value, ts in samples]
        value, _ = self.get(key)
        if key_type is None or value is None:
            return None
        return key, key_type, value

    def records(self) -> Iterator[Record]:
        """Every key as an RDB record (see :meth:`record`), in key order.

        Backends override this with a consistent bulk read where they can.
        """
        for key in sorted(self.keys(b"*")):
            record = self.record(key)
            if record is not None:
                yield record

    def dump(self, key: bytes) -> bytes | None:
        """Return `key` in the format of the Redis DUMP command, or None if absent."""
        from . import rdb_utility

        record = self.record(key)
        if record is None:
            return None
        _, key_type, value = record
        if isinstance(value, bytes):
            return rdb_utility.dump_string(value)
        if isinstance(value, dict):
            return rdb_utility.dump_hash(value)
        return rdb_utility.dump_zset(value)

    def load_from_file(self, file: PathType | BinaryIO) -> int:
        """Load the keys of an RDB file; implements :meth:`TelescopeState.load_from_file`.

        Follows :mod:`telstate.import_rules`: a regular file (by path, read
        twice through one descriptor, or seekable file object) is checked
        whole (records, and conflicts with existing keys) before anything is
        written, so a bad file leaves the store unchanged.

        Returns
        -------
        The number of keys loaded.

        Raises
        ------
        RdbParseError
            If the file is not a valid RDB file, or holds a record of the
            wrong shape.
        InvalidTimestampError
            If a sample's timestamp is negative or not finite.
        ImmutableKeyError
            If the file contradicts a key the store has.
        """
        from . import import_rules, rdb_reader

        if isinstance(file, (str, bytes, os.PathLike)):
            # Opened once, for both passes (see LmdbBackend.load_from_file).
            with open(file, "rb") as handle:
                return Backend.load_from_file(self, handle)
        source = import_rules.file_source(file)
        if import_rules.rereadable(file):
            start = file.tell()
            for batch in import_rules.batches(rdb_reader.read_records(file), source):
                self.check_imports(batch)
            file.seek(start)
        return self.load_records(rdb_reader.read_records(file), source=source)

    def check_imports(self, records: list[Record]) -> None:
        """:meth:`check_import` for each of some checked records (backends may batch it)."""
        for record in records:
            self.check_import(record)

    def check_import(self, record: Record) -> None:
        """Raise :exc:`ImmutableKeyError` if importing a checked `record` would change a key.

        See :mod:`telstate.import_rules`. Backends override this with a
        cheaper look at the store where they can.
        """
        from . import import_rules

        key, key_type, _ = record
        existing_type = self.key_type(key)
        existing = None
        if existing_type in (KeyType.IMMUTABLE, KeyType.INDEXED) and existing_type == key_type:
            existing = self.get(key)[0]
        import_rules.raise_contradiction(record, existing_type, existing)

    def load_records(self, records: Iterable[Record], source: PathType | None = None) -> int:
        """Import whole keys as read from an RDB file; return how many.

        Each record is checked (see :mod:`telstate.import_rules`, which
        also says what happens to keys the store has) before it is
        written. Backends override this with a bulk path; this default
        goes through the write methods.

        Parameters
        ----------
        records
            ``(key, key_type, value)`` records.
        source
            The file they come from, named in errors.

        Raises
        ------
        RdbParseError, InvalidTimestampError, ImmutableKeyError
            As :meth:`load_from_file`; the records before the bad one are
            loaded.
        """
        from . import import_rules

        count = 0
        for record in records:
            key, key_type, value = checked = import_rules.check_record(record, source)
            self.check_import(checked)
            if key_type == KeyType.IMMUTABLE:
                assert isinstance(value, bytes)
                self.set_immutable(key, value)
            elif key_type == KeyType.MUTABLE:
                for member in value:
                    sample, timestamp = split_timestamp(member)  # type: ignore[arg-type]
                    self.add_mutable(key, sample, timestamp)
            else:
                assert isinstance(value, dict)
                for sub_key, sub_value in value.items():
                    self.set_indexed(key, sub_key, sub_value)
            count += 1
        return count

    def monitor_keys(
        self, keys: Iterable[bytes]
    ) -> Generator[KeyUpdateBase | None, float | None, None]:
        """Report changes to `keys`.

        Returns a generator. Its first yield is None or a
        :class:`KeyUpdateBase` (check again at once). After that the caller
        sends a timeout in seconds and receives an update, or None if there
        was none within the timeout. Updates may occasionally be missed (the
        caller re-checks after each wake), and a bare :class:`KeyUpdateBase`
        means only "check again". The generator runs until closed.

        This default polls: it reports "check again" every 0.1 s.
        """
        timeout = yield None
        while True:
            time.sleep(min(timeout or 0.0, 0.1))
            timeout = yield KeyUpdateBase()

    def close(self) -> None:  # noqa: B027 - an optional hook, a no-op by default
        """Release resources held by the backend (connections, files); idempotent."""
