"""The event log table: appending events, reading them, and the frontend's key updates.

The record format of an event is :mod:`telstate.log`'s; the tables that
hold the log, the writers and the history index are described in
:mod:`telstate.lmdb.layout`. Every event made by this store enters the
log through :func:`append_event` (one) or :func:`append_events` (several
of one kind); a record made elsewhere (a follower's copy of its primary's
event, a promotion) through :func:`append_record`.

Reads come in chunks, each in its own short read transaction; a chunk
ends after ``settings.LOG_CHUNK`` events or once it holds
``settings.LOG_CHUNK_BYTES`` bytes of records, whichever comes first (it
always holds at least one event), so reading big events stays bounded
in memory.
"""

from __future__ import annotations

import heapq
import itertools
import math
import struct
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from .. import log
from ..backend import ImmutableKeyUpdate, IndexedKeyUpdate, KeyUpdateBase, MutableKeyUpdate
from ..errors import StoreError
from ..log import Event, Op, Writer
from . import settings
from .layout import Tables


def append_event(
    txn: Any,
    tables: Tables,
    seq: int,
    previous_chain: bytes,
    name_key: bytes,
    op_code: int,
    writer_id: int,
    time: float,
    key: bytes,
    sub_key: bytes,
    value: bytes,
    timestamp: float,
) -> bytes:
    """Append event `seq`, chained after `previous_chain`; return its chain hash.

    The path of every single write: one call builds and chains the record
    (see :func:`telstate.log.chained_record`), two plain puts by position
    (py-lmdb parses keywords slowly, 0.25 us a put): dupdata, overwrite,
    append. `seq` must be one more than the last event's.

    Raises
    ------
    StoreError
        If LMDB refused an append (`seq` is not past the last event).
    """
    seq_key = log.pack_seq(seq)
    record = log.chained_record(
        previous_chain, op_code, writer_id, time, key, sub_key, value, timestamp
    )
    if not (
        txn.put(seq_key, record, True, True, True, tables.log)
        and txn.put(name_key, seq_key, True, True, True, tables.history)
    ):
        raise _out_of_order(seq)
    return record[-log.CHAIN_SIZE :]


def _out_of_order(first_seq: int) -> StoreError:
    return StoreError(
        f"LMDB append out of order: events from {first_seq} on are not "
        "past the last one (the store may be damaged)"
    )


def append_events(
    txn: Any,
    tables: Tables,
    first_seq: int,
    previous_chain: bytes,
    name_key: bytes,
    op_code: int,
    writer_id: int,
    time: float,
    key: bytes,
    values: Sequence[bytes | memoryview],
    sub_keys: Sequence[bytes] | None = None,
    timestamps: Sequence[float] | np.ndarray | None = None,
) -> bytes:
    """Append events `first_seq`, `first_seq` + 1, ... of one kind on one key; return the chain.

    Each record carries the chain hash over the one before (`previous_chain`
    is event `first_seq` - 1's, or the store's genesis hash; see
    :mod:`telstate.log`); the chain of the last one is returned.

    Imports (:mod:`telstate.lmdb.bulk`) append many; one value goes
    through :func:`append_event`. See
    :func:`telstate.log.encode_records` for `values`, `sub_keys` and
    `timestamps`. `first_seq` must be one more than the last event's;
    every put is an append (seqs grow, in the log and among each key's
    duplicates), and LMDB refusing one raises StoreError, so that the
    transaction is not committed with state changes lacking their events.

    Raises
    ------
    StoreError
        If LMDB refused an append (`first_seq` is not past the last event).
    """
    if len(values) == 1:
        value = values[0]
        return append_event(
            txn,
            tables,
            first_seq,
            previous_chain,
            name_key,
            op_code,
            writer_id,
            time,
            key,
            b"" if sub_keys is None else sub_keys[0],
            value if type(value) is bytes else bytes(value),
            math.nan if timestamps is None else timestamps[0],
        )
    bodies = log.encode_records(op_code, writer_id, time, key, values, sub_keys, timestamps)
    records = log.chain_records(bodies, previous_chain)
    count = len(records)
    seq_keys = list(map(log.pack_seq, range(first_seq, first_seq + count)))
    appended = txn.cursor(tables.log).putmulti(zip(seq_keys, records), append=True) == (
        count,
        count,
    ) and txn.cursor(tables.history).putmulti(
        zip(itertools.repeat(name_key), seq_keys), dupdata=True, append=True
    ) == (count, count)
    if not appended:
        raise _out_of_order(first_seq)
    return records[-1][-log.CHAIN_SIZE :]


