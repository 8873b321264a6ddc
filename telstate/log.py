"""The event log format: what one write looks like once it is recorded.

Every write that changes a store's state (``set_immutable``,
``add_mutable``, ``set_indexed``, ``delete``, ``clear``) is one event, and
so is the promotion of a follower to primary (``promote``, which changes
no key; see :mod:`telstate.lmdb.follower`); an import
(:mod:`telstate.lmdb.bulk`) records a mutable key's samples as
``add_mutable_many`` events, each holding up to a few thousand samples of
one key (see below). The log is an LMDB table mapping the event's sequence
number, as 8 big-endian
bytes (so the table is in log order), to a record:

====== ======= ==============================================================
offset size    field (little-endian)
====== ======= ==============================================================
0      1       operation code: 1 set_immutable, 2 add_mutable,
               3 set_indexed, 4 delete, 5 clear, 6 promote,
               7 add_mutable_many
1      4       writer id (uint32): a row of the writers table
5      8       wall-clock time of the append (float64, seconds since the
               epoch; never less than the previous event's time)
13     8       sensor timestamp (float64; add_mutable only, else NaN)
21     4       key length *k* (uint32; 0 for clear and promote)
25     4       sub-key length *s* (uint32; set_indexed only, else 0)
29     k       key, encoded as stored
29+k   s       sub-key, encoded as stored (msgpack)
29+k+s v       value, encoded as stored (set_immutable, add_mutable,
               set_indexed; for promote, an encoded dict that says who
               was promoted when, see :func:`promotion_value`; empty for
               delete and clear); the samples for add_mutable_many (below)
end-32 32      chain hash (see below)
====== ======= ==============================================================

The samples of an add_mutable_many event
----------------------------------------
Its value field holds *n* samples of the key (*n* >= 1), in zset order
(by timestamp, then value bytes), each as a zset member would hold it:

====== ======= ==============================================================
offset size    field
====== ======= ==============================================================
0      4       *n* (uint32, little-endian)
4      8n      the timestamps (float64, big-endian, as packed in members)
4+8n   4n      the value lengths (uint32, little-endian)
4+12n  sum     the values, encoded as stored, one after another
====== ======= ==============================================================

Replaying it adds the *n* samples, exactly as *n* add_mutable events with
these timestamps and values would (a sample already there stays once).
Its sensor timestamp field is NaN. Only imports write these events, and
only for samples whose values are shorter than :data:`INLINE_LIMIT` (a
longer value is the value of its own add_mutable event, which the store
points at). The timestamps are canonical (not NaN, not negative, no -0.0)
and the samples distinct and in zset order: a field that breaks any of
this is damaged, and reading it raises ValueError.

The chain
---------
Every record ends with its *chain hash*, which ties it to the whole
history before it::

    chain_0 = SHA-256(b"telstate-chain-v1" || uuid.bytes)
    chain_n = SHA-256(chain_{n-1} || record_n without its last 32 bytes)

where ``uuid`` is the store's identity (16 bytes) and ``||`` is
concatenation. So the chain at seq *n* names the store and every byte of
events 1..n: two logs that agree on (UUID, seq, chain) hold the same
history, and changing any byte of any event changes the chain from that
event on. The chain is part of the stored record, so a follower copies
records verbatim and checks each with :func:`chain_matches`; the head of
the log (last seq and chain) is the last 32 bytes of the last record.

SHA-256 because it is what anyone can recompute (``sha256sum``, every
language's standard library) and is hardware-accelerated on current x86
and ARM CPUs: about 0.45 µs for a small event in CPython, less than the
call overhead of one LMDB put, and faster than BLAKE2b for large values.

Formats
-------
Format 1 (before the chain) had the same records without the last 32
bytes; ``telstate upgrade`` rewrites such a store's log in place
(:func:`telstate.lmdb.upgrade.upgrade`). Format 3 is format 2 with
add_mutable_many events. A store is created with format 2 and becomes
format 3 in the write transaction that appends its first add_mutable_many
event (nothing is rewritten), so a store that never imported stays
readable by telstate releases that know only format 2, and those refuse a
format 3 store when they open it instead of misreading its events.

The writers table maps a writer id (4 big-endian bytes) to the msgpack
array ``[host, pid, name]`` of the process that wrote under it.

Nothing else in the package knows these layouts: :mod:`telstate.lmdb`
stores and reads records only through the functions here.
"""

