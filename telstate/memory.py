"""In-process backend: a dictionary, for tests, tools and RDB files loaded into memory."""

from __future__ import annotations

import bisect
import collections
import logging
import threading
from collections.abc import Generator, Iterable, Iterator
from typing import Any, BinaryIO

from . import import_rules

# Public here as in katsdptelstate (its backends load files through it).
from . import rdb_reader as rdb_reader
from .backend import (
    Backend,
    GetResult,
    ImmutableKeyUpdate,
    IndexedKeyUpdate,
    KeyUpdateBase,
    MutableKeyUpdate,
    PackedMembers,
    Record,
)
from .errors import ImmutableKeyError
from .rdb_reader import BackendCallback
from .utils import (
    KeyType,
    PathType,
    compile_pattern,
    pack_query_timestamp,
    pack_timestamp,
    split_timestamp,
)

logger = logging.getLogger(__name__)

_Value = bytes | list[bytes] | PackedMembers | dict[bytes, bytes]
_TYPES = {
    bytes: KeyType.IMMUTABLE,
    list: KeyType.MUTABLE,
    PackedMembers: KeyType.MUTABLE,
    dict: KeyType.INDEXED,
}


class MemoryBackend(Backend):
    """Telescope state held in a dictionary in this process.

    Immutable keys hold bytes, mutable keys a sorted list of packed members
    (8-byte big-endian timestamp followed by the value, exactly as in the
    Redis zset, so ordering and deduplication match), and indexed keys a
    dict. A mutable key loaded from an RDB file whose members all have one
    length is kept as :class:`~telstate.backend.PackedMembers` (one buffer
    instead of a bytes object per sample) until it is next written to.
    Safe to use from several threads; :meth:`monitor_keys` wakes waiters in
    other threads of this process.
    """

    def __init__(self) -> None:
        self._data: dict[bytes, _Value] = {}
        self._lock = threading.Lock()
        # Waiters by watched key: each waiter is a deque of updates plus a condition.
        self._watchers: dict[bytes, list[_Watcher]] = {}

    def __contains__(self, key: bytes) -> bool:
        return key in self._data

    def keys(self, filter: bytes) -> list[bytes]:
        if filter == b"*":
            return list(self._data)
        match = compile_pattern(filter).fullmatch
        return [key for key in list(self._data) if match(key)]

    def delete(self, key: bytes) -> None:
        with self._lock:
            self._data.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def key_type(self, key: bytes) -> KeyType | None:
        value = self._data.get(key)
        return None if value is None else _TYPES[type(value)]

    def set_immutable(self, key: bytes, value: bytes) -> bytes | None:
        with self._lock:
            old = self._data.get(key)
            if old is None:
                self._data[key] = value
                if self._watchers:
                    self._notify(key, ImmutableKeyUpdate, value)
                return None
        if type(old) is not bytes:
            raise ImmutableKeyError(key)
        return old

    def get(self, key: bytes) -> GetResult:
        value = self._data.get(key)
        if value is None:
            return None, None
        if type(value) is list:
            return split_timestamp(value[-1])
        if type(value) is bytes:
            return value, None
        if type(value) is dict:
            return dict(value), None
        return split_timestamp(value[-1])  # type: ignore[arg-type,index]  # PackedMembers

    def add_mutable(self, key: bytes, value: bytes, timestamp: float) -> None:
        member = pack_timestamp(timestamp) + value
        with self._lock:
            # Readers take no lock, so a new key appears only with its first sample.
            members = self._data.get(key)
            if type(members) is PackedMembers:
                members = self._data[key] = members[:]
            if members is None:
                self._data[key] = [member]
            elif type(members) is not list:
                raise ImmutableKeyError(key)
            elif members[-1] < member:
                members.append(member)
            else:
                pos = bisect.bisect_left(members, member)
                if pos < len(members) and members[pos] == member:
                    return
                members.insert(pos, member)
            if self._watchers:
                self._notify(key, MutableKeyUpdate, value, timestamp)

    def set_indexed(self, key: bytes, sub_key: bytes, value: bytes) -> bytes | None:
        with self._lock:
            sub_keys = self._data.get(key)
            if sub_keys is None:
                self._data[key] = {sub_key: value}
            elif type(sub_keys) is not dict:
                raise ImmutableKeyError(key)
            elif (old := sub_keys.get(sub_key)) is not None:
                return old
            else:
                sub_keys[sub_key] = value
            if self._watchers:
                self._notify(key, IndexedKeyUpdate, sub_key, value)
        return None

    def get_indexed(self, key: bytes, sub_key: bytes) -> bytes | None:
        sub_keys = self._data.get(key)
        if sub_keys is None:
            raise KeyError(key)
        if type(sub_keys) is not dict:
            raise ImmutableKeyError(key)
        return sub_keys.get(sub_key)

    def get_range(
        self,
        key: bytes,
        start_time: float,
        end_time: float,
        include_previous: bool,
        include_end: bool,
    ) -> list[tuple[bytes, float]] | None:
        members = self._data.get(key)
        if members is None:
            return None
        if type(members) is not list and type(members) is not PackedMembers:
            raise ImmutableKeyError(key)
        start_bound = pack_query_timestamp(start_time, False)
        start = _bisect_bound(members, start_bound)
        end = _bisect_bound(members, pack_query_timestamp(end_time, True, include_end))
        selected = []
        if include_previous:
            # As Redis's ZREVRANGEBYLEX from the start bound: the last member
            # not above it, even when the range itself is empty. A member with
            # an empty value at start_time is the bare bound, so it is that
            # previous sample and also the range's first.
            previous = start
            if start_bound[:1] == b"[":
                previous = bisect.bisect_right(members, start_bound[1:])
            if previous > 0:
                selected = members[previous - 1 : previous]
        selected += members[start:end]
        return [split_timestamp(member) for member in selected]

    def load_records(self, records: Iterable[Record], source: PathType | None = None) -> int:
        """Import whole keys; all or nothing (see :mod:`telstate.import_rules`).

        Every record is checked, and checked against the keys held, before
        any is stored.
        """
        checked = [import_rules.check_record(record, source) for record in records]
        with self._lock:
            earlier: dict[bytes, Record] = {}  # a key may be twice in a file (two databases)
            for record in checked:
                key, key_type, value = record
                existing = self._data.get(key)
                existing_type = None if existing is None else _TYPES[type(existing)]
                import_rules.raise_contradiction(record, existing_type, existing)
                if key in earlier:
                    import_rules.raise_contradiction(record, earlier[key][1], earlier[key][2])
                earlier[key] = record
            for key, key_type, value in checked:
                existing = self._data.get(key)
                if existing is None:
                    # Checked: a list or PackedMembers, never a store's lazy members.
                    assert isinstance(value, (bytes, dict, list, PackedMembers))
                    self._data[key] = value
                elif key_type == KeyType.MUTABLE:
                    assert not isinstance(existing, (bytes, dict))
                    assert not isinstance(value, (bytes, dict))
                    self._data[key] = sorted(set(existing).union(value))
                elif key_type == KeyType.INDEXED:
                    assert isinstance(existing, dict) and isinstance(value, dict)
                    self._data[key] = {**value, **existing}
        return len(checked)

    def load_from_file(self, file: PathType | BinaryIO) -> int:
        """Load the keys of an RDB file, all or nothing (see :meth:`load_records`).

        Uniform mutable keys stay packed (see the class).
        """
        records = rdb_reader.read_records(file, packed_members=True)
        return self.load_records(records, import_rules.file_source(file))

    def records(self) -> Iterator[Record]:
        """Every key as an RDB record, in key order (the inverse of :meth:`load_records`)."""
        for key in sorted(self._data):
            value = self._data.get(key)
            if value is not None:
                key_type = _TYPES[type(value)]
                if type(value) is PackedMembers:
                    yield key, key_type, value[:]
                elif type(value) is bytes:
                    yield key, key_type, value
                else:
                    yield key, key_type, value.copy()  # type: ignore[union-attr]

    def monitor_keys(
        self, keys: Iterable[bytes]
    ) -> Generator[KeyUpdateBase | None, float | None, None]:
        watcher = _Watcher()
        keys = list(keys)
        with self._lock:
            for key in keys:
                self._watchers.setdefault(key, []).append(watcher)
        try:
            # A write may have landed between the caller's check and the
            # registration above: the first answer says "check again".
            timeout = yield KeyUpdateBase()
            while True:
                timeout = yield watcher.get(timeout)
        finally:
            with self._lock:
                for key in keys:
                    waiting = self._watchers.get(key, [])
                    if watcher in waiting:
                        waiting.remove(watcher)
                    if not waiting:
                        self._watchers.pop(key, None)

    def _notify(self, key: bytes, update_class: type, *args) -> None:
        """Hand an update to every waiter on `key` (called with the lock held)."""
        for watcher in self._watchers.get(key, ()):
            watcher.put(update_class(key, *args))