def append_record(
    txn: Any, tables: Tables, seq: int, name_key: bytes | None, record: bytes
) -> None:
    """Append the complete `record` (chain hash included) as event `seq`, verbatim.

    `name_key` is the history index entry of the event's key (``ALL_KEYS``
    for a clear), or None for an event that touches no key (a promotion).
    The caller has checked the chain. Both puts are appends by position,
    as in :func:`append_event` (a follower catching up applies many).

    Raises
    ------
    StoreError
        If LMDB refused an append (`seq` is not past the last event).
    """
    seq_key = log.pack_seq(seq)
    if not (
        txn.put(seq_key, record, True, True, True, tables.log)
        and (name_key is None or txn.put(name_key, seq_key, True, True, True, tables.history))
    ):
        raise _out_of_order(seq)


#: The largest last record a write hashes to check it follows the event before
#: (a write after another process's commit): a larger one (an array sensor's
#: sample, megabytes) has only its shape checked, as hashing it would cost
#: milliseconds on every such write.
CHECKED_RECORD_MAX = 1 << 16


def last_event(
    txn: Any, tables: Tables, store: uuid.UUID, known: tuple[int, bytes] | None = None
) -> tuple[int, float, bytes]:
    """(seq, time, chain) of the last event; (0, 0.0, genesis of `store`) if the log is empty.

    For a write to follow: the event must follow the one before it (its
    seq the next, and, for a record of at most :data:`CHECKED_RECORD_MAX`
    bytes, its chain hash that of its record after the one before's; a
    larger one must have its shape), or the write would chain onto garbage,
    or go on from a seq a damaged key made up, and the log could never
    verify again. `known` is (seq, chain) of an event this process knows,
    which spares reading the event before if it is that one.

    Raises
    ------
    StoreError
        If the last event is damaged (``telstate verify`` says how).
    """
    cursor = txn.cursor(db=tables.log)
    if not cursor.last():
        return 0, 0.0, log.genesis(store)
    seq = 0
    try:
        seq = _unpack_seq(cursor.key())
        record = cursor.value()
        if len(record) > CHECKED_RECORD_MAX:
            log.decode_header(record)  # (its shape: ValueError if it has none)
            if seq > 1 and not (cursor.prev() and cursor.key() == log.pack_seq(seq - 1)):
                raise ValueError(f"event {seq - 1} before it is missing")
        else:
            if seq == 1:
                previous = log.genesis(store)
            elif known is not None and known[0] == seq - 1:
                previous = known[1]
            else:
                before = txn.get(log.pack_seq(seq - 1), None, tables.log)
                if before is None or len(before) < log.CHAIN_SIZE:
                    raise ValueError(f"event {seq - 1} before it is missing or damaged")
                previous = log.record_chain(before)
            if not log.chain_matches(previous, record):
                raise ValueError("its record does not carry its chain hash")
        return seq, log.record_time(record), log.record_chain(record)
    except (struct.error, ValueError, StoreError) as error:
        raise StoreError(
            f"the last event of the log is damaged{f' (event {seq})' if seq else ''}: {error}; no"
            " write can follow it (`telstate verify` shows the damage: restore the store"
            " from a backup or a follower)"
        ) from None


def last_seq_in(txn: Any, tables: Tables) -> int:
    """The seq of the last event of the log; 0 if it is empty."""
    cursor = txn.cursor(db=tables.log)
    return _unpack_seq(cursor.key()) if cursor.last() else 0


#: Seqs count events from 1: one this large (its top bit set) is a damaged key.
_MAX_SEQ = (1 << 63) - 1


def _unpack_seq(seq_key: bytes) -> int:
    if len(seq_key) != 8:
        raise StoreError(f"damaged log: a key of {len(seq_key)} bytes is not a seq")
    seq = log.unpack_seq(seq_key)
    if seq > _MAX_SEQ:
        raise StoreError(f"damaged log: {seq} is not a seq (a key {seq_key.hex()})")
    return seq


def raw_log(txn: Any, tables: Tables, start_seq: int) -> Iterator[tuple[int, bytes]]:
    """(seq, record) of every event from `start_seq` on, in one transaction."""
    cursor = txn.cursor(db=tables.log)
    if not cursor.set_range(log.pack_seq(max(start_seq, 1))):
        return
    for seq_key, record in cursor.iternext():
        yield _unpack_seq(seq_key), record


