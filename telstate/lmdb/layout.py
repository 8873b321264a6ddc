"""The byte layout of a store's tables; nothing else in the package knows it.

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
    seeks and reads few big records (see :mod:`telstate.lmdb.samples`).
``indexed``
    key id + inline sub-key → value; for a long sub-key, 4-byte length +
    sub-key + value.
``history`` (sorted fixed-size duplicates)
    ``0x01`` + inline key → 8-byte seq of every event on that key;
    ``0x00`` → seq of every clear. :meth:`LmdbBackend.history` and
    ``events(keys=...)`` read it instead of scanning the log.
"""

from __future__ import annotations

import hashlib
import operator
import struct
from typing import Any

import lmdb

from ..utils import KeyType

# Inline forms (see the module docstring).
INLINE_LIMIT = 480
INLINE_PREFIX = 448
NAME = b"\x01"
ALL_KEYS = b"\x00"
LONG_NAME_KEY_LEN = 1 + INLINE_LIMIT
LONG_SAMPLE_LEN = 8 + INLINE_LIMIT
LONG_PADDING = bytes(INLINE_LIMIT - INLINE_PREFIX - 8)

KEY_RECORD = struct.Struct(">BQBd")
KEY_ID = struct.Struct(">Q")
U32 = struct.Struct(">I")
TIMESTAMP = struct.Struct(">d")
FLAG_LONG_NAME = 1
FLAG_LONG_VALUES = 2
TYPE_BY_CODE = {1: KeyType.IMMUTABLE, 2: KeyType.MUTABLE, 3: KeyType.INDEXED}
IMMUTABLE, MUTABLE, INDEXED = 1, 2, 3
first8 = operator.itemgetter(slice(0, 8))
after8 = operator.itemgetter(slice(8, None))


def inline(data: bytes) -> bytes:
    """The form of a name, sub-key or value inside an LMDB key (see module docstring)."""
    if len(data) < INLINE_LIMIT:
        return data
    return data[:INLINE_PREFIX] + hashlib.sha256(data).digest()


def name_key_of(key: bytes) -> bytes:
    """The keys/history table key of telstate key `key`."""
    return NAME + (key if len(key) < INLINE_LIMIT else inline(key))


def key_record(
    key_type: int, key_id: int, flags: int, key: bytes, value: bytes = b"", sealed: float = -1.0
) -> bytes:
    if len(key) >= INLINE_LIMIT:
        header = KEY_RECORD.pack(key_type, key_id, flags | FLAG_LONG_NAME, sealed)
        return header + U32.pack(len(key)) + key + value
    return KEY_RECORD.pack(key_type, key_id, flags & ~FLAG_LONG_NAME, sealed) + value


def record_body_offset(record: bytes | memoryview) -> int:
    """Where the value of an immutable key starts in its key record."""
    if record[9] & FLAG_LONG_NAME:
        return 22 + U32.unpack_from(record, 18)[0]
    return 18


def record_sealed(record: bytes | memoryview) -> float:
    """The last timestamp in the blocks of a mutable key (-1.0 if it has none)."""
    return TIMESTAMP.unpack_from(record, 10)[0]


def update_record(
    txn: Any,
    tables: Tables,
    name_key: bytes,
    flags: int | None = None,
    sealed: float | None = None,
) -> None:
    record = bytearray(txn.get(name_key, db=tables.keys))
    if flags is not None:
        record[9] = flags
    if sealed is not None:
        TIMESTAMP.pack_into(record, 10, sealed)
    txn.put(name_key, bytes(record), db=tables.keys)


def record_name(name_key: bytes, record: bytes | memoryview) -> bytes:
    """The telstate key of a keys table entry."""
    if len(name_key) == LONG_NAME_KEY_LEN:
        length = U32.unpack_from(record, 18)[0]
        return bytes(record[22 : 22 + length])
    return bytes(name_key[1:])


class Tables:
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