from __future__ import annotations

import enum
import hashlib
import itertools
import math
import struct
import uuid
from collections.abc import Sequence
from typing import Any, NamedTuple

import msgpack
import numpy as np

#: The newest version of the record layout above (stored in the store's meta table).
FORMAT_VERSION = 3
#: The format a store is created with; it holds no add_mutable_many events.
BASE_FORMAT = 2
#: The formats this telstate reads and writes.
FORMATS = frozenset((BASE_FORMAT, FORMAT_VERSION))

#: Size of a chain hash in bytes.
CHAIN_SIZE = 32
_CHAIN_DOMAIN = b"telstate-chain-v1"
_sha256 = hashlib.sha256


class Op(enum.Enum):
    """The kind of write an event records; the value is its name in logs and JSON."""

    SET_IMMUTABLE = "set_immutable"
    ADD_MUTABLE = "add_mutable"
    SET_INDEXED = "set_indexed"
    DELETE = "delete"
    CLEAR = "clear"
    #: A follower became the primary (no key; the value says who and when).
    PROMOTE = "promote"
    ADD_MUTABLE_MANY = "add_mutable_many"


#: Operation codes of the record layout (see the module docstring).
SET_IMMUTABLE, ADD_MUTABLE, SET_INDEXED, DELETE, CLEAR, PROMOTE = range(1, 7)
ADD_MUTABLE_MANY = 7
#: Every operation code a record may have.
OP_CODES = frozenset(range(1, 8))

_HEADER = struct.Struct("<BIddII")
#: The size of the shortest record: the header and the chain hash (no key, no value).
MIN_RECORD_SIZE = _HEADER.size + CHAIN_SIZE
_TIME = struct.Struct("<5xd")
_OP_WRITER = struct.Struct("<BI")
_SEQ = struct.Struct(">Q")
_WRITER_ID = struct.Struct(">I")
_COUNT = struct.Struct("<I")
#: Values of 480 bytes or more do not fit in an LMDB key (511 bytes at most)
#: beside their timestamp: the store keeps them in the log and points at them
#: (see :mod:`telstate.lmdb.layout`, which takes this constant from here), so
#: an add_mutable_many event holds only shorter ones.
INLINE_LIMIT = 480
#: The largest packed timestamp that is canonical (+inf, as big-endian bits):
#: above it are NaNs, and everything with the sign bit set (negatives and -0.0).
_LARGEST_TIMESTAMP = 0x7FF0_0000_0000_0000
_NAN = math.nan
# Offsets in the header (see the table above), for reading many records at once.
_STAMP = 13
_KEY_LENGTHS = 21
_NEGATIVE_ZERO = 1 << 63

#: Raw fields of a record: (op code, writer id, time, timestamp, key, sub-key, value, chain).
RawEvent = tuple[int, int, float, float, bytes, bytes, bytes, bytes]


class Writer(NamedTuple):
    """The process that appended an event.

    Attributes
    ----------
    host
        Host name of the machine.
    pid
        Process id.
    name
        The `writer_name` the store was opened with, or None.
    """

    host: str
    pid: int
    name: str | None


