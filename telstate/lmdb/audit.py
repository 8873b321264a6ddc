"""Rebuilding the state from the log: :func:`replay` and the checks of ``verify``."""

from __future__ import annotations

import bisect
import collections
import struct
import uuid
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from .. import log
from ..backend import Record
from ..errors import StoreError
from ..utils import KeyType, PathType, display_str, pack_timestamp
from .eventlog import raw_log, writers_in
from .layout import ALL_KEYS, Tables, name_key_of
from .state import state_records

if TYPE_CHECKING:
    from ..telescope_state import TelescopeState

_MODEL_TYPES: dict[type, KeyType] = {
    bytes: KeyType.IMMUTABLE,
    set: KeyType.MUTABLE,
    dict: KeyType.INDEXED,
}


class _StateModel:
    """The state a sequence of events leads to, as plain Python containers."""

    def __init__(self) -> None:
        # bytes: immutable; set of packed members: mutable; dict: indexed.
        self.data: dict[bytes, Any] = {}

    def apply(self, raw: log.RawEvent) -> None:
        op_code, _, _, timestamp, key, sub_key, value, _ = raw
        data = self.data
        if op_code == log.ADD_MUTABLE:
            members = data.get(key)
            if members is None:
                members = data[key] = set()
            members.add(pack_timestamp(timestamp) + value)
        elif op_code == log.ADD_MUTABLE_MANY:
            members = data.get(key)
            if members is None:
                members = data[key] = set()
            try:
                members.update(log.sample_members(value))
            except ValueError as error:
                raise StoreError(
                    f"an add_mutable_many event on {display_str(key)}: {error}"
                ) from None
        elif op_code == log.SET_IMMUTABLE:
            data[key] = value
        elif op_code == log.SET_INDEXED:
            sub_keys = data.get(key)
            if sub_keys is None:
                sub_keys = data[key] = {}
            sub_keys[sub_key] = value
        elif op_code == log.DELETE:
            data.pop(key, None)
        elif op_code == log.CLEAR:
            data.clear()
        elif op_code != log.PROMOTE:  # a promotion changes no key
            raise StoreError(f"unknown operation code {op_code} in the log")

    def records(self) -> Iterator[Record]:
        """Every key as a Record, in key order."""
        for key in sorted(self.data):
            value = self.data[key]
            if isinstance(value, bytes):
                yield key, KeyType.IMMUTABLE, value
            elif isinstance(value, set):
                yield key, KeyType.MUTABLE, sorted(value)
            else:
                yield key, KeyType.INDEXED, dict(value)


def replay_model(
    txn: Any,
    tables: Tables,
    until_seq: int | None = None,
    until_time: float | None = None,
) -> _StateModel:
    """Apply the log, up to the limits, to an empty model."""
    model = _StateModel()
    apply = model.apply
    decode = log.decode_record
    for seq, record in raw_log(txn, tables, 1):
        if until_seq is not None and seq > until_seq:
            break
        raw = decode(record)
        if until_time is not None and raw[2] > until_time:
            break
        apply(raw)
    return model


def replay(
    path: PathType, until_seq: int | None = None, until_time: float | None = None
) -> TelescopeState:
    """The state of a store as of an event, rebuilt from its log into memory.

    Parameters
    ----------
    path
        Directory of the store (opened read-only).
    until_seq
        Apply events up to and including this sequence number.
    until_time
        Apply events appended at or before this wall-clock time (seconds
        since the epoch). With both limits, the earlier one applies.

    Returns
    -------
    A :class:`~telstate.TelescopeState` on a :class:`~telstate.memory.MemoryBackend`.

    Raises
    ------
    StoreError
        If there is no store at `path` or its log is damaged.
    """
    from ..memory import MemoryBackend
    from ..telescope_state import TelescopeState
    from .backend import LmdbBackend

    backend = LmdbBackend(path, readonly=True)
    try:
        model = backend._read(replay_model, until_seq, until_time)
    finally:
        backend.close()
    memory = MemoryBackend()
    memory.load_records(model.records())
    return TelescopeState(memory)


