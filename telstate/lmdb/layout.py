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
    identity, made at creation; ``next_key_id`` → 8-byte counter;
    ``follows`` → the name of the primary (UTF-8) of a follower store,
    absent in a primary (see :mod:`telstate.lmdb.follower`);
    ``request:`` + request id → the outcome of a remote write request
    (:class:`RequestRecord`), written in the transaction that applied it,
    so that a request delivered twice is applied once
    (:mod:`replicator.intake`; removed once it can no longer be delivered).
    ``import:`` + 16-byte digest of the record → an import of a file in
    progress (:class:`ImportRecord`): written in the transaction of an
    import's first chunk when it has more than one, deleted in that of its
    last, so it stays if the import was killed or failed half-way (see
    :mod:`telstate.lmdb.bulk`); deleted when the store becomes a follower
    (a copy made during an import: the primary finishes it). Stores without such entries (all stores
    of earlier releases) have no unfinished import.
``log``
    8-byte big-endian seq → event record (:mod:`telstate.log`).
``writers``
    4-byte writer id → ``[host, pid, name]`` of a writing process.
``keys``
    ``0x01`` + inline key → key record: type (1 byte: 1 immutable,
    2 mutable, 3 indexed), key id (8 bytes, new for every creation of the
    key), flags (1 byte: 1 = long name, 2 = long sample values), the last
    timestamp sealed into blocks (float64; ``NO_SEALED`` = -1 if none: sample
    timestamps are never negative), then for a long
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
import threading
from typing import Any, NamedTuple

import lmdb
import msgpack

from .. import log
from ..errors import StoreError
from ..utils import KeyType

# Inline forms (see the module docstring). The limit is defined with the log
# format, whose add_mutable_many events hold only values shorter than it.
INLINE_LIMIT = log.INLINE_LIMIT
INLINE_PREFIX = 448
NAME = b"\x01"
ALL_KEYS = b"\x00"
LONG_NAME_KEY_LEN = 1 + INLINE_LIMIT
LONG_SAMPLE_LEN = 8 + INLINE_LIMIT
LONG_PADDING = bytes(INLINE_LIMIT - INLINE_PREFIX - 8)

# Type code, key id, flags, sealed timestamp: the fixed start of a key record.
_KEY_HEADER = struct.Struct(">B8sBd")
_unpack_header = _KEY_HEADER.unpack_from
_HEADER_SIZE = _KEY_HEADER.size
KEY_ID = struct.Struct(">Q")
U32 = struct.Struct(">I")
TIMESTAMP = struct.Struct(">d")
FLAG_LONG_NAME = 1
FLAG_LONG_VALUES = 2
TYPE_BY_CODE = {1: KeyType.IMMUTABLE, 2: KeyType.MUTABLE, 3: KeyType.INDEXED}
IMMUTABLE, MUTABLE, INDEXED = 1, 2, 3
#: The sealed timestamp of a key without blocks: below every sample timestamp,
#: which the sample engine keeps in [0, inf].
NO_SEALED = -1.0
first8 = operator.itemgetter(slice(0, 8))
after8 = operator.itemgetter(slice(8, None))
_new_tuple = tuple.__new__


def inline(data: bytes) -> bytes:
    """The form of a name, sub-key or value inside an LMDB key (see module docstring)."""
    if len(data) < INLINE_LIMIT:
        return data
    return data[:INLINE_PREFIX] + hashlib.sha256(data).digest()


def name_key_of(key: bytes) -> bytes:
    """The keys/history table key of telstate key `key`."""
    return NAME + (key if len(key) < INLINE_LIMIT else inline(key))