class Event:
    """One recorded write.

    Attributes
    ----------
    seq
        Sequence number: dense from 1 in the order of the writes.
    time
        Wall-clock time of the append (seconds since the epoch). Never
        less than the time of the event before it.
    writer
        Who wrote it.
    op
        What kind of write it was.
    key
        Encoded key, exactly as stored; None for :attr:`Op.CLEAR` and
        :attr:`Op.PROMOTE`.
    sub_key
        Encoded (msgpack) sub-key for :attr:`Op.SET_INDEXED`, else None.
    value
        Encoded value exactly as stored for set_immutable, add_mutable and
        set_indexed; for :attr:`Op.PROMOTE`, the encoded dict of
        :func:`promotion_value`; else None.
    timestamp
        Sensor timestamp for :attr:`Op.ADD_MUTABLE`, else None.
    values
        For :attr:`Op.ADD_MUTABLE_MANY`, the encoded values of its samples
        exactly as stored, in zset order; else None.
    timestamps
        For :attr:`Op.ADD_MUTABLE_MANY`, the sensor timestamps of its
        samples, one per value; else None.
    chain
        The chain hash of the log up to and including this event (32
        bytes; see :mod:`telstate.log`).
    """

    __slots__ = (
        "seq",
        "time",
        "writer",
        "op",
        "key",
        "sub_key",
        "value",
        "timestamp",
        "chain",
        "values",
        "timestamps",
    )

    def __init__(
        self,
        seq: int,
        time: float,
        writer: Writer,
        op: Op,
        key: bytes | None,
        sub_key: bytes | None = None,
        value: bytes | None = None,
        timestamp: float | None = None,
        chain: bytes = b"",
        values: list[bytes] | None = None,
        timestamps: list[float] | None = None,
    ) -> None:
        self.seq = seq
        self.time = time
        self.writer = writer
        self.op = op
        self.key = key
        self.sub_key = sub_key
        self.value = value
        self.timestamp = timestamp
        self.chain = chain
        self.values = values
        self.timestamps = timestamps

    def samples(self) -> list[tuple[bytes, float]]:
        """The (encoded value, timestamp) samples the event adds to its mutable key.

        One for :attr:`Op.ADD_MUTABLE`, all of them for
        :attr:`Op.ADD_MUTABLE_MANY`, none for other events.
        """
        if self.values is not None and self.timestamps is not None:
            return list(zip(self.values, self.timestamps))
        if self.op == Op.ADD_MUTABLE and self.value is not None and self.timestamp is not None:
            return [(self.value, self.timestamp)]
        return []

    def decode_value(self) -> Any:
        """Decode :attr:`value` with :func:`telstate.encoding.decode_value`.

        Raises
        ------
        ValueError
            If the event has no value (delete, clear).
        DecodeError
            If the value cannot be decoded (e.g. a pickle while pickles are
            not allowed).
        """
        if self.value is None:
            raise ValueError(f"a {self.op.value} event (seq {self.seq}) has no value")
        from .encoding import decode_value

        return decode_value(self.value)

    def decode_sub_key(self) -> Any:
        """Decode :attr:`sub_key` (always msgpack).

        Raises
        ------
        ValueError
            If the event has no sub-key (anything but set_indexed).
        DecodeError
            If the sub-key cannot be decoded.
        """
        if self.sub_key is None:
            raise ValueError(f"a {self.op.value} event (seq {self.seq}) has no sub-key")
        from .encoding import decode_value

        return decode_value(self.sub_key)

    def _fields(self) -> tuple:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Event):
            return NotImplemented
        return self._fields() == other._fields()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        parts = [f"seq={self.seq}", f"op={self.op.value}", f"key={self.key!r}"]
        if self.sub_key is not None:
            parts.append(f"sub_key={self.sub_key!r}")
        if self.value is not None:
            shown = self.value if len(self.value) <= 40 else self.value[:40] + b"..."
            parts.append(f"value={shown!r}")
        if self.timestamp is not None:
            parts.append(f"timestamp={self.timestamp!r}")
        if self.timestamps:
            first, last = self.timestamps[0], self.timestamps[-1]
            parts.append(f"samples={len(self.timestamps)} from {first!r} to {last!r}")
        parts.append(f"time={self.time!r}")
        parts.append(f"writer={tuple(self.writer)!r}")
        if self.chain:
            parts.append(f"chain={self.chain.hex()[:16]}...")
        return f"Event({', '.join(parts)})"


