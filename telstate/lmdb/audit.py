"""The state rebuilt from the log: :func:`replay`, :class:`ReplayedState`, ``verify``'s checks."""

from __future__ import annotations

import array
import bisect
import collections
import itertools
import struct
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import log
from ..backend import PackedMembers, Record
from ..errors import StoreError
from ..import_rules import check_record
from ..utils import KeyType, PathType, display_str, pack_timestamp
from . import settings
from .eventlog import raw_log, writers_in
from .layout import ALL_KEYS, INLINE_LIMIT, LONG_NAME_KEY_LEN, Tables, name_key_of
from .state import TxnCheck, state_records
from .writes import highest_key_id, key_counter

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
            elif type(members) is not set:
                raise _of_another_type(key, "a sample added to")
            members.add(pack_timestamp(timestamp) + value)
        elif op_code == log.ADD_MUTABLE_MANY:
            members = data.get(key)
            if members is None:
                members = data[key] = set()
            elif type(members) is not set:
                raise _of_another_type(key, "samples added to")
            members.update(_sample_members(key, value))
        elif op_code == log.SET_IMMUTABLE:
            data[key] = value
        elif op_code == log.SET_INDEXED:
            sub_keys = data.get(key)
            if sub_keys is None:
                sub_keys = data[key] = {}
            elif type(sub_keys) is not dict:
                raise _of_another_type(key, "a sub-key set in")
            sub_keys[sub_key] = value
        elif op_code == log.DELETE:
            data.pop(key, None)
        elif op_code == log.CLEAR:
            data.clear()
        elif op_code != log.PROMOTE:  # a promotion changes no key
            raise _unknown_operation(op_code)

    def records(self) -> Iterator[Record]:
        """Every key as a Record, in key order."""
        for key in sorted(self.data):
            yield _record(key, self.data[key])


def _record(key: bytes, value: Any) -> Record:
    """The Record of a key replayed as `value` (by :class:`_StateModel` or :func:`_replay_key`)."""
    if isinstance(value, bytes):
        return key, KeyType.IMMUTABLE, value
    if isinstance(value, set):
        return key, KeyType.MUTABLE, sorted(value)
    if isinstance(value, _SortedRows):
        rows = value.rows
        return key, KeyType.MUTABLE, PackedMembers.from_buffer(rows.tobytes(), rows.shape[1])
    return key, KeyType.INDEXED, dict(value)


def _sample_members(key: bytes, payload: bytes) -> list[bytes]:
    """The members an add_mutable_many event on `key` adds; StoreError if they are damaged."""
    try:
        return log.sample_members(payload)
    except ValueError as error:
        raise StoreError(f"an add_mutable_many event on {display_str(key)}: {error}") from None


def _of_another_type(key: bytes, what: str) -> StoreError:
    """A write to `key` that its type does not take: no log holds one unless damaged."""
    return StoreError(f"{what} {display_str(key)}, a key of another type")


def _unknown_operation(op_code: int) -> StoreError:
    return StoreError(f"unknown operation code {op_code} in the log")


def _decoded(seq: int, record: bytes) -> log.RawEvent:
    """Event `seq`'s fields; StoreError naming it if it cannot be decoded."""
    try:
        return log.decode_record(record)
    except ValueError as error:
        raise _damaged_event(seq, error) from None


def replay_model(
    txn: Any,
    tables: Tables,
    until_seq: int | None = None,
    until_time: float | None = None,
) -> _StateModel:
    """Apply the log, up to the limits, to an empty model."""
    model = _StateModel()
    apply = model.apply
    previous = 0.0
    for seq, record in raw_log(txn, tables, 1):
        if until_seq is not None and seq > until_seq:
            break
        raw = _decoded(seq, record)
        if until_time is not None:
            appended = raw[2]
            _check_time(txn, tables, seq, appended, previous, until_time)
            if appended > until_time:
                break
            previous = appended
        try:
            apply(raw)
        except StoreError as error:
            raise _damaged_event(seq, error) from None
    return model


def _check_time(
    txn: Any, tables: Tables, seq: int, appended: float, previous: float, until_time: float
) -> None:
    """Raise if event `seq`'s append time cannot be right, as a replay until a time sees it.

    Event times never go back (see WriteTxn._next_event): one before the
    event's before it, or (for the event a replay stops at) after the next
    event's, is damage, which would make the replay stop early, silently.
    """
    if appended < previous:
        raise _damaged_event(
            seq, ValueError(f"its append time {appended!r} is before the event before it")
        )
    if appended > until_time:
        following = txn.get(log.pack_seq(seq + 1), db=tables.log)
        try:
            later = following is not None and log.record_time(following) < appended
        except struct.error as error:
            raise _damaged_event(seq + 1, error) from None
        if later:
            raise _damaged_event(
                seq, ValueError(f"its append time {appended!r} is after the event after it")
            )