class KeyRecord(NamedTuple):
    """A key's record in the keys table, decoded (see the ``keys`` table above).

    `name` is the full name of a key whose name is too long for its table
    key (``FLAG_LONG_NAME`` is set exactly then), None otherwise; `value`
    is the value of an immutable key, empty for the other types.
    """

    type_code: int
    key_id: bytes
    flags: int
    sealed: float
    name: bytes | None
    value: bytes

    @classmethod
    def new(cls, type_code: int, key_id: bytes, key: bytes, value: bytes = b"") -> KeyRecord:
        """The record of a key just created, with no samples sealed."""
        if len(key) >= INLINE_LIMIT:
            return cls(type_code, key_id, FLAG_LONG_NAME, NO_SEALED, key, value)
        return cls(type_code, key_id, 0, NO_SEALED, None, value)

    @classmethod
    def decode(cls, data: bytes | memoryview) -> KeyRecord:
        """The record stored as `data`.

        Raises
        ------
        StoreError
            If `data` is not a key record (the store is damaged).
        """
        try:
            type_code, key_id, flags, sealed = _unpack_header(data)
        except struct.error:
            raise StoreError(f"damaged key record ({len(data)} bytes)") from None
        if flags & FLAG_LONG_NAME or type_code not in TYPE_BY_CODE:
            return cls._decode_long(data, type_code, key_id, flags, sealed)
        # Every read decodes a record: skip the generated __new__ (a Python call).
        return _new_tuple(cls, (type_code, key_id, flags, sealed, None, bytes(data[_HEADER_SIZE:])))

    @classmethod
    def _decode_long(
        cls, data: bytes | memoryview, type_code: int, key_id: bytes, flags: int, sealed: float
    ) -> KeyRecord:
        if type_code not in TYPE_BY_CODE:
            raise StoreError(f"damaged key record: unknown type code {type_code}")
        if len(data) < _HEADER_SIZE + U32.size:
            raise StoreError("damaged key record: its name length is missing")
        length = U32.unpack_from(data, _HEADER_SIZE)[0]
        start = _HEADER_SIZE + U32.size
        if start + length > len(data):
            raise StoreError("damaged key record: its name length overruns it")
        name = bytes(data[start : start + length])
        return cls(type_code, key_id, flags, sealed, name, bytes(data[start + length :]))

    @staticmethod
    def type_of(data: bytes | memoryview) -> KeyType:
        """The type of the key of an encoded record, without decoding the rest.

        Raises
        ------
        StoreError
            If the type code is unknown (the store is damaged).
        """
        key_type = TYPE_BY_CODE.get(data[0])
        if key_type is None:
            raise StoreError(f"damaged key record: unknown type code {data[0]}")
        return key_type

    @property
    def key_type(self) -> KeyType:
        """The key's type (KeyError for an unknown type code)."""
        return TYPE_BY_CODE[self.type_code]

    def encode(self) -> bytes:
        """The record as stored in the keys table."""
        header = _KEY_HEADER.pack(self.type_code, self.key_id, self.flags, self.sealed)
        if self.name is None:
            return header + self.value
        return header + U32.pack(len(self.name)) + self.name + self.value


def update_record(
    txn: Any,
    tables: Tables,
    name_key: bytes,
    flags: int | None = None,
    sealed: float | None = None,
) -> None:
    """Change the flags or the sealed timestamp of a key's record."""
    data = txn.get(name_key, db=tables.keys)
    if data is None:
        raise StoreError(f"the keys table lost the record of {name_key[1:20]!r}")
    record = KeyRecord.decode(data)
    if flags is not None:
        record = record._replace(flags=flags)
    if sealed is not None:
        record = record._replace(sealed=sealed)
    checked_put(txn, name_key, record.encode(), tables.keys)


#: The type of the key of an encoded key record, without decoding the rest.
key_type_of = KeyRecord.type_of


def key_record(txn: Any, tables: Tables, name_key: bytes) -> KeyRecord | None:
    """The decoded keys-table record at `name_key`, or None if there is no such key."""
    # get(key, default, db) by position: py-lmdb parses keywords slowly.
    data = txn.get(name_key, None, tables.keys)
    return None if data is None else KeyRecord.decode(data)


def checked_put(
    txn: Any, key: bytes, value: bytes, db: Any, *, append: bool = False, dupdata: bool = True
) -> None:
    """``txn.put``, raising StoreError where py-lmdb returns False instead of raising.

    With ``append=True`` LMDB refuses a key that does not sort after the
    last one; py-lmdb reports that only through the result. Committing
    anyway would, for the log, leave state changes without their event.

    Raises
    ------
    StoreError
        If the put was refused (out-of-order append, or an existing
        duplicate with ``dupdata=False``).
    """
    if not txn.put(key, value, append=append, dupdata=dupdata, db=db):
        what = "append out of order" if append else "put refused"
        raise StoreError(f"LMDB {what}: key {bytes(key[:24]).hex()} (the store may be damaged)")


def record_name(name_key: bytes, record: bytes | memoryview) -> bytes:
    """The telstate key of a keys table entry."""
    if len(name_key) == LONG_NAME_KEY_LEN:
        name = KeyRecord.decode(record).name
        if name is None:
            raise StoreError("damaged key record: a long name key without its name")
        return name
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


#: The meta table entry naming a follower's primary (see the module docstring).
FOLLOWS = b"follows"


def primary_in(txn: Any, tables: Tables) -> str | None:
    """The primary that the store follows, or None if it is a primary itself."""
    data = txn.get(FOLLOWS, db=tables.meta)
    return None if data is None else bytes(data).decode("utf-8", errors="replace")


#: Prefix of the request records in the meta table (see the module docstring).
REQUEST_PREFIX = b"request:"


# Holds `pack`, this thread's msgpack packer of request records (a Packer is not thread-safe).
_packer = threading.local()