#: ``pack_seq(seq)``: the log table key of event `seq`.
pack_seq = _SEQ.pack


def unpack_seq(key: bytes) -> int:
    """The sequence number of a log table key."""
    return _SEQ.unpack(key)[0]


def encode_record(
    op_code: int,
    writer_id: int,
    time: float,
    key: bytes = b"",
    sub_key: bytes = b"",
    value: bytes | memoryview = b"",
    timestamp: float = _NAN,
) -> bytes:
    """Make the log record of one event without its chain hash; :func:`seal` adds it."""
    return b"".join(
        (
            _HEADER.pack(op_code, writer_id, time, timestamp, len(key), len(sub_key)),
            key,
            sub_key,
            value,
        )
    )


def chained_record(
    previous_chain: bytes,
    op_code: int,
    writer_id: int,
    time: float,
    key: bytes = b"",
    sub_key: bytes = b"",
    value: bytes = b"",
    timestamp: float = _NAN,
) -> bytes:
    """The full record of one event after the chain hash `previous_chain`.

    The same as ``seal(encode_record(...), previous_chain)``, in one call:
    this is on the path of every write.
    """
    body = b"".join(
        (
            _HEADER.pack(op_code, writer_id, time, timestamp, len(key), len(sub_key)),
            key,
            sub_key,
            value,
        )
    )
    return body + _sha256(previous_chain + body).digest()


def chain_records(bodies: Sequence[bytes], previous_chain: bytes) -> list[bytes]:
    """Consecutive events' full records: each body sealed (:func:`seal`) after the one before."""
    records = []
    chain = previous_chain
    for body in bodies:
        chain = _sha256(chain + body).digest()
        records.append(body + chain)
    return records


def genesis(store: uuid.UUID) -> bytes:
    """The chain hash before the first event (seq 0) of the store with identity `store`."""
    return _sha256(_CHAIN_DOMAIN + store.bytes).digest()


def seal(body: bytes, previous_chain: bytes) -> bytes:
    """The full record: `body` (from :func:`encode_record`) followed by its chain hash."""
    return body + _sha256(previous_chain + body).digest()


def record_chain(record: bytes | memoryview) -> bytes:
    """The chain hash stored in a record (its last 32 bytes)."""
    return bytes(record[-CHAIN_SIZE:])


def chain_matches(previous_chain: bytes, record: bytes | memoryview) -> bool:
    """Whether `record` carries the right chain hash, given the chain before it."""
    if len(record) < _HEADER.size + CHAIN_SIZE:
        return False
    digest = _sha256(previous_chain)
    digest.update(memoryview(record)[:-CHAIN_SIZE])  # (no copy of a long record)
    return digest.digest() == bytes(record[-CHAIN_SIZE:])


def chain_breaks(records: Sequence[bytes], previous_chain: bytes) -> tuple[list[int], bytes]:
    """Check the chain hashes of consecutive records (see the module docstring).

    Returns
    -------
    The indexes in `records` of those whose chain hash does not follow from
    the chain before them (or that are too short to carry one), and the
    chain stored in the last record (`previous_chain` if there is none).
    A record that fails is still followed from the chain it stores, so one
    altered event is reported once.
    """
    # verify checks every event: one tight loop, no function call per record.
    breaks = []
    sha256 = _sha256
    minimum = _HEADER.size + CHAIN_SIZE
    for index, record in enumerate(records):
        stored = record[-CHAIN_SIZE:]
        if (
            sha256(previous_chain + record[:-CHAIN_SIZE]).digest() != stored
            or len(record) < minimum
        ):
            breaks.append(index)
        previous_chain = stored
    return breaks, bytes(previous_chain)