def _damaged_event(seq: int, error: Exception) -> StoreError:
    return StoreError(
        f"the log is damaged at event {seq} ({error}): telstate verify lists the damage"
    )


def seq_until_in(txn: Any, tables: Tables, until_time: float) -> int:
    """The seq of the last event that :func:`replay_model` applies until `until_time`."""
    last = 0
    previous = 0.0
    record_time = log.record_time
    for seq, record in raw_log(txn, tables, 1):
        try:
            appended = record_time(record)
        except struct.error as error:
            raise _damaged_event(seq, error) from None
        _check_time(txn, tables, seq, appended, previous, until_time)
        if appended > until_time:
            break
        last = seq
        previous = appended
    return last


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


class ReplayedState:
    """The state as of event `seq`, rebuilt from the log one key at a time.

    What :func:`replay` gives, in memory bounded by the number of keys and
    the largest key rather than by the whole state: made in a read
    transaction, it reads the log up to `seq` once, in chunks of
    ``settings.VERIFY_CHUNK`` events, to check every event as
    :func:`replay` does and to find the keys that exist then; :meth:`records`
    replays each key alone through the history index, as ``verify`` does.
    ``telstate export --until`` writes its file from it.

    Parameters
    ----------
    txn, tables
        A read transaction, open while the records are read, and its tables.
    seq
        The last event applied.
    check
        Called before each key is replayed: raises if `txn` has ended (a
        snapshot's check).

    Attributes
    ----------
    keys : list[bytes]
        The keys of the state, in key order.

    Raises
    ------
    StoreError
        If an event up to `seq` is damaged: the same error, naming the same
        event, as :func:`replay` raises.
    """

    def __init__(self, txn: Any, tables: Tables, seq: int, check: TxnCheck | None = None) -> None:
        self._txn = txn
        self._tables = tables
        self._check = check
        self.seq = seq
        self._event_counts, self._clears = _keys_at(txn, tables, seq)
        self.keys = sorted(self._event_counts)

    def records(self, selected: Callable[[bytes], bool] | None = None) -> Iterator[Record]:
        """The keys (those `selected` is true for) as Records, in key order, one at a time.

        Values are as :meth:`Backend.records` gives them (checked as
        :func:`telstate.import_rules.check_record` checks an import): a mutable
        key's members in one buffer if they all have one length, which is
        what bounds the memory of a sensor's millions of samples.

        Raises
        ------
        StoreError
            If the history index, which the keys are replayed through, does
            not list a key's events as the log has them (it is damaged).
        InvalidTimestampError
            If a sample's timestamp is negative or not finite (as loading
            the state into a :class:`~telstate.memory.MemoryBackend` would).
        """
        for key in self.keys:
            if selected is None or selected(key):
                if self._check is not None:
                    self._check()
                yield check_record(self._record(key))

    def _record(self, key: bytes) -> Record:
        txn, tables = self._txn, self._tables
        replay = _key_replay(txn, tables, name_key_of(key), self._clears, self.seq)[0]
        try:
            logged = replay.result()
        except StoreError as error:
            raise StoreError(
                f"the log is damaged: an event of key {display_str(key)} up to event"
                f" {self.seq} cannot be applied ({error}): telstate verify lists the damage"
            ) from None
        expected, since = self._event_counts[key]
        if (
            replay.foreign
            or (replay.alive, replay.alive_from) != (expected, since)
            or logged is None
            or logged[0] != key
        ):
            raise StoreError(
                f"the history index does not list the events of key {display_str(key)} "
                f"up to event {self.seq} (since it was last deleted or cleared, it lists"
                f" {replay.alive} from event {_seq_of(replay.alive_from)}, and"
                f" {replay.foreign} of other keys; the log has {expected} from event"
                f" {_seq_of(since)}): "
                f"telstate verify lists the damage"
            )
        return _record(*logged)


def _seq_of(seq_key: bytes | None) -> int:
    return 0 if seq_key is None else log.unpack_seq(seq_key)