def key_updates(event: Event) -> list[KeyUpdateBase]:
    """The KeyUpdates the frontend expects for an event: one per sample of add_mutable_many."""
    assert event.key is not None or event.op == Op.CLEAR
    if event.op == Op.ADD_MUTABLE or event.op == Op.ADD_MUTABLE_MANY:
        assert event.key is not None
        key = event.key
        return [MutableKeyUpdate(key, value, timestamp) for value, timestamp in event.samples()]
    if event.op == Op.SET_IMMUTABLE:
        assert event.key is not None and event.value is not None
        return [ImmutableKeyUpdate(event.key, event.value)]
    if event.op == Op.SET_INDEXED:
        assert event.key is not None and event.value is not None and event.sub_key is not None
        return [IndexedKeyUpdate(event.key, event.sub_key, event.value)]
    return [KeyUpdateBase()]


def log_chunk(
    txn: Any, tables: Tables, start_seq: int, end_seq: int | None
) -> list[tuple[int, bytes]]:
    """The next chunk of (seq, record) from `start_seq` up to `end_seq` (None: the end)."""
    chunk: list[tuple[int, bytes]] = []
    size = 0
    for seq, record in raw_log(txn, tables, start_seq):
        if (end_seq is not None and seq > end_seq) or not _room(chunk, size):
            break
        chunk.append((seq, bytes(record)))
        size += len(record)
    return chunk


def chunk_full(chunk: list[tuple[int, bytes]]) -> bool:
    """Whether a chunk of :func:`log_chunk` stopped for its bounds (more may follow in range)."""
    return not _room(chunk, sum(len(record) for _, record in chunk))


def _room(chunk: list, size: int) -> bool:
    """Whether a chunk of this many events and bytes may take one more."""
    return not chunk or (len(chunk) < settings.LOG_CHUNK and size < settings.LOG_CHUNK_BYTES)


def history_chunk(
    txn: Any, tables: Tables, name_keys: list[bytes], start_seq: int, end_seq: int | None
) -> list[tuple[int, bytes]]:
    start = log.pack_seq(start_seq)
    # 8-byte big-endian seqs compare like the numbers.
    limit = log.pack_seq(end_seq) if end_seq is not None else b"\xff" * 8
    streams = []
    for name_key in dict.fromkeys(name_keys):
        cursor = txn.cursor(db=tables.history)
        if cursor.set_range_dup(name_key, start):
            seqs = list(itertools.islice(cursor.iternext_dup(keys=False), settings.LOG_CHUNK))
            if len(seqs) == settings.LOG_CHUNK:
                # Cut short: later seqs of the other keys wait for the next chunk.
                limit = min(limit, seqs[-1])
            streams.append(seqs)
    chunk: list[tuple[int, bytes]] = []
    size = 0
    for seq_key in itertools.takewhile(limit.__ge__, heapq.merge(*streams)):
        if not _room(chunk, size):
            break
        record = txn.get(seq_key, db=tables.log)
        if record is None:
            raise StoreError(
                f"the history index names event {_unpack_seq(seq_key)}, not in the log"
            )
        chunk.append((_unpack_seq(seq_key), bytes(record)))
        size += len(record)
    return chunk


def writers_in(txn: Any, tables: Tables) -> dict[int, Writer]:
    try:
        return {
            log.unpack_writer_id(key): log.decode_writer(value)
            for key, value in txn.cursor(db=tables.writers).iternext()
        }
    except (ValueError, struct.error) as error:
        raise StoreError(f"the writers table is damaged: {error}") from None


def head_in(txn: Any, tables: Tables, genesis: bytes) -> tuple[int, bytes]:
    """(seq, chain) of the last event; (0, `genesis`) for an empty log."""
    cursor = txn.cursor(db=tables.log)
    if not cursor.last():
        return 0, genesis
    record = cursor.value()
    if len(record) < log.CHAIN_SIZE:
        raise StoreError(f"the last event of the log is damaged: a record of {len(record)} bytes")
    return _unpack_seq(cursor.key()), log.record_chain(record)


def chain_in(txn: Any, tables: Tables, seq: int) -> bytes | None:
    """The chain hash stored in event `seq`, or None if there is no such event."""
    record = txn.get(log.pack_seq(seq), db=tables.log)
    return None if record is None else log.record_chain(record)