#: What reading damaged state tables can raise (reported by verify, not raised).
_DAMAGE = (ValueError, TypeError, KeyError, IndexError, struct.error, StoreError)

#: How many problems of one kind verify lists before it only counts them.
_MAX_LISTED = 20


def verify_in(txn: Any, tables: Tables, store: uuid.UUID) -> list[str]:
    """The checks of :meth:`LmdbBackend.verify`, in one read transaction.

    Memory is bounded by the number of keys and the largest key: the log
    is streamed once (seqs, chain, writers, history counts), then each key
    is replayed alone through the history index and compared with its state.
    """
    problems, counts = _check_log(txn, tables, store)
    clears = _clear_seqs(txn, tables)
    seen: set[bytes] = set()
    key = b""
    try:
        for key, key_type, value in state_records(txn, tables):
            name_key = name_key_of(key)
            seen.add(name_key)
            logged, last = _replay_key(txn, tables, name_key, clears)
            difference = _difference(key_type, value, logged)
            if difference:
                where = f" (its last event: {last})" if last else ""
                problems.append(f"key {display_str(key)}: {difference}{where}")
    except _DAMAGE as error:
        # The keys after it are not compared; the log checks above still stand.
        after = f" after key {display_str(key)}" if key else ""
        problems.append(f"state: unreadable{after} ({type(error).__name__}: {error})")
        return problems
    history = txn.cursor(db=tables.history)
    for name_key in history.iternext_nodup(keys=True, values=False):
        name_key = bytes(name_key)
        if name_key == ALL_KEYS or name_key in seen:
            continue
        logged, last = _replay_key(txn, tables, name_key, clears)
        if logged is not None:
            problems.append(
                f"key {display_str(logged[0])}: in the log but not in the state "
                f"(its last event: {last})"
            )
    indexed: collections.Counter[bytes] = collections.Counter()
    history = txn.cursor(db=tables.history)
    for name_key in history.iternext_nodup(keys=True, values=False):
        indexed[bytes(name_key)] = history.count()
    wrong = sum(
        1 for name_key in indexed.keys() | counts.keys() if indexed[name_key] != counts[name_key]
    )
    if wrong:
        problems.append(f"history index: wrong event counts for {wrong} keys")
    return problems


def verify_rdb_in(
    txn: Any, tables: Tables, records: Iterable[Record], seq: int, complete: bool = True
) -> tuple[list[str], int]:
    """Compare RDB `records` with the state at `seq`, replayed key by key.

    Returns
    -------
    The differences found, and the number of keys compared.
    """
    problems: list[str] = []
    clears = _clear_seqs(txn, tables)
    seen: set[bytes] = set()
    count = 0
    for key, key_type, value in records:
        count += 1
        name_key = name_key_of(key)
        if name_key in seen:
            problems.append(f"key {display_str(key)}: more than once in the file")
            continue
        seen.add(name_key)
        logged, _ = _replay_key(txn, tables, name_key, clears, seq)
        difference = _difference(key_type, value, logged)
        if difference:
            problems.append(f"key {display_str(key)}: {difference.replace('state', 'file')}")
    if not complete:
        return problems, count
    history = txn.cursor(db=tables.history)
    for name_key in history.iternext_nodup(keys=True, values=False):
        name_key = bytes(name_key)
        if name_key == ALL_KEYS or name_key in seen:
            continue
        logged, _ = _replay_key(txn, tables, name_key, clears, seq)
        if logged is not None:
            problems.append(f"key {display_str(logged[0])}: in the log but not in the file")
    return problems, count