def _keys_at(
    txn: Any, tables: Tables, seq: int
) -> tuple[dict[bytes, tuple[int, bytes]], Sequence[int]]:
    """The keys that exist after event `seq`, and the seqs of the clears up to it.

    Each key comes with the number of its events since it was last deleted
    or cleared before `seq`, and the seq key of the first of them (as
    :class:`_KeyReplay` finds them): a key deleted is forgotten, so memory
    grows with the keys of the state, not with every key there ever was.
    Every event is checked as :meth:`_StateModel.apply` would apply it,
    with the same errors; chunks of plain writes (the op codes and keys
    read in bulk with :func:`telstate.log.record_fields`) in bulk.
    """
    counts: collections.Counter[bytes] = collections.Counter()
    since: dict[bytes, bytes] = {}
    clears = array.array("q")  # (8 bytes a clear: a store may hold many)
    for chunk in _log_chunks(txn, tables, seq):
        records = [record for _, record in chunk]
        ops, _, keys = log.record_fields(records)
        if _PLAIN_OPS.issuperset(ops) and log.DELETE not in ops:
            if not since.keys() >= set(keys):  # (keys made anew in the chunk)
                for (seq_key, _), key in zip(chunk, keys):
                    since.setdefault(key, seq_key)
            counts.update(keys)
            continue
        for (seq_key, record), op_code, key in zip(chunk, ops, keys):
            if op_code not in _PLAIN_OPS:
                event_seq = log.unpack_seq(seq_key)
                op_code, _, _, _, key, _, value, _ = _decoded(event_seq, record)
                if op_code == log.CLEAR:
                    counts.clear()
                    since.clear()
                    clears.append(event_seq)
                    continue
                if op_code == log.PROMOTE:
                    continue
                if op_code not in log.OP_CODES:
                    raise _unknown_operation(op_code)
                if op_code == log.ADD_MUTABLE_MANY and log.sample_member_rows(value) is None:
                    _sample_members(key, value)  # not a sensor's samples: checked one by one
            if op_code == log.DELETE:
                counts.pop(key, None)
                since.pop(key, None)
            else:
                since.setdefault(key, seq_key)
                counts[key] += 1
    return {key: (count, since[key]) for key, count in counts.items()}, clears


def _log_chunks(txn: Any, tables: Tables, seq: int) -> Iterator[list[tuple[bytes, bytes]]]:
    """The log's (seq key, record) entries up to event `seq`, in chunks.

    A chunk has at most ``settings.VERIFY_CHUNK`` events and ends once its
    records hold ``settings.LOG_CHUNK_BYTES``: an import's events hold up to
    ``settings.BULK_EVENT_BYTES`` each.
    """
    end = log.pack_seq(seq)
    cursor = txn.cursor(db=tables.log)
    if not cursor.set_range(log.pack_seq(1)):
        return
    chunk: list[tuple[bytes, bytes]] = []
    size = 0
    for seq_key, record in cursor.iternext():
        if seq_key > end:
            break
        chunk.append((seq_key, record))
        size += len(record)
        if len(chunk) >= settings.VERIFY_CHUNK or size >= settings.LOG_CHUNK_BYTES:
            yield chunk
            chunk = []
            size = 0
    if chunk:
        yield chunk


#: What reading damaged state tables can raise (reported by verify, not raised).
_DAMAGE = (ValueError, TypeError, KeyError, IndexError, struct.error, StoreError)

#: How many problems of one kind verify lists before it only counts them.
_MAX_LISTED = 20

#: The operations a chunk of the log may hold to be checked in bulk: each
#: counts once for its key in the history index and needs no more checks
#: there (clears, promotions and imports' add_mutable_many events are
#: checked event by event).
_PLAIN_OPS = frozenset((log.SET_IMMUTABLE, log.ADD_MUTABLE, log.SET_INDEXED, log.DELETE))


#: The operations on one key: those the history index lists under the key.
_KEY_OPS = log.OP_CODES - {log.CLEAR, log.PROMOTE}


def verify_in(txn: Any, tables: Tables, store: uuid.UUID) -> list[str]:
    """The checks of :meth:`LmdbBackend.verify`, in one read transaction.

    Memory is bounded by the number of keys and the largest key: the log
    is streamed once (seqs, chain, writers, and a digest of the history
    index's entries), then each key is replayed alone through the history
    index and compared with its state, and the history table is read once
    to check that it lists exactly the log's events, each under its key.
    """
    problems, counts, digest = _check_log(txn, tables, store)
    clears = _readable_clear_seqs(txn, tables, problems)
    seen: set[bytes] = set()
    key = b""
    try:
        for key, key_type, value in state_records(txn, tables):
            name_key = name_key_of(key)
            seen.add(name_key)
            logged, last, foreign = _replay_key(txn, tables, name_key, clears)
            if foreign:
                problems.append(_foreign_problem(key, foreign))
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
        replayed = _replayed(txn, tables, name_key, name_key[1:], clears, problems)
        if replayed is None:
            continue
        logged, last = replayed
        if logged is not None:
            problems.append(
                f"key {display_str(logged[0])}: in the log but not in the state "
                f"(its last event: {last})"
            )
    problems.extend(_check_history(txn, tables, counts, digest))
    problems.extend(_check_counters(txn, tables))
    return problems