def record_fields(records: Sequence[bytes]) -> tuple[list[int], list[int], list[bytes]]:
    """The op codes, writer ids and keys of `records`, as three lists.

    The fields that verify checks on every event, read without splitting
    the rest. A record that cannot be decoded gets op code 0 (no operation
    has it), writer id 0 and an empty key: :func:`decode_record` says why.
    """
    unpack = _HEADER.unpack_from
    start = _HEADER.size
    room = -(_HEADER.size + CHAIN_SIZE)
    ops: list[int] = []
    writer_ids: list[int] = []
    keys: list[bytes] = []
    try:
        for record in records:
            op_code, writer_id, _, _, key_len, sub_key_len = unpack(record)
            if key_len + sub_key_len > len(record) + room:
                raise ValueError("its key lengths overrun it")
            ops.append(op_code)
            writer_ids.append(writer_id)
            keys.append(record[start : start + key_len])
    except (struct.error, ValueError, TypeError):
        return _record_fields_one_by_one(records)
    return ops, writer_ids, keys


def _record_fields_one_by_one(
    records: Sequence[bytes],
) -> tuple[list[int], list[int], list[bytes]]:
    ops: list[int] = []
    writer_ids: list[int] = []
    keys: list[bytes] = []
    for record in records:
        try:
            op_code, writer_id, _, _, key, _, _, _ = decode_record(record)
        except ValueError:
            op_code, writer_id, key = 0, 0, b""
        ops.append(op_code)
        writer_ids.append(writer_id)
        keys.append(key)
    return ops, writer_ids, keys


def sample_rows(records: Sequence[bytes]) -> tuple[bytes, np.ndarray] | None:
    """The members that `records` add to a mutable key, as rows of a 2-D uint8 array.

    Each row is the member an ``add_mutable`` event adds: its sensor
    timestamp packed as :func:`telstate.utils.pack_timestamp` packs it,
    followed by its value. Returns (key, rows), in the order of `records`,
    or None unless every record is a decodable ``add_mutable`` of one key
    with a value of one length (then decode them one by one): a sensor's
    samples mostly are, and this reads them all at once.
    """
    lengths = set(map(len, records))
    if len(lengths) != 1:
        return None
    length = lengths.pop()
    start = _HEADER.size
    if length < start + CHAIN_SIZE:
        return None
    first = records[0]
    op_code, _, _, _, key_len, sub_key_len = _HEADER.unpack_from(first)
    key_end = start + key_len
    if op_code != ADD_MUTABLE or sub_key_len or key_end > length - CHAIN_SIZE:
        return None  # (looked at before the records are joined: they may be long)
    table = np.frombuffer(b"".join(records), np.uint8).reshape(len(records), length)
    # Every record has the first one's op code, lengths and key.
    fixed = np.frombuffer(first, np.uint8)
    if not (
        (table[:, 0] == ADD_MUTABLE).all()
        and (table[:, _KEY_LENGTHS:key_end] == fixed[_KEY_LENGTHS:key_end]).all()
    ):
        return None
    count = len(records)
    value_len = length - CHAIN_SIZE - key_end
    stamps = table[:, _STAMP : _STAMP + 8].copy().view("<u8").reshape(count)
    # pack_timestamp packs -0.0 as 0.0; the bytes are swapped as integers, so
    # that every NaN keeps its bits as struct keeps them.
    stamps[stamps == _NEGATIVE_ZERO] = 0
    rows = np.empty((count, 8 + value_len), np.uint8)
    rows[:, :8] = stamps.astype(">u8").view(np.uint8).reshape(count, 8)
    rows[:, 8:] = table[:, key_end : key_end + value_len]
    return first[start:key_end], rows