class RequestRecord(NamedTuple):
    """The outcome of a remote write request, kept in the meta table.

    `expires_ms` is the server time after which the request cannot be
    delivered again (the record may then go); `seq` the last event of the
    log once it was applied (the mirror must reach it before the reply);
    `status`, `value`, `error` and `message` the reply
    (:class:`telstate.remote.Reply`).
    """

    expires_ms: int
    seq: int
    status: bytes
    value: bytes
    error: bytes
    message: str

    def encode(self) -> bytes:
        """The record as stored: a msgpack array of the six fields."""
        # Every remote write encodes one: a Packer of this thread's, where
        # msgpack.packb would make one per call (most of its cost).
        try:
            pack = _packer.pack
        except AttributeError:
            pack = _packer.pack = msgpack.Packer(use_bin_type=True).pack
        return pack(self)

    @classmethod
    def damaged(cls, expires_ms: int, what: str) -> RequestRecord:
        """The record that stands for a damaged one: its request's outcome is unknown.

        `what` names the request in the message. Never applied again (a
        clear or delete applied twice would undo the writes between).
        """
        return cls(
            expires_ms,
            0,
            b"error",
            b"",
            b"damaged",
            f"{what}: the log host's record of it is damaged, so whether it was applied is"
            " unknown: not applied again (see telstate history and telstate verify on the"
            " log host)",
        )

    @classmethod
    def decode(cls, data: bytes | memoryview) -> RequestRecord:
        """The record stored as `data` (ValueError if it is not one)."""
        try:
            return cls(*msgpack.unpackb(bytes(data), raw=False))
        except (TypeError, ValueError, msgpack.UnpackException) as error:
            raise ValueError(f"damaged request record: {error}") from None

    @classmethod
    def expires_of(cls, data: bytes | memoryview) -> int:
        """The `expires_ms` of the record stored as `data`, or -1 if it is damaged.

        Read without decoding the rest where it can be: the sweep looks at
        every record.
        """
        # msgpack: a 6-array (0x96), then expires_ms as a uint64 (0xcf), as
        # every time since 1970-02-19 (2**32 ms) is encoded.
        if len(data) >= 10 and data[0] == 0x96 and data[1] == 0xCF:
            return int.from_bytes(data[2:10], "big")
        try:
            expires_ms = cls.decode(data).expires_ms
        except ValueError:
            return -1
        return expires_ms if isinstance(expires_ms, int) else -1


def request_record_in(txn: Any, tables: Tables, request_id: bytes) -> RequestRecord | None:
    """The recorded outcome of the remote write request `request_id`, or None.

    Raises
    ------
    ValueError
        If the record is damaged.
    """
    found = txn.get(REQUEST_PREFIX + request_id, db=tables.meta)
    return None if found is None else RequestRecord.decode(found)


#: Prefix of the records of imports in progress (see the module docstring).
IMPORT_PREFIX = b"import:"


class ImportRecord(NamedTuple):
    """A file whose import into the store has begun and not finished.

    `file` is its absolute path (or the name of a stream); `size` and
    `mtime_ns` are its size and modification time when the import began,
    None if it is not a regular file. A stream, which has neither, has a
    random `nonce` instead (hex), so that the import of another stream,
    named alike, never takes it for its own (None for a regular file).
    """

    file: str
    size: int | None
    mtime_ns: int | None
    nonce: str | None = None

    def encode(self) -> bytes:
        """The record as stored: a msgpack array of the fields (three without a nonce)."""
        fields = tuple(self) if self.nonce is not None else tuple(self)[:3]
        return msgpack.packb(fields, use_bin_type=True)

    @property
    def entry(self) -> bytes:
        """Its meta table key: one per file (and size and time, or nonce): others keep theirs."""
        return IMPORT_PREFIX + hashlib.blake2b(self.encode(), digest_size=16).digest()

    @classmethod
    def decode(cls, data: bytes | memoryview) -> ImportRecord:
        """The record stored as `data`.

        Raises
        ------
        StoreError
            If `data` is not an import record (the store is damaged).
        """
        try:
            file, size, mtime_ns, *nonce = msgpack.unpackb(bytes(data), raw=False)
            if len(nonce) > 1:
                raise ValueError(f"{3 + len(nonce)} fields")
            return cls(str(file), size, mtime_ns, str(nonce[0]) if nonce else None)
        except (TypeError, ValueError, msgpack.UnpackException) as error:
            raise StoreError(f"damaged import record in the meta table: {error}") from None


def unfinished_imports_in(txn: Any, tables: Tables) -> list[ImportRecord]:
    """The imports begun in the store and not finished (in the order of their digests)."""
    found = []
    cursor = txn.cursor(tables.meta)
    if cursor.set_range(IMPORT_PREFIX):
        for entry, data in cursor:
            if not bytes(entry).startswith(IMPORT_PREFIX):
                break
            found.append(ImportRecord.decode(data))
    return found


def clear_imports_in(txn: Any, tables: Tables) -> None:
    """Delete every record of an import in progress (a follower's imports are its primary's)."""
    cursor = txn.cursor(tables.meta)
    if cursor.set_range(IMPORT_PREFIX):
        while bytes(cursor.key()).startswith(IMPORT_PREFIX):
            if not cursor.delete():
                return