def _check_counters(txn: Any, tables: Tables) -> list[str]:
    """What the next key and the next writer would get: ids no one has."""
    problems = []
    try:
        counter = key_counter(txn, tables)
    except StoreError as error:
        problems.append(f"meta: {error}")
    else:
        highest = highest_key_id(txn, tables)
        if highest >= counter:
            problems.append(
                f"meta: the key id counter ({counter}) is not above the highest id the data "
                f"use ({highest}): a new key would share another's samples"
            )
    writers = txn.cursor(db=tables.writers)
    if writers.last() and writers.key() == b"\xff\xff\xff\xff":
        problems.append("writers table: its last id is ffffffff, which no new writer can follow")
    return problems


def _replayed(
    txn: Any,
    tables: Tables,
    name_key: bytes,
    key: bytes,
    clears: list[int],
    problems: list[str],
    until_seq: int | None = None,
) -> tuple[tuple[bytes, Any] | None, int] | None:
    """:func:`_replay_key`'s model value and last seq of `key`, or None if its history
    is unreadable; that, and events of other keys listed under it, go to `problems`."""
    try:
        logged, last, foreign = _replay_key(txn, tables, name_key, clears, until_seq)
    except _DAMAGE as error:
        problems.append(f"key {display_str(key)}: its history is unreadable ({error})")
        return None
    if foreign:
        problems.append(_foreign_problem(key, foreign))
    return logged, last


def _foreign_problem(key: bytes, count: int) -> str:
    events = "1 event" if count == 1 else f"{count} events"
    return (
        f"key {display_str(key)}: the history index lists {events} of other keys "
        f"under it (not replayed for it)"
    )


def _check_history(
    txn: Any, tables: Tables, counts: collections.Counter[bytes], digest: int
) -> list[str]:
    """Whether the history table lists exactly the events `counts` and `digest` sum up.

    Read one key at a time, ``settings.VERIFY_CHUNK`` entries at a time.
    """
    indexed: collections.Counter[bytes] = collections.Counter()
    found = _HistoryDigest()
    damaged = 0
    history = txn.cursor(db=tables.history)
    more = history.first()
    while more:
        name_key = bytes(history.key())
        entries = history.iternext_dup(keys=False)
        while chunk := b"".join(itertools.islice(entries, settings.VERIFY_CHUNK)):
            if len(chunk) % _SEQ_SIZE:
                damaged += 1
                continue
            indexed[name_key] += len(chunk) // _SEQ_SIZE
            found.add_entries(name_key, chunk)
        more = history.next_nodup()
    problems = []
    if damaged:
        problems.append(f"history index: {damaged} chunks of entries are not seqs")
    wrong = sum(
        1 for name_key in indexed.keys() | counts.keys() if indexed[name_key] != counts[name_key]
    )
    if wrong:
        problems.append(f"history index: wrong event counts for {wrong} keys")
    elif found.value != digest:
        problems.append(
            "history index: it does not list the log's events under their keys "
            "(the counts agree, the seqs do not)"
        )
    return problems


def verify_rdb_in(
    txn: Any,
    tables: Tables,
    records: Iterable[Record],
    seq: int,
    complete: bool = True,
    selected: Callable[[bytes], bool] | None = None,
) -> tuple[list[str], int]:
    """Compare RDB `records` with the state at `seq`, replayed key by key.

    With `selected`, the records must be exactly the keys of that state
    for which it is true; with `complete` false, only the keys in
    `records` are compared (none is missing from them).

    Returns
    -------
    The differences found, and the number of keys compared.
    """
    problems: list[str] = []
    clears = _readable_clear_seqs(txn, tables, problems)
    seen: set[bytes] = set()
    count = 0
    for key, key_type, value in records:
        count += 1
        name_key = name_key_of(key)
        if name_key in seen:
            problems.append(f"key {display_str(key)}: more than once in the file")
            continue
        seen.add(name_key)
        if complete and selected is not None and not selected(key):
            problems.append(f"key {display_str(key)}: in the file but not in its selection")
            continue
        replayed = _replayed(txn, tables, name_key, key, clears, problems, seq)
        if replayed is None:
            continue
        logged = replayed[0]
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
        if selected is not None and len(name_key) != LONG_NAME_KEY_LEN:
            if not selected(name_key[1:]):  # the key is its name: no need to replay it
                continue
        replayed = _replayed(txn, tables, name_key, name_key[1:], clears, problems, seq)
        if replayed is None:
            continue
        logged = replayed[0]
        if logged is not None and (selected is None or selected(logged[0])):
            problems.append(f"key {display_str(logged[0])}: in the log but not in the file")
    return problems, count


