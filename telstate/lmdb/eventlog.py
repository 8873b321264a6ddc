"""Reading the event log table, and turning events into the frontend's key updates.

The record format of an event is :mod:`telstate.log`'s; the tables that
hold the log, the writers and the history index are described in
:mod:`telstate.lmdb.layout`.
"""

from __future__ import annotations

import heapq
import itertools
import struct
from collections.abc import Iterator
from typing import Any

from .. import log
from ..backend import ImmutableKeyUpdate, IndexedKeyUpdate, KeyUpdateBase, MutableKeyUpdate
from ..errors import StoreError
from ..log import Event, Op, Writer
from . import settings
from .layout import Tables


def last_seq_in(txn: Any, tables: Tables) -> int:
    cursor = txn.cursor(db=tables.log)
    return log.unpack_seq(cursor.key()) if cursor.last() else 0


def raw_log(txn: Any, tables: Tables, start_seq: int) -> Iterator[tuple[int, bytes]]:
    """(seq, record) of every event from `start_seq` on, in one transaction."""
    cursor = txn.cursor(db=tables.log)
    if not cursor.set_range(log.pack_seq(max(start_seq, 1))):
        return
    unpack_seq = log.unpack_seq
    for seq_key, record in cursor.iternext():
        yield unpack_seq(seq_key), record


def key_update(event: Event) -> KeyUpdateBase:
    """The KeyUpdate the frontend expects for an event."""
    assert event.key is not None or event.op == Op.CLEAR
    if event.op == Op.ADD_MUTABLE:
        assert event.key is not None and event.value is not None
        assert event.timestamp is not None
        return MutableKeyUpdate(event.key, event.value, event.timestamp)
    if event.op == Op.SET_IMMUTABLE:
        assert event.key is not None and event.value is not None
        return ImmutableKeyUpdate(event.key, event.value)
    if event.op == Op.SET_INDEXED:
        assert event.key is not None and event.value is not None and event.sub_key is not None
        return IndexedKeyUpdate(event.key, event.sub_key, event.value)
    return KeyUpdateBase()


def log_chunk(
    txn: Any, tables: Tables, start_seq: int, end_seq: int | None
) -> list[tuple[int, bytes]]:
    chunk = list(itertools.islice(raw_log(txn, tables, start_seq), settings.LOG_CHUNK))
    if end_seq is not None:
        while chunk and chunk[-1][0] > end_seq:
            chunk.pop()
    return chunk


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
    seq_keys = list(itertools.takewhile(limit.__ge__, heapq.merge(*streams)))
    get = txn.get
    return [(log.unpack_seq(seq), get(seq, db=tables.log)) for seq in seq_keys]


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
    return log.unpack_seq(cursor.key()), log.record_chain(cursor.value())


def chain_in(txn: Any, tables: Tables, seq: int) -> bytes | None:
    """The chain hash stored in event `seq`, or None if there is no such event."""
    record = txn.get(log.pack_seq(seq), db=tables.log)
    return None if record is None else log.record_chain(record)