def decode_header(record: bytes | memoryview) -> tuple[int, int]:
    """The op code and writer id of a log record, once its shape is checked.

    Raises
    ------
    ValueError
        If the record is too short for its header, chain hash and keys, or
        its op code is unknown.
    """
    try:
        op_code, writer_id, _, _, key_len, sub_key_len = _HEADER.unpack_from(record)
    except (struct.error, TypeError) as error:
        raise ValueError(f"damaged log record: {error}") from None
    if _HEADER.size + key_len + sub_key_len + CHAIN_SIZE > len(record):
        raise ValueError("damaged log record: its key lengths overrun it")
    if op_code not in OP_CODES:
        raise ValueError(f"damaged log record: unknown operation code {op_code}")
    return op_code, writer_id


def decode_record(record: bytes) -> RawEvent:
    """Split a log record into its raw fields; see :data:`RawEvent`.

    Absent fields come back empty (bytes) or NaN (timestamp).

    Raises
    ------
    ValueError
        If the record is missing, truncated or its lengths overrun it.
    """
    try:
        op_code, writer_id, time, timestamp, key_len, sub_key_len = _HEADER.unpack_from(record)
    except (struct.error, TypeError) as error:
        raise ValueError(f"damaged log record: {error}") from None
    key_end = 29 + key_len
    sub_key_end = key_end + sub_key_len
    value_end = len(record) - CHAIN_SIZE
    if sub_key_end > value_end:
        raise ValueError("damaged log record: its key lengths overrun it")
    return (
        op_code,
        writer_id,
        time,
        timestamp,
        record[29:key_end],
        record[key_end:sub_key_end],
        record[sub_key_end:value_end],
        record[value_end:],
    )


def encode_samples(members: Sequence[bytes]) -> bytes:
    """The value field of an add_mutable_many event adding `members`.

    `members` are packed zset members (8-byte big-endian timestamp, then
    the encoded value), at least one, in zset order.
    """
    count = len(members)
    size = len(members[0])
    joined = b"".join(members)
    if len(joined) == count * size and max(map(len, members)) == size:
        # Lengths that add up to count * size and none above it: all the same.
        return encode_uniform_samples(joined, size)
    lengths = np.fromiter(map(len, members), np.int64, count) - 8
    return b"".join(
        (
            _COUNT.pack(count),
            b"".join([member[:8] for member in members]),
            lengths.astype("<u4").tobytes(),
            *[member[8:] for member in members],
        )
    )


def encode_uniform_samples(buffer: bytes, size: int) -> bytes:
    """:func:`encode_samples` of members that all have `size` bytes, concatenated in `buffer`.

    Laid out with numpy at once (a sensor's float samples, mostly).
    """
    table = np.frombuffer(buffer, np.uint8).reshape(-1, size)
    count = len(table)
    return b"".join(
        (
            _COUNT.pack(count),
            table[:, :8].tobytes(),
            np.full(count, size - 8, "<u4").tobytes(),
            table[:, 8:].tobytes(),
        )
    )


def _split_samples(payload: bytes) -> tuple[int, list[bytes]]:
    """The sample count of an add_mutable_many value field, and its values.

    Raises
    ------
    ValueError
        If the field is not *n* >= 1 samples that fill it exactly, with
        canonical timestamps, values shorter than :data:`INLINE_LIMIT`,
        distinct and in zset order.
    """
    try:
        count = _COUNT.unpack_from(payload)[0]
        lengths = struct.unpack_from(f"<{count}I", payload, 4 + 8 * count)
    except struct.error:
        raise ValueError("damaged samples: shorter than their count says") from None
    start = 4 + 12 * count
    if not count or start + sum(lengths) != len(payload):
        raise ValueError(f"damaged samples: {count} samples do not fill {len(payload)} bytes")
    longest = max(lengths)
    if longest >= INLINE_LIMIT:
        raise ValueError(
            f"damaged samples: a value of {longest} bytes (they must be under {INLINE_LIMIT})"
        )
    offsets = list(itertools.accumulate(lengths, initial=start))
    values = [payload[begin:end] for begin, end in zip(offsets, offsets[1:])]
    # Canonical timestamps sort as their big-endian bits do.
    bits = np.frombuffer(payload, ">u8", count, 4)
    if (bits > _LARGEST_TIMESTAMP).any():
        raise ValueError("damaged samples: a timestamp is NaN, negative or -0.0")
    if (bits[1:] < bits[:-1]).any():
        raise ValueError("damaged samples: the timestamps are not in order")
    for index in np.flatnonzero(bits[1:] == bits[:-1]).tolist():
        if values[index] >= values[index + 1]:
            raise ValueError("damaged samples: samples are repeated or not in order")
    return count, values


