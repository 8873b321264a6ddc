"""Whole keys read from the state tables, as RDB records (and indexed keys' sub-keys).

Every seek stays within the key id (or name prefix) it seeks in; a
damaged entry raises :exc:`~telstate.errors.StoreError`.

A mutable key's members come as a list, or, when read through a
snapshot and more than ``settings.RECORD_LIST_MAX``, as
:class:`SnapshotMembers`: a sized collection that streams them from the
snapshot's read transaction in bounded pieces, so that exporting a key
of any length needs memory for a piece only.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Collection, Iterator
from typing import Any

import lmdb

from ..backend import Record, in_zset_order
from ..errors import StoreError
from ..utils import KeyType, display_str
from . import settings
from .layout import (
    IMMUTABLE,
    INDEXED,
    INLINE_LIMIT,
    INLINE_PREFIX,
    MUTABLE,
    U32,
    KeyRecord,
    Tables,
    inline,
    name_key_of,
    record_name,
)
from .samples import all_members, member_chunks, member_count

#: Gives a snapshot's open read transaction, or raises StoreError if it is not open.
TxnCheck = Callable[[], Any]


class SnapshotMembers(Collection[bytes]):
    """The members of one mutable key, read from a snapshot as they are iterated.

    Sized (its length is known before any member is read), iterable any
    number of times, always in zset order, in pieces of at most a sample
    block or ``settings.MEMBER_CHUNK`` members. Valid only while the
    snapshot it came from is open: using it after that raises
    :exc:`~telstate.errors.StoreError`. An iteration yields exactly
    ``len()`` members, distinct and in order, or raises StoreError (a read
    transaction is a consistent view, so anything else means the store is
    damaged): a writer that wrote the length first never writes a corrupt
    file.
    """

    __slots__ = ("_check", "_tables", "_key", "_key_id", "_flags", "_count")

    def __init__(
        self, check: TxnCheck, tables: Tables, key: bytes, key_id: bytes, flags: int, count: int
    ) -> None:
        self._check = check
        self._tables = tables
        self._key = key
        self._key_id = key_id
        self._flags = flags
        self._count = count

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[bytes]:
        return itertools.chain.from_iterable(self.chunks())

    def __contains__(self, member: object) -> bool:
        return any(member in chunk for chunk in self.chunks())

    def chunks(self) -> Iterator[list[bytes]]:
        """The members in order, in lists of bounded length.

        Raises
        ------
        StoreError
            If the snapshot is closed (or was invalidated), the key is
            damaged, or its members do not number ``len()``.
        """
        txn = self._check()
        seen = 0
        last = b""
        try:
            for chunk in member_chunks(txn, self._tables, self._key_id, self._flags):
                self._check()
                seen += len(chunk)
                if seen > self._count:
                    break
                if not (last < chunk[0] and in_zset_order(chunk)):
                    raise StoreError(
                        f"key {display_str(self._key)} has samples out of order:"
                        " the store is damaged"
                    )
                last = chunk[-1]
                yield chunk
        except lmdb.Error as error:
            self._check()
            raise StoreError(
                f"reading the samples of {display_str(self._key)} failed: {error}"
            ) from error
        if seen != self._count:
            raise StoreError(
                f"key {display_str(self._key)} gave {seen if seen < self._count else 'more'}"
                f" samples than the {self._count}"
                " counted in the same snapshot: the store is damaged"
            )

    def __repr__(self) -> str:
        return f"<SnapshotMembers of {display_str(self._key)}: {self._count} members>"


def indexed_items(txn: Any, tables: Tables, key_id: bytes) -> dict[bytes, bytes]:
    """Every sub-key of an indexed key."""
    cursor = txn.cursor(db=tables.indexed)
    items: dict[bytes, bytes] = {}
    if not cursor.set_range(key_id):
        return items
    for entry_key, data in cursor.iternext():
        if entry_key[:8] != key_id:
            break
        if len(entry_key) == 8 + INLINE_LIMIT:
            sub_key, value = _split_long_entry(data)
            items[sub_key] = value
        else:
            items[bytes(entry_key[8:])] = bytes(data)
    return items


def _split_long_entry(data: bytes) -> tuple[bytes, bytes]:
    """(sub-key, value) of the indexed table entry of a long sub-key."""
    if len(data) < U32.size:
        raise StoreError("damaged indexed entry: its sub-key length is missing")
    length = U32.unpack_from(data)[0]
    if U32.size + length > len(data):
        raise StoreError("damaged indexed entry: its sub-key length overruns it")
    return bytes(data[4 : 4 + length]), bytes(data[4 + length :])


def indexed_value(txn: Any, tables: Tables, key_id: bytes, sub_key: bytes) -> bytes | None:
    """The value of one sub-key of an indexed key, or None if it has no such sub-key."""
    data = txn.get(key_id + inline(sub_key), db=tables.indexed)
    if data is None:
        return None
    if len(sub_key) >= INLINE_LIMIT:
        stored_sub_key, value = _split_long_entry(data)
        if stored_sub_key != sub_key:
            raise StoreError(f"SHA-256 collision between sub-keys of length {len(sub_key)}")
        return value
    return bytes(data)


def delete_prefix(txn: Any, db: Any, prefix: bytes) -> None:
    """Delete every entry of `db` whose key starts with `prefix`."""
    cursor = txn.cursor(db=db)
    found = cursor.set_range(prefix)
    while found and cursor.key()[: len(prefix)] == prefix:
        found = cursor.delete()


def _state_record(
    txn: Any, tables: Tables, key: bytes, record: bytes, check: TxnCheck | None = None
) -> Record:
    """The whole of one key, from its keys-table record, as an RDB Record.

    With `check` (a snapshot's), a big mutable key comes as :class:`SnapshotMembers`.
    """
    decoded = KeyRecord.decode(record)
    if decoded.type_code == IMMUTABLE:
        return key, KeyType.IMMUTABLE, decoded.value
    if decoded.type_code == MUTABLE:
        key_id, flags = decoded.key_id, decoded.flags
        if check is not None:
            count = member_count(txn, tables, key_id)
            if count > settings.RECORD_LIST_MAX:
                return (
                    key,
                    KeyType.MUTABLE,
                    SnapshotMembers(check, tables, key, key_id, flags, count),
                )
        return key, KeyType.MUTABLE, all_members(txn, tables, key_id, flags)
    if decoded.type_code == INDEXED:
        return key, KeyType.INDEXED, indexed_items(txn, tables, decoded.key_id)
    raise StoreError(f"key {display_str(key)} has unknown type code {decoded.type_code}")


def state_records(txn: Any, tables: Tables, check: TxnCheck | None = None) -> Iterator[Record]:
    """Every key of the state tables as a Record, in key order.

    Mutable keys come as lists, or with `check` (the snapshot's that
    opened `txn`) those of more than ``settings.RECORD_LIST_MAX`` members
    as :class:`SnapshotMembers`.

    The keys table is in key order except among keys that share their
    first 448 bytes and are that long: their inline forms order by digest,
    so each such group is sorted before it is given out.
    """
    group: list[tuple[bytes, bytes]] = []
    for name_key, record in txn.cursor(db=tables.keys).iternext():
        key = record_name(name_key, record)
        if group and key[:INLINE_PREFIX] != group[0][0][:INLINE_PREFIX]:
            yield from (_state_record(txn, tables, *entry, check) for entry in sorted(group))
            group = []
        if len(key) >= INLINE_PREFIX:
            group.append((key, record))
        else:
            yield _state_record(txn, tables, key, record, check)
    yield from (_state_record(txn, tables, *entry, check) for entry in sorted(group))


def key_state_record(txn: Any, tables: Tables, key: bytes) -> Record | None:
    """The whole of `key` as a Record, or None if there is no such key."""
    record = txn.get(name_key_of(key), db=tables.keys)
    return None if record is None else _state_record(txn, tables, key, record)