def _check_log(
    txn: Any, tables: Tables, store: uuid.UUID
) -> tuple[list[str], collections.Counter[bytes], int]:
    """Stream the log: dense seqs, chain links, decodable records, known writers.

    Returns the problems, the number of events per history-table entry
    and the :class:`_HistoryDigest` the history table should have.
    The log is read in chunks of ``settings.VERIFY_CHUNK`` events, each checked in bulk;
    a chunk with anything unusual in it (a gap, a clear, a damaged record)
    is gone through event by event.
    """
    problems: list[str] = []
    writers = set(writers_in(txn, tables))
    # Events per key as recorded (clears under None), turned into name keys at the end.
    key_counts: collections.Counter[bytes | None] = collections.Counter()
    digest = _HistoryDigest()
    chain = log.genesis(store)
    expected_seq = 1
    broken_links = 0
    cursor = txn.cursor(db=tables.log)
    entries = cursor.iternext() if cursor.set_range(log.pack_seq(1)) else iter(())
    while chunk := list(itertools.islice(entries, settings.VERIFY_CHUNK)):
        seq_keys, records = zip(*chunk)
        if set(map(len, seq_keys)) != {_SEQ_SIZE}:
            chunk = _drop_bad_seq_keys(chunk, expected_seq, problems)
            if not chunk:
                continue
            seq_keys, records = zip(*chunk)
        del chunk
        seqs: Sequence[int] = range(expected_seq, expected_seq + len(seq_keys))
        if b"".join(seq_keys) == np.arange(seqs[0], seqs[0] + len(seqs), dtype=">u8").tobytes():
            expected_seq += len(seqs)
        else:
            seqs = [log.unpack_seq(seq_key) for seq_key in seq_keys]
            for seq in seqs:
                if seq != expected_seq:
                    problems.append(f"log: seq {expected_seq - 1} is followed by {seq}")
                expected_seq = seq + 1
        breaks, chain = log.chain_breaks(records, chain)
        for index in breaks:
            broken_links += 1
            if broken_links <= _MAX_LISTED:
                problems.append(
                    f"log: event {seqs[index]} does not match its chain hash "
                    f"(the event, or the log before it, was altered)"
                )
        ops, writer_ids, keys = log.record_fields(records)
        if _PLAIN_OPS.issuperset(ops) and writers.issuperset(writer_ids):
            key_counts.update(keys)
            digest.add_events(seqs, keys)
            continue
        # The seqs and keys of the events in the history index, and where the clears are.
        indexed_seqs: list[int] = []
        indexed_keys: list[bytes] = []
        indexed_clears: list[int] = []
        for seq, record, op_code, writer_id, key in zip(seqs, records, ops, writer_ids, keys):
            if not op_code:
                try:
                    log.decode_record(record)
                except ValueError as error:
                    problems.append(f"log: event {seq} cannot be decoded ({error})")
                    continue
            if op_code not in log.OP_CODES:
                problems.append(f"log: event {seq} has unknown operation code {op_code}")
                continue
            if op_code == log.ADD_MUTABLE_MANY:
                try:
                    log.decode_samples(log.decode_record(record)[6])
                except ValueError as error:
                    problems.append(f"log: event {seq} cannot be decoded ({error})")
            if writer_id not in writers:
                problems.append(f"log: event {seq} has unknown writer {writer_id}")
                writers.add(writer_id)
            if op_code == log.PROMOTE:
                continue  # touches no key: not in the history index
            if op_code == log.CLEAR:
                indexed_clears.append(len(indexed_keys))
            key_counts[key if op_code != log.CLEAR else None] += 1
            indexed_seqs.append(seq)
            indexed_keys.append(key)
        digest.add_events(indexed_seqs, indexed_keys, indexed_clears)
    if broken_links > _MAX_LISTED:
        problems.append(f"log: {broken_links - _MAX_LISTED} more events do not match their chain")
    counts: collections.Counter[bytes] = collections.Counter()
    for key_or_none, count in key_counts.items():
        counts[ALL_KEYS if key_or_none is None else name_key_of(key_or_none)] += count
    return problems, counts, digest.value


def _drop_bad_seq_keys(
    chunk: list[tuple[bytes, bytes]], expected_seq: int, problems: list[str]
) -> list[tuple[bytes, bytes]]:
    """The entries of `chunk` whose log table keys are seqs; the others are reported."""
    kept = []
    for seq_key, record in chunk:
        if len(seq_key) == _SEQ_SIZE:
            kept.append((seq_key, record))
            expected_seq = log.unpack_seq(seq_key) + 1
        else:
            problems.append(
                f"log: a key of {len(seq_key)} bytes ({bytes(seq_key[:16]).hex()}) "
                f"after event {expected_seq - 1} is not a seq (its entry is ignored)"
            )
    return kept


#: The size of a log table key (a seq) and of a history table entry.
_SEQ_SIZE = 8

#: The name hashes of the :class:`_HistoryDigest` of clears, which the history
#: index lists under ``ALL_KEYS`` (a tuple's hash: no key's bytes hash to it by design).
_CLEAR_HASH = hash((ALL_KEYS,))