def decode_samples(payload: bytes) -> tuple[list[float], list[bytes]]:
    """The (timestamps, values) of an add_mutable_many event's value field.

    Raises
    ------
    ValueError
        If the field is damaged.
    """
    count, values = _split_samples(payload)
    return list(struct.unpack_from(f">{count}d", payload, 4)), values


def sample_members(payload: bytes) -> list[bytes]:
    """The packed zset members (timestamp + value) of an add_mutable_many event's value field.

    Raises
    ------
    ValueError
        If the field is damaged.
    """
    _, values = _split_samples(payload)
    return [payload[4 + 8 * index : 12 + 8 * index] + value for index, value in enumerate(values)]


def sample_member_rows(payload: bytes) -> np.ndarray | None:
    """The members of an add_mutable_many event's value field as rows of a 2-D uint8 array.

    Each row is a packed member (timestamp, then value), as
    :func:`sample_rows` gives those of add_mutable events, read at once.
    Only for a field whose values all have one length and whose timestamps
    increase (a sensor's samples, mostly); None for any other, damaged or
    not: :func:`sample_members` reads those, or says why they are damaged.
    """
    if len(payload) < _COUNT.size:
        return None
    count = _COUNT.unpack_from(payload)[0]
    start = 4 + 12 * count
    if not count or len(payload) < start or (len(payload) - start) % count:
        return None
    width = (len(payload) - start) // count
    if (
        width >= INLINE_LIMIT
        or (np.frombuffer(payload, "<u4", count, 4 + 8 * count) != width).any()
    ):
        return None
    bits = np.frombuffer(payload, ">u8", count, 4)
    if bits[-1] > _LARGEST_TIMESTAMP or not (bits[1:] > bits[:-1]).all():
        return None  # (increasing: the last is the largest)
    rows = np.empty((count, 8 + width), np.uint8)
    rows[:, :8] = bits.view(np.uint8).reshape(count, 8)
    rows[:, 8:] = np.frombuffer(payload, np.uint8, count * width, start).reshape(count, width)
    return rows


def record_time(record: bytes | memoryview) -> float:
    """The append time of a log record, without decoding the rest."""
    return _TIME.unpack_from(record)[0]


def record_op_writer(record: bytes | memoryview) -> tuple[int, int]:
    """The operation code and writer id of a log record, without decoding the rest."""
    return _OP_WRITER.unpack_from(record)


def make_event(seq: int, raw: RawEvent, writer: Writer) -> Event:
    """Build the :class:`Event` for the raw fields of record `seq`."""
    op_code, _, time, timestamp, key, sub_key, value, chain = raw
    if op_code == ADD_MUTABLE:
        return Event(seq, time, writer, Op.ADD_MUTABLE, key, None, value, timestamp, chain)
    if op_code == SET_IMMUTABLE:
        return Event(seq, time, writer, Op.SET_IMMUTABLE, key, None, value, None, chain)
    if op_code == SET_INDEXED:
        return Event(seq, time, writer, Op.SET_INDEXED, key, sub_key, value, None, chain)
    if op_code == DELETE:
        return Event(seq, time, writer, Op.DELETE, key, None, None, None, chain)
    if op_code == CLEAR:
        return Event(seq, time, writer, Op.CLEAR, None, None, None, None, chain)
    if op_code == ADD_MUTABLE_MANY:
        stamps, values = decode_samples(value)
        return Event(
            seq, time, writer, Op.ADD_MUTABLE_MANY, key, None, None, None, chain, values, stamps
        )
    if op_code == PROMOTE:
        return Event(seq, time, writer, Op.PROMOTE, None, None, value, None, chain)
    raise ValueError(f"log record {seq} has unknown operation code {op_code}")