def _bisect_bound(members: list[bytes] | PackedMembers, bound: bytes) -> int:
    """Index where a ZRANGEBYLEX bound falls.

    Only the bounds :func:`pack_query_timestamp` makes occur: ``-``, ``+``,
    an inclusive start ``[x`` and an exclusive end ``(x``; both of the last
    two split the members at the first one not below ``x``.
    """
    if bound == b"-":
        return 0
    if bound == b"+":
        return len(members)
    return bisect.bisect_left(members, bound[1:])


class _Watcher:
    """Updates for one waiter, handed over from writer threads."""

    def __init__(self) -> None:
        self._updates: collections.deque[KeyUpdateBase] = collections.deque()
        self._condition = threading.Condition(threading.Lock())

    def put(self, update: KeyUpdateBase) -> None:
        with self._condition:
            self._updates.append(update)
            self._condition.notify()

    def get(self, timeout: float | None) -> KeyUpdateBase | None:
        with self._condition:
            if not self._updates:
                self._condition.wait(timeout)
            return self._updates.popleft() if self._updates else None


class MemoryCallback(BackendCallback):
    """RDB callback (see :func:`telstate.rdb_reader.load_from_file`) that fills a dict.

    The dict takes :class:`MemoryBackend`'s layout: bytes for string keys,
    a sorted list of members for sorted sets, a dict for hashes. Kept for
    katsdptelstate's callback API; :meth:`MemoryBackend.load_from_file`
    is the fast way to load a file.
    """

    def __init__(self, data: dict[bytes, _Value]) -> None:
        super().__init__()
        self.data = data

    def set(self, key: bytes, value: bytes, expiry: Any, info: dict) -> None:
        self.data[key] = value
        self.n_keys += 1

    def start_sorted_set(self, key: bytes, length: int, expiry: Any, info: dict) -> None:
        self._members: list[bytes] = []
        self.data[key] = self._members
        self.n_keys += 1

    def zadd(self, key: bytes, score: float, member: bytes) -> None:
        self._members.append(member)

    def end_sorted_set(self, key: bytes) -> None:
        # MemoryBackend keeps members in byte order (cheap: they come sorted).
        self._members.sort()

    def start_hash(self, key: bytes, length: int, expiry: Any, info: dict) -> None:
        self._fields: dict[bytes, bytes] = {}
        self.data[key] = self._fields
        self.n_keys += 1

    def hset(self, key: bytes, field: bytes, value: bytes) -> None:
        self._fields[field] = value