class _HistoryDigest:
    """An order-independent digest of (name key, seq) pairs: the history index's entries.

    Summed, modulo 2**64, over every pair: a 64-bit mix of the name key's
    hash and the seq's. Computed over the events of the log and over the
    entries of the history table, it is the same exactly when the index
    lists every event under its own key (bar a chance of 2**-64), in
    memory of one chunk. Python's hash of bytes is keyed anew in every
    process (unless ``PYTHONHASHSEED`` fixes it), so entries cannot be
    made beforehand to collide.
    """

    def __init__(self) -> None:
        self.value = 0

    def add_events(
        self, seqs: Sequence[int], keys: Sequence[bytes], clears: Sequence[int] = ()
    ) -> None:
        """Add events with these seqs on these keys; those at the indices `clears` are clears."""
        if not seqs:
            return
        hashes = np.fromiter(map(hash, keys), np.int64, len(keys))
        if max(map(len, keys)) >= INLINE_LIMIT:
            for index, key in enumerate(keys):
                if len(key) >= INLINE_LIMIT:
                    hashes[index] = hash(name_key_of(key)[1:])
        hashes[list(clears)] = _CLEAR_HASH
        if isinstance(seqs, range):
            seq_array = np.arange(seqs.start, seqs.stop, dtype=np.uint64)
        else:
            seq_array = np.array(seqs, np.uint64)
        self._add(hashes.view(np.uint64), seq_array)

    def add_entries(self, name_key: bytes, seq_keys: bytes) -> None:
        """Add the history table's entries of `name_key`: its packed seqs, concatenated."""
        name_hash = _CLEAR_HASH if name_key == ALL_KEYS else hash(name_key[1:])
        seqs = np.frombuffer(seq_keys, ">u8").astype(np.uint64)
        self._add(np.full(len(seqs), np.int64(name_hash)).view(np.uint64), seqs)

    def _add(self, hashes: np.ndarray, seqs: np.ndarray) -> None:
        with np.errstate(over="ignore"):
            terms = _mix(hashes + _mix(seqs))
            self.value = (self.value + int(terms.sum(dtype=np.uint64))) % 2**64