def promotion_value(previous: str, primary: str, host: str, path: str, time: float) -> bytes:
    """The value of a promote event: an encoded (:func:`telstate.encoding.encode_value`) dict.

    Its keys: ``previous`` (the primary the store followed until then, as
    the follower named it), ``primary`` (the name of the new primary),
    ``host`` and ``path`` (where the promoted store lives) and ``time``
    (seconds since the epoch).
    """
    from .encoding import encode_value

    return encode_value(
        {"previous": previous, "primary": primary, "host": host, "path": path, "time": time}
    )


def pack_writer_id(writer_id: int) -> bytes:
    """The writers table key of `writer_id`."""
    return _WRITER_ID.pack(writer_id)


def unpack_writer_id(key: bytes) -> int:
    """The writer id of a writers table key."""
    return _WRITER_ID.unpack(key)[0]


def encode_writer(writer: Writer) -> bytes:
    """The writers table value for `writer`."""
    return msgpack.packb([writer.host, writer.pid, writer.name])


def decode_writer(data: bytes) -> Writer:
    """Inverse of :func:`encode_writer`.

    Raises
    ------
    ValueError
        If `data` is not a writer record.
    """
    try:
        host, pid, name = msgpack.unpackb(data)
    except Exception as error:
        raise ValueError(f"damaged writer record {data!r}") from error
    return Writer(host, pid, name)


def encode_records(
    op_code: int,
    writer_id: int,
    time: float,
    key: bytes,
    values: Sequence[bytes | memoryview],
    sub_keys: Sequence[bytes] | None = None,
    timestamps: Sequence[float] | np.ndarray | None = None,
) -> list[bytes]:
    """The records of events of one kind on one key, as :func:`encode_record` makes each
    (without their chain hashes: :func:`chain_records` adds them).

    `sub_keys` (set_indexed) and `timestamps` (add_mutable) go with the `values`.
    """
    return [
        encode_record(op_code, writer_id, time, key, sub_key, value, timestamp)
        for sub_key, value, timestamp in zip(
            itertools.repeat(b"") if sub_keys is None else sub_keys,
            values,
            itertools.repeat(_NAN) if timestamps is None else timestamps,
        )
    ]


# --- projections -----------------------------------------------------------------------

#: RDB AUX fields in which an RDB file (``telstate export``, a snapshot) records the
#: (store UUID, seq, chain hex) of the log position whose state it holds.
AUX_STORE = b"telstate-store"
AUX_SEQ = b"telstate-seq"
AUX_CHAIN = b"telstate-chain"
# What telstate export wrote before the chain, still read.
_AUX_OLD_STORE = b"telstate-store-uuid"


def position_aux(store: uuid.UUID, seq: int, chain: bytes) -> dict[bytes, bytes]:
    """The AUX fields that record the log position (store, seq, chain)."""
    return {AUX_STORE: str(store).encode(), AUX_SEQ: b"%d" % seq, AUX_CHAIN: chain.hex().encode()}


def position_from_aux(aux: dict[bytes, bytes]) -> tuple[uuid.UUID, int, bytes] | None:
    """The (store, seq, chain) that AUX fields claim; None if they claim none (or garble it)."""
    try:
        store = uuid.UUID(aux.get(AUX_STORE, aux.get(_AUX_OLD_STORE, b"")).decode())
        seq = int(aux[AUX_SEQ])
        chain = bytes.fromhex(aux[AUX_CHAIN].decode())
    except (KeyError, ValueError, UnicodeDecodeError):
        return None
    if seq < 0 or len(chain) != CHAIN_SIZE:
        return None
    return store, seq, chain
