"""The event log format: what one write looks like once it is recorded.

Every write that changes a store's state (``set_immutable``,
``add_mutable``, ``set_indexed``, ``delete``, ``clear``) is one event. The
log is an LMDB table mapping the event's sequence number, as 8 big-endian
bytes (so the table is in log order), to a record:

====== ======= ==============================================================
offset size    field (little-endian)
====== ======= ==============================================================
0      1       operation code: 1 set_immutable, 2 add_mutable,
               3 set_indexed, 4 delete, 5 clear
1      4       writer id (uint32): a row of the writers table
5      8       wall-clock time of the append (float64, seconds since the
               epoch; never less than the previous event's time)
13     8       sensor timestamp (float64; add_mutable only, else NaN)
21     4       key length *k* (uint32; 0 for clear)
25     4       sub-key length *s* (uint32; set_indexed only, else 0)
29     k       key, encoded as stored
29+k   s       sub-key, encoded as stored (msgpack)
29+k+s rest    value, encoded as stored (set_immutable, add_mutable,
               set_indexed; empty for delete and clear)
====== ======= ==============================================================

The writers table maps a writer id (4 big-endian bytes) to the msgpack
array ``[host, pid, name]`` of the process that wrote under it.

Nothing else in the package knows these layouts: :mod:`telstate.lmdb`
stores and reads records only through the functions here.
"""

from __future__ import annotations

import enum
import itertools
import math
import struct
from collections.abc import Sequence
from typing import Any, NamedTuple

import msgpack
import numpy as np

#: Version of the record layout above (stored in the store's meta table).
FORMAT_VERSION = 1


class Op(enum.Enum):
    """The kind of write an event records; the value is its name in logs and JSON."""

    SET_IMMUTABLE = "set_immutable"
    ADD_MUTABLE = "add_mutable"
    SET_INDEXED = "set_indexed"
    DELETE = "delete"
    CLEAR = "clear"


#: Operation codes of the record layout (see the module docstring).
SET_IMMUTABLE, ADD_MUTABLE, SET_INDEXED, DELETE, CLEAR = range(1, 6)

_HEADER = struct.Struct("<BIddII")
_TIME = struct.Struct("<5xd")
_SEQ = struct.Struct(">Q")
_WRITER_ID = struct.Struct(">I")
_NAN = math.nan

#: Raw fields of a record: (op code, writer id, time, timestamp, key, sub-key, value).
RawEvent = tuple[int, int, float, float, bytes, bytes, bytes]


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
        Encoded key, exactly as stored; None for :attr:`Op.CLEAR`.
    sub_key
        Encoded (msgpack) sub-key for :attr:`Op.SET_INDEXED`, else None.
    value
        Encoded value exactly as stored for set and add operations, else None.
    timestamp
        Sensor timestamp for :attr:`Op.ADD_MUTABLE`, else None.
    """

    __slots__ = ("seq", "time", "writer", "op", "key", "sub_key", "value", "timestamp")

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
    ) -> None:
        self.seq = seq
        self.time = time
        self.writer = writer
        self.op = op
        self.key = key
        self.sub_key = sub_key
        self.value = value
        self.timestamp = timestamp

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
        parts.append(f"time={self.time!r}")
        parts.append(f"writer={tuple(self.writer)!r}")
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
    """Make the log record of one event (see the module docstring for the layout)."""
    return b"".join(
        (
            _HEADER.pack(op_code, writer_id, time, timestamp, len(key), len(sub_key)),
            key,
            sub_key,
            value,
        )
    )


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
    if sub_key_end > len(record):
        raise ValueError("damaged log record: its key lengths overrun it")
    return (
        op_code,
        writer_id,
        time,
        timestamp,
        record[29:key_end],
        record[key_end:sub_key_end],
        record[sub_key_end:],
    )


def record_time(record: bytes | memoryview) -> float:
    """The append time of a log record, without decoding the rest."""
    return _TIME.unpack_from(record)[0]


def make_event(seq: int, raw: RawEvent, writer: Writer) -> Event:
    """Build the :class:`Event` for the raw fields of record `seq`."""
    op_code, _, time, timestamp, key, sub_key, value = raw
    if op_code == ADD_MUTABLE:
        return Event(seq, time, writer, Op.ADD_MUTABLE, key, None, value, timestamp)
    if op_code == SET_IMMUTABLE:
        return Event(seq, time, writer, Op.SET_IMMUTABLE, key, None, value)
    if op_code == SET_INDEXED:
        return Event(seq, time, writer, Op.SET_INDEXED, key, sub_key, value)
    if op_code == DELETE:
        return Event(seq, time, writer, Op.DELETE, key)
    if op_code == CLEAR:
        return Event(seq, time, writer, Op.CLEAR, None)
    raise ValueError(f"log record {seq} has unknown operation code {op_code}")


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
    values: Sequence[bytes | memoryview] | np.ndarray,
    sub_keys: Sequence[bytes] | None = None,
    timestamps: Sequence[float] | np.ndarray | None = None,
) -> list[bytes]:
    """The records of events of one kind on one key, as :func:`encode_record` makes each.

    `values` is a list of values, or a 2-D uint8 array with one value in
    each row (small values of one length, a sensor's samples mostly: their
    records are made all at once); `sub_keys` (set_indexed) and
    `timestamps` (add_mutable) go with them.
    """
    if isinstance(values, np.ndarray):
        return _encode_uniform(op_code, writer_id, time, key, values, timestamps)
    if len(values) == 1:  # every single write
        sub_key = b"" if sub_keys is None else sub_keys[0]
        timestamp = _NAN if timestamps is None else timestamps[0]
        return [encode_record(op_code, writer_id, time, key, sub_key, values[0], timestamp)]
    return [
        encode_record(op_code, writer_id, time, key, sub_key, value, timestamp)
        for sub_key, value, timestamp in zip(
            itertools.repeat(b"") if sub_keys is None else sub_keys,
            values,
            itertools.repeat(_NAN) if timestamps is None else timestamps,
        )
    ]


def _encode_uniform(
    op_code: int,
    writer_id: int,
    time: float,
    key: bytes,
    values: np.ndarray,
    timestamps: Sequence[float] | np.ndarray | None,
) -> list[bytes]:
    count, length = values.shape
    start = _HEADER.size + len(key)
    size = start + length
    table = np.empty((count, size), np.uint8)
    table[:, :start] = np.frombuffer(
        _HEADER.pack(op_code, writer_id, time, _NAN, len(key), 0) + key, np.uint8
    )
    if timestamps is not None:
        stamps = np.asarray(timestamps, dtype="<f8").reshape(count, 1)
        table[:, 13:21] = stamps.view(np.uint8)
    table[:, start:] = values
    buffer = table.tobytes()
    return [buffer[offset : offset + size] for offset in range(0, count * size, size)]
