"""Whole keys read from the state tables, as RDB records (and indexed keys' sub-keys).

Every seek stays within the key id (or name prefix) it seeks in; a
damaged entry raises :exc:`~telstate.errors.StoreError`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..backend import Record
from ..errors import StoreError
from ..utils import KeyType, display_str
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
from .samples import all_members


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


def _state_record(txn: Any, tables: Tables, key: bytes, record: bytes) -> Record:
    """The whole of one key, from its keys-table record, as an RDB Record."""
    decoded = KeyRecord.decode(record)
    if decoded.type_code == IMMUTABLE:
        return key, KeyType.IMMUTABLE, decoded.value
    if decoded.type_code == MUTABLE:
        return key, KeyType.MUTABLE, all_members(txn, tables, decoded.key_id, decoded.flags)
    if decoded.type_code == INDEXED:
        return key, KeyType.INDEXED, indexed_items(txn, tables, decoded.key_id)
    raise StoreError(f"key {display_str(key)} has unknown type code {decoded.type_code}")


def state_records(txn: Any, tables: Tables) -> Iterator[Record]:
    """Every key of the state tables as a Record, in key order.

    The keys table is in key order except among keys that share their
    first 448 bytes and are that long: their inline forms order by digest,
    so each such group is sorted before it is given out.
    """
    group: list[tuple[bytes, bytes]] = []
    for name_key, record in txn.cursor(db=tables.keys).iternext():
        key = record_name(name_key, record)
        if group and key[:INLINE_PREFIX] != group[0][0][:INLINE_PREFIX]:
            yield from (_state_record(txn, tables, *entry) for entry in sorted(group))
            group = []
        if len(key) >= INLINE_PREFIX:
            group.append((key, record))
        else:
            yield _state_record(txn, tables, key, record)
    yield from (_state_record(txn, tables, *entry) for entry in sorted(group))


def key_state_record(txn: Any, tables: Tables, key: bytes) -> Record | None:
    """The whole of `key` as a Record, or None if there is no such key."""
    record = txn.get(name_key_of(key), db=tables.keys)
    return None if record is None else _state_record(txn, tables, key, record)