def _mix(values: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser of each uint64 (a bijection that spreads every bit)."""
    values = values ^ (values >> np.uint64(30))
    values = values * np.uint64(0xBF58476D1CE4E5B9)
    values = values ^ (values >> np.uint64(27))
    values = values * np.uint64(0x94D049BB133111EB)
    return values ^ (values >> np.uint64(31))


def _readable_clear_seqs(txn: Any, tables: Tables, problems: list[str]) -> list[int]:
    """The seqs of the clears, as the history index lists them; none if it cannot be read."""
    try:
        return _clear_seqs(txn, tables)
    except _DAMAGE as error:
        problems.append(f"history index: its clears are unreadable ({error})")
        return []


def _clear_seqs(txn: Any, tables: Tables) -> list[int]:
    cursor = txn.cursor(db=tables.history)
    if not cursor.set_key(ALL_KEYS):
        return []
    return [log.unpack_seq(seq) for seq in cursor.iternext_dup(keys=False)]


def _replay_key(
    txn: Any, tables: Tables, name_key: bytes, clears: Sequence[int], until_seq: int | None = None
) -> tuple[tuple[bytes, Any] | None, int, int]:
    """Replay the events of one key (from the history index) up to `until_seq`.

    Returns
    -------
    (key, model value) — bytes, a set of packed members or a dict, as in
    :class:`_StateModel`, or :class:`_SortedRows` for members replayed in
    bulk — or None if the key does not exist then; the seq of the
    key's last event (0 if none); and how many of the events the index
    lists are not on this key (skipped: the history index is damaged).
    Undecodable events are skipped (the log check reports them).
    """
    replay, last = _key_replay(txn, tables, name_key, clears, until_seq)
    return replay.result(), last, replay.foreign


def _key_replay(
    txn: Any, tables: Tables, name_key: bytes, clears: Sequence[int], until_seq: int | None = None
) -> tuple[_KeyReplay, int]:
    """The events of one key (from the history index) up to `until_seq`, applied.

    Only the events after the last clear before the key's last event are
    read, and those ``settings.VERIFY_CHUNK`` at a time from the index as
    from the log: a key of any number of events needs memory for its state.

    Returns
    -------
    The replay, and the seq of the key's last event (0 if none).
    """
    replay = _KeyReplay(name_key)
    history = txn.cursor(db=tables.history)
    last = _last_event(history, name_key, until_seq)
    if not last:
        return replay, 0
    end = len(clears) if until_seq is None else bisect.bisect_right(clears, until_seq)
    before_last = bisect.bisect_left(clears, last)
    if before_last < end:
        return replay, last  # cleared after its last event
    # Seq keys sort as their seqs: start after the last clear, stop at `last`.
    first = clears[before_last - 1] + 1 if before_last else 0
    history.set_range_dup(name_key, log.pack_seq(first))  # true: `last` is at or after it
    entries = history.iternext_dup(keys=False)
    stop = log.pack_seq(last)
    log_cursor = txn.cursor(db=tables.log)
    # Applied in chunks of VERIFY_CHUNK events or LOG_CHUNK_BYTES, read a few
    # at a time: the key's past may hold many long values (an array sensor, a
    # key deleted and made again), which only the state bounds.
    chunk: list[bytes] = []
    chunk_keys: list[bytes] = []
    size = 0
    while seq_keys := list(itertools.islice(entries, _HISTORY_GROUP)):
        last_group = seq_keys[-1] >= stop
        if last_group:
            del seq_keys[bisect.bisect_right(seq_keys, stop) :]
        # A missing event is left out, as an undecodable one is skipped.
        for seq_key, record in log_cursor.getmulti(seq_keys):
            chunk_keys.append(seq_key)
            chunk.append(record)
            size += len(record)
        if len(chunk) >= settings.VERIFY_CHUNK or size >= settings.LOG_CHUNK_BYTES or last_group:
            replay.apply(chunk, chunk_keys)
            chunk, chunk_keys, size = [], [], 0
        if last_group:
            break
    if chunk:
        replay.apply(chunk, chunk_keys)
    return replay, last


#: How many of a key's events :func:`_key_replay` reads from the log at once.
_HISTORY_GROUP = 8


def _last_event(history: Any, name_key: bytes, until_seq: int | None) -> int:
    """The seq of the last event up to `until_seq` that the history index lists
    under `name_key`, read with the `history` cursor; 0 if none."""
    if until_seq is not None and history.set_range_dup(name_key, log.pack_seq(until_seq + 1)):
        found = history.prev_dup()  # the event before the first one after `until_seq`
    else:
        found = history.set_key(name_key) and history.last_dup()
    return log.unpack_seq(history.value()) if found else 0


class _KeyReplay:
    """The events of one key applied in order, runs of a sensor's samples in bulk.

    Members added in bulk wait as arrays (:func:`telstate.log.sample_rows`
    of add_mutable events, :func:`telstate.log.sample_member_rows` of an
    import's add_mutable_many events) while nothing else happens to the
    key; any other event first moves them into the :class:`_StateModel`,
    one by one.
    """

    def __init__(self, name_key: bytes) -> None:
        self.model = _StateModel()
        self.name_key = name_key
        #: Events read from the log that are not on the key (its history index is damaged).
        self.foreign = 0
        #: Events of the key applied since it was last deleted (or from the start),
        #: and the seq key of the first of them (if the caller gave seq keys).
        self.alive = 0
        self.alive_from: bytes | None = None
        #: Why the first event that could not be applied could not (the log is
        #: damaged: an event the key's type does not take, say), or None.
        self.damage: str | None = None
        self.key = b""
        self.rows: list[np.ndarray] = []
        self.pending = 0
        self.compacted = 0

    def apply(self, records: list[bytes], seq_keys: Sequence[bytes] = ()) -> None:
        """Apply the next events of the key, in log order (`seq_keys`: theirs, if known)."""
        samples = log.sample_rows(records)
        if samples is not None:
            key, rows = samples
            if name_key_of(key) != self.name_key:
                self.foreign += len(records)
                return
            try:
                self._add_rows(key, rows)
            except StoreError as error:  # (rows that waited, moved onto another type)
                if self.damage is None:
                    self.damage = str(error)
            if not self.alive and seq_keys:
                self.alive_from = seq_keys[0]
            self.alive += len(records)
            return
        for index, record in enumerate(records):
            try:
                raw = log.decode_record(record)
                if raw[0] not in _KEY_OPS or name_key_of(raw[4]) != self.name_key:
                    self.foreign += 1
                    continue
                members = self._rows_of(raw)
                if members is not None:
                    self._add_rows(raw[4], members)
                    self._alive(seq_keys, index)
                    continue
                if raw[0] == log.DELETE:
                    self._drop_rows()  # (the samples waiting go with the key)
                else:
                    self._move_rows()
                self.model.apply(raw)
            except ValueError:
                continue  # (undecodable: the log's check reports it)
            except StoreError as error:
                if self.damage is None:
                    self.damage = str(error)
                continue
            if raw[0] == log.DELETE:
                self.alive, self.alive_from = 0, None
            else:
                self._alive(seq_keys, index)
            self.key = raw[4]

    def _alive(self, seq_keys: Sequence[bytes], index: int) -> None:
        """Count an event of the key, the `index`-th of those being applied, as alive."""
        if not self.alive and seq_keys:
            self.alive_from = seq_keys[index]
        self.alive += 1

    def _rows_of(self, raw: log.RawEvent) -> np.ndarray | None:
        """The members event `raw` adds, as rows, if it adds members that can wait so."""
        if raw[0] == log.ADD_MUTABLE_MANY:
            return log.sample_member_rows(raw[6])
        if raw[0] == log.ADD_MUTABLE and (self.rows or raw[4] not in self.model.data):
            # (A sample after an import's, or the first of a key made anew.)
            return np.frombuffer(pack_timestamp(raw[3]) + raw[6], np.uint8).reshape(1, -1)
        return None

    def _add_rows(self, key: bytes, rows: np.ndarray) -> None:
        if self.rows and (key != self.key or rows.shape[1] != self.rows[0].shape[1]):
            self._move_rows()  # rows of one key and one width wait together
        self.key = key
        self.rows.append(rows)
        self.pending += len(rows)
        if self.pending > 2 * self.compacted + settings.VERIFY_CHUNK:
            # A sample added again is stored once: keep memory to the distinct ones.
            self.rows = [_sorted_unique(np.concatenate(self.rows))]
            self.pending = self.compacted = len(self.rows[0])

    def result(self) -> tuple[bytes, Any] | None:
        """(key, model value), or None if the key does not exist after the events.

        Raises
        ------
        StoreError
            If an event could not be applied: one its key's type does not take
            (the log is damaged; undecodable events are skipped, the log's
            check reports them).
        """
        if self.damage is not None:
            raise StoreError(self.damage)
        if self.rows and not self.model.data:
            # Kept as one array, not two: a sensor's samples may be most of the memory.
            self.rows = [np.concatenate(self.rows)]
            return self.key, _SortedRows(self.rows[0])
        self._move_rows()
        value = self.model.data.get(self.key)
        return None if value is None else (self.key, value)

    def _drop_rows(self) -> None:
        self.rows = []
        self.pending = self.compacted = 0

    def _move_rows(self) -> None:
        if not self.rows:
            return
        rows = np.concatenate(self.rows)
        self.rows = []
        self.pending = self.compacted = 0
        data = rows.tobytes()
        width = rows.shape[1]
        members = self.model.data.get(self.key)
        if members is None:
            members = self.model.data[self.key] = set()
        elif type(members) is not set:
            raise _of_another_type(self.key, "samples added to")
        members.update(data[start : start + width] for start in range(0, len(data), width))


class _SortedRows:
    """A mutable key's replayed members: the distinct rows of a 2-D uint8 array, sorted."""

    def __init__(self, rows: np.ndarray) -> None:
        self.rows = _sorted_unique(rows)

    def equals(self, members: Collection[bytes]) -> bool:
        """Whether `members` are these, in the same order (zset order)."""
        rows = self.rows
        if len(members) != len(rows) or set(map(len, members)) != {rows.shape[1]}:
            return False
        return b"".join(members) == rows.tobytes()


def _sorted_unique(rows: np.ndarray) -> np.ndarray:
    """The distinct rows of a 2-D uint8 array, in the order of their bytes (as zsets keep them)."""
    count, width = rows.shape
    if count < 2:
        return rows
    stamps = np.ascontiguousarray(rows[:, :8]).view(">u8")[:, 0]
    if (stamps[1:] > stamps[:-1]).all():
        return rows  # timestamps increase (a sensor's samples mostly): sorted and distinct
    # Big-endian words of the rows, zero-padded at the end: they sort as the bytes do.
    words = -(-width // 8)
    padded = np.zeros((count, words * 8), np.uint8)
    padded[:, :width] = rows
    columns = padded.view(">u8").astype(np.uint64)
    order = np.lexsort(columns.T[::-1])
    columns = columns[order]
    distinct = np.ones(count, bool)
    distinct[1:] = (columns[1:] != columns[:-1]).any(axis=1)
    return rows[order[distinct]]


def _difference(key_type: KeyType, value: Any, logged: tuple[bytes, Any] | None) -> str:
    """How a stored key differs from its replay; empty if it does not."""
    if logged is None:
        return "in the state but not in the log"
    replayed = logged[1]
    logged_type = (
        KeyType.MUTABLE if isinstance(replayed, _SortedRows) else _MODEL_TYPES[type(replayed)]
    )
    if key_type != logged_type:
        return f"{key_type.name.lower()} in the state, {logged_type.name.lower()} in the log"
    if isinstance(replayed, _SortedRows):
        same = isinstance(value, list) and replayed.equals(value)
    else:
        same = value == (sorted(replayed) if logged_type == KeyType.MUTABLE else replayed)
    if not same:
        return "value differs between state and log"
    return ""
