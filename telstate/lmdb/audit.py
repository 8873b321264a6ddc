"""Rebuilding the state from the log: :func:`replay` and the checks of ``verify``."""

from __future__ import annotations

import collections
import struct
from collections.abc import Iterator
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
        op_code, _, _, timestamp, key, sub_key, value = raw
        data = self.data
        if op_code == log.ADD_MUTABLE:
            members = data.get(key)
            if members is None:
                members = data[key] = set()
            members.add(pack_timestamp(timestamp) + value)
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
        else:
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


class _LogAudit:
    """Checks made on every event while :meth:`LmdbBackend.verify` replays the log."""

    def __init__(self, writers: set[int]) -> None:
        self.writers = writers
        self.problems: list[str] = []
        self.expected_seq = 1
        # Events per history-table entry, to compare with the history index.
        self.counts: collections.Counter[bytes] = collections.Counter()

    def see(self, seq: int, raw: log.RawEvent) -> None:
        if seq != self.expected_seq:
            self.problems.append(f"log: seq {self.expected_seq - 1} is followed by {seq}")
        self.expected_seq = seq + 1
        if raw[1] not in self.writers:
            self.problems.append(f"log: event {seq} has unknown writer {raw[1]}")
            self.writers.add(raw[1])
        self.counts[name_key_of(raw[4]) if raw[0] != log.CLEAR else ALL_KEYS] += 1


def replay_model(
    txn: Any,
    tables: Tables,
    until_seq: int | None = None,
    until_time: float | None = None,
    audit: _LogAudit | None = None,
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
        if audit is not None:
            audit.see(seq, raw)
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


def verify_in(txn: Any, tables: Tables) -> list[str]:
    audit = _LogAudit(set(writers_in(txn, tables)))
    problems = audit.problems
    try:
        expected = replay_model(txn, tables, audit=audit).data
    except (StoreError, struct.error) as error:
        return problems + [f"log: unreadable record ({error})"]
    for key, key_type, value in state_records(txn, tables):
        name = display_str(key)
        logged = expected.pop(key, None)
        if logged is None:
            problems.append(f"key {name}: in the state but not in the log")
            continue
        logged_type = _MODEL_TYPES[type(logged)]
        if key_type != logged_type:
            problems.append(
                f"key {name}: {key_type.name.lower()} in the state, "
                f"{logged_type.name.lower()} in the log"
            )
        elif value != (sorted(logged) if logged_type == KeyType.MUTABLE else logged):
            problems.append(f"key {name}: value differs between state and log")
    for key in sorted(expected):
        problems.append(f"key {display_str(key)}: in the log but not in the state")
    history = txn.cursor(db=tables.history)
    indexed: collections.Counter[bytes] = collections.Counter()
    for name_key in history.iternext_nodup(keys=True, values=False):
        indexed[name_key] = history.count()
    wrong = sum(
        1
        for name_key in indexed.keys() | audit.counts.keys()
        if indexed[name_key] != audit.counts[name_key]
    )
    if wrong:
        problems.append(f"history index: wrong event counts for {wrong} keys")
    return problems