def _check_log(
    txn: Any, tables: Tables, store: uuid.UUID
) -> tuple[list[str], collections.Counter[bytes]]:
    """Stream the log: dense seqs, chain links, decodable records, known writers.

    Returns the problems and the number of events per history-table entry.
    """
    problems: list[str] = []
    writers = set(writers_in(txn, tables))
    counts: collections.Counter[bytes] = collections.Counter()
    chain = log.genesis(store)
    expected_seq = 1
    broken_links = 0
    for seq, record in raw_log(txn, tables, 1):
        if seq != expected_seq:
            problems.append(f"log: seq {expected_seq - 1} is followed by {seq}")
        expected_seq = seq + 1
        if not log.chain_matches(chain, record):
            broken_links += 1
            if broken_links <= _MAX_LISTED:
                problems.append(
                    f"log: event {seq} does not match its chain hash "
                    f"(the event, or the log before it, was altered)"
                )
        chain = log.record_chain(record)
        try:
            raw = log.decode_record(record)
        except ValueError as error:
            problems.append(f"log: event {seq} cannot be decoded ({error})")
            continue
        if raw[0] not in log.OP_CODES:
            problems.append(f"log: event {seq} has unknown operation code {raw[0]}")
            continue
        if raw[0] == log.ADD_MUTABLE_MANY:
            try:
                log.decode_samples(raw[6])
            except ValueError as error:
                problems.append(f"log: event {seq} cannot be decoded ({error})")
        if raw[1] not in writers:
            problems.append(f"log: event {seq} has unknown writer {raw[1]}")
            writers.add(raw[1])
        if raw[0] == log.PROMOTE:
            continue  # touches no key: not in the history index
        counts[name_key_of(raw[4]) if raw[0] != log.CLEAR else ALL_KEYS] += 1
    if broken_links > _MAX_LISTED:
        problems.append(f"log: {broken_links - _MAX_LISTED} more events do not match their chain")
    return problems, counts


def _clear_seqs(txn: Any, tables: Tables) -> list[int]:
    cursor = txn.cursor(db=tables.history)
    if not cursor.set_key(ALL_KEYS):
        return []
    return [log.unpack_seq(seq) for seq in cursor.iternext_dup(keys=False)]


def _replay_key(
    txn: Any, tables: Tables, name_key: bytes, clears: list[int], until_seq: int | None = None
) -> tuple[tuple[bytes, Any] | None, int]:
    """Replay the events of one key (from the history index) up to `until_seq`.

    Returns
    -------
    (key, model value) — bytes, a set of packed members or a dict, as in
    :class:`_StateModel` — or None if the key does not exist then; and the
    seq of the key's last event (0 if none). Undecodable events are skipped
    (the log check reports them).
    """
    cursor = txn.cursor(db=tables.history)
    model = _StateModel()
    key = b""
    last = 0
    if cursor.set_key(name_key):
        for seq_key in cursor.iternext_dup(keys=False):
            seq = log.unpack_seq(seq_key)
            if until_seq is not None and seq > until_seq:
                break
            if bisect.bisect_left(clears, seq) != bisect.bisect_left(clears, last):
                model.data.clear()  # a clear between the previous event and this one
            last = seq
            try:
                raw = log.decode_record(txn.get(seq_key, db=tables.log))
                model.apply(raw)
            except (ValueError, StoreError):
                continue
            key = raw[4]
    end = len(clears) if until_seq is None else bisect.bisect_right(clears, until_seq)
    if bisect.bisect_left(clears, last) < end:
        model.data.clear()  # cleared after its last event
    value = model.data.get(key)
    return (None if value is None else (key, value)), last


def _difference(key_type: KeyType, value: Any, logged: tuple[bytes, Any] | None) -> str:
    """How a stored key differs from its replay; empty if it does not."""
    if logged is None:
        return "in the state but not in the log"
    logged_type = _MODEL_TYPES[type(logged[1])]
    if key_type != logged_type:
        return f"{key_type.name.lower()} in the state, {logged_type.name.lower()} in the log"
    expected = sorted(logged[1]) if logged_type == KeyType.MUTABLE else logged[1]
    if value != expected:
        return "value differs between state and log"
    return ""
