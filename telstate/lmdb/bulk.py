"""Importing whole keys (RDB records) into a store in bulk.

:meth:`LmdbBackend.load_records` and ``load_from_file`` (and ``telstate
import``) come here. What an import may hold and what it does to existing
keys are :mod:`telstate.import_rules`; this module makes it fast and
bounded:

- Records stream in from the reader and are cut into *chunks* of at most
  ``settings.LOAD_CHUNK`` values (samples, sub-keys, immutable values)
  and about ``settings.LOAD_CHUNK_BYTES`` bytes (a big key is cut into
  pieces across chunks), one write transaction each, so memory stays
  bounded whatever the file size (two chunks at a time, the one written
  and the next; the largest single key is the reader's to hold).
- A chunk is checked whole (records, and conflicts with the store inside
  its transaction) before it writes anything. ``load_from_file`` of a
  path or seekable file checks the whole file first, each record against
  the store and against what the file's earlier records say of its key
  (kept as digests: this pass's memory grows with the file's number of
  keys and sub-keys, about 200 bytes each, not with their values), so a
  bad file, or one that contradicts itself, leaves the store unchanged;
  ``load_records`` of an iterator can fail after earlier chunks committed
  (each committed chunk is whole keys or whole pieces of keys, and the
  store verifies).
- The write pass is not one transaction: a process killed between
  chunks, or another writer creating a contradicting key after the check
  pass, leaves the chunks committed so far. ``load_from_file`` therefore
  records the file in the meta table (:class:`~telstate.lmdb.layout.ImportRecord`)
  in its first chunk's transaction and deletes it in its last one's (the
  chunk after each is read before it is written, to know the last), so
  an unfinished import shows; importing the file again completes it.
- Every element is still in an event, made by the backend's one append
  function, so the log, replay and verify see an import as the writes it
  stands for: a set_immutable, one set_indexed per sub-key, and a mutable
  key's samples in add_mutable_many events of at most
  ``settings.BULK_EVENT_SAMPLES`` samples and about
  ``settings.BULK_EVENT_BYTES`` bytes each (see :mod:`telstate.log`); the
  first of them in a store marks it log format 3. Samples with long values
  (arrays, mostly) get one add_mutable event each, since the store points
  at the event that holds such a value, and so do samples that go in
  among a key's existing ones. Log and history entries go in with LMDB
  appends.
- Samples that come after a key's latest sample (always, for a new key)
  go straight into sealed blocks (:func:`~telstate.lmdb.samples.append_samples`);
  samples among existing ones are merged with the stored ones once
  (:func:`~telstate.lmdb.samples.absent_members`), and only those the key
  lacks take the per-sample path, so a file imported again (or an
  unfinished import completed) costs a read of what the store has.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

from .. import log
from ..backend import PackedMembers, Record
from ..errors import ImmutableKeyError, StoreError
from ..import_rules import check_record, raise_contradiction
from ..utils import KeyType, PathType, display_str
from . import settings
from .layout import (
    INDEXED,
    INLINE_LIMIT,
    KEY_ID,
    MUTABLE,
    TIMESTAMP,
    U32,
    ImportRecord,
    KeyRecord,
    Tables,
    checked_put,
    first8,
    inline,
    name_key_of,
)
from .samples import absent_members, append_samples, latest_member
from .state import indexed_value
from .writes import WriteTxn, key_counter

if TYPE_CHECKING:
    from .backend import LmdbBackend

#: Called after each chunk with the phase (``"checking"`` the file first,
#: or ``"importing"``) and the number of values (samples, sub-keys and
#: immutable values) the chunk held.
Progress = Callable[[str, int], None]


def load(
    backend: LmdbBackend,
    records: Iterable[Record],
    source: PathType | None = None,
    progress: Progress | None = None,
    unfinished: ImportRecord | None = None,
) -> int:
    """Import `records` chunk by chunk; return the number of keys (see the module docstring).

    With `unfinished`, an import of more than one chunk records it in the
    store's meta table in its first chunk and deletes it in its last (and
    an import of one chunk deletes it), so that a store holding part of
    the file says so.
    """
    keys = 0

    def counted() -> Iterator[Record]:
        nonlocal keys
        for record in records:
            keys += 1
            yield record

    chunks = _chunks(counted(), source)
    current = next(chunks, None)
    first = True
    while current is not None:
        chunk, events = current
        # The chunk after this one, read before this one is written: so the
        # last chunk is known, and its transaction clears the import's record.
        current = next(chunks, None)
        with backend.write() as wtxn:
            _write_chunk(wtxn, chunk)
            if unfinished is not None and (first or current is None):
                _record_import(wtxn, unfinished, finished=current is None)
        first = False
        if progress is not None:
            progress("importing", events)
    return keys


def _record_import(wtxn: WriteTxn, unfinished: ImportRecord, finished: bool) -> None:
    """Record `unfinished` in the meta table, or delete it there if `finished`."""
    meta = wtxn.tables.meta
    if finished:
        if wtxn.txn.delete(unfinished.entry, db=meta):
            wtxn.changed = True  # committed even if the chunk added nothing (a file again)
        return
    checked_put(wtxn.txn, unfinished.entry, unfinished.encode(), meta)
    wtxn.changed = True


def check(
    backend: LmdbBackend | None,
    records: Iterable[Record],
    source: PathType | None = None,
    progress: Progress | None = None,
) -> None:
    """Check `records` against the rules, the store and each other, chunk by chunk, writing nothing.

    Each chunk is checked in a short read transaction of its own. A record
    must agree with the store and with the earlier records of `records`
    (a key may be in two databases of an RDB file, maybe many chunks apart):
    the write pass commits chunk by chunk, so a contradiction it would meet
    only there would leave the chunks before it. With no `backend`, as
    against an empty store (for a store not made yet).
    """
    earlier = _FileKeys(source)
    for chunk, events in _chunks(records, source):
        if backend is not None:
            backend._read(_check_chunk, chunk)
        for piece in chunk:
            earlier.check_and_add(piece)
        if progress is not None:
            progress("checking", events)


def _chunks(
    records: Iterable[Record], source: PathType | None
) -> Iterator[tuple[list[Record], int]]:
    """Checked records, cut into pieces and gathered into chunks: (pieces, values) each."""
    chunk: list[Record] = []
    events = size = 0
    for record in records:
        for piece in _pieces(check_record(record, source)):
            chunk.append(piece)
            events += _events_of(piece)
            size += _size_of(piece)
            if events >= settings.LOAD_CHUNK or size >= settings.LOAD_CHUNK_BYTES:
                yield chunk, events
                chunk = []
                events = size = 0
    if chunk:
        yield chunk, events


def _check_chunk(txn: Any, tables: Tables, chunk: list[Record]) -> None:
    for piece in chunk:
        _check_conflict(txn, tables, piece)


def _events_of(record: Record) -> int:
    return 1 if record[1] == KeyType.IMMUTABLE else len(record[2])


def _size_of(record: Record) -> int:
    value = record[2]
    if isinstance(value, bytes):
        return len(value)
    if isinstance(value, PackedMembers):
        return len(value.buffer)
    if isinstance(value, dict):
        return sum(len(sub_key) + len(sub_value) for sub_key, sub_value in value.items())
    return sum(map(len, value))


def _pieces(record: Record) -> Iterator[Record]:
    """`record` cut into pieces that each fit a chunk (whole, if it fits one)."""
    key, key_type, value = record
    if key_type == KeyType.IMMUTABLE:
        yield record
        return
    count = len(value)
    size = _size_of(record)
    per_piece = max(1, min(settings.LOAD_CHUNK, count * settings.LOAD_CHUNK_BYTES // max(size, 1)))
    if key_type == KeyType.MUTABLE:
        if count <= per_piece:
            yield record
            return
        for start in range(0, count, per_piece):
            if isinstance(value, PackedMembers):
                yield key, key_type, value.part(start, start + per_piece)
            else:
                assert isinstance(value, list)
                yield key, key_type, value[start : start + per_piece]
        return
    if count <= per_piece:
        yield record
        return
    assert isinstance(value, dict)
    items = iter(value.items())
    while part := dict(itertools.islice(items, per_piece)):
        yield key, key_type, part


_A = {
    KeyType.IMMUTABLE: "an immutable",
    KeyType.MUTABLE: "a mutable",
    KeyType.INDEXED: "an indexed",
}


def _digest(data: bytes) -> bytes:
    """What stands for `data` in :class:`_FileKeys`: itself if short, else its digest.

    The two forms differ in length, so they never stand for each other, and
    the many short sub-keys and values cost no hashing.
    """
    return data if len(data) < 16 else hashlib.blake2b(data, digest_size=16).digest()


class _FileKeys:
    """What the records checked so far establish about each key, in digests.

    Per key (by its keys-table key, at most 481 bytes): its type, and the
    digest of an immutable key's value or the digests of an indexed key's
    sub-keys and their values (at most 16 bytes each, see :func:`_digest`).
    Memory grows with the number of keys and sub-keys, not with the size
    of their values.
    """

    def __init__(self, source: PathType | None) -> None:
        self._where = f" (in {os.fsdecode(source)!r})" if source is not None else ""
        self._keys: dict[bytes, tuple[KeyType, Any]] = {}

    def check_and_add(self, record: Record) -> None:
        """Raise :exc:`ImmutableKeyError` if `record` contradicts an earlier one; else note it."""
        key, key_type, value = record
        name_key = name_key_of(key)
        known: tuple[KeyType, Any] | None = self._keys.get(name_key)
        if known is None:
            if key_type == KeyType.IMMUTABLE:
                assert isinstance(value, bytes)
                self._keys[name_key] = (key_type, _digest(value))
                return
            sub_keys: dict[bytes, bytes] | None = {} if key_type == KeyType.INDEXED else None
            known = self._keys[name_key] = (key_type, sub_keys)
        name = display_str(key)
        if known[0] != key_type:
            self._raise(
                f"cannot import {name} as {_A[key_type]} key: "
                f"the file has it as {_A[known[0]]} key too"
            )
        if key_type == KeyType.IMMUTABLE:
            assert isinstance(value, bytes)
            if _digest(value) != known[1]:
                self._raise(f"cannot import immutable key {name}: the file has another value too")
        elif key_type == KeyType.INDEXED:
            assert isinstance(value, dict)
            sub_keys = known[1]
            assert sub_keys is not None
            for sub_key, sub_value in value.items():
                digest = _digest(sub_value)
                if sub_keys.setdefault(_digest(sub_key), digest) != digest:
                    self._raise(
                        f"cannot import indexed key {name}: the file has sub-key "
                        f"{display_str(sub_key)} with another value too"
                    )

    def _raise(self, reason: str) -> NoReturn:
        raise ImmutableKeyError(reason + self._where)


class _SubKeys:
    """The stored sub-keys of an indexed key, looked up one at a time (for the conflict rules)."""

    def __init__(self, txn: Any, tables: Tables, key_id: bytes) -> None:
        self._args = (txn, tables, key_id)

    def get(self, sub_key: bytes) -> bytes | None:
        return indexed_value(*self._args, sub_key)


def _stored(txn: Any, tables: Tables, key: bytes) -> KeyRecord | None:
    data = txn.get(name_key_of(key), db=tables.keys)
    return None if data is None else KeyRecord.decode(data)


def _check_conflict(txn: Any, tables: Tables, record: Record) -> None:
    stored = _stored(txn, tables, record[0])
    if stored is None:
        return
    existing: Any = stored.value
    if stored.type_code == INDEXED:
        existing = _SubKeys(txn, tables, stored.key_id)
    raise_contradiction(record, stored.key_type, existing)


def _write_chunk(wtxn: WriteTxn, chunk: list[Record]) -> None:
    """Check every piece of `chunk` against the store, then write them all."""
    txn, tables = wtxn.txn, wtxn.tables
    _check_chunk(txn, tables, chunk)
    for piece in chunk:
        # Again: a key may be twice in one file (in two databases), so in one chunk.
        _check_conflict(txn, tables, piece)
        key, key_type, value = piece
        if key_type == KeyType.IMMUTABLE:
            assert isinstance(value, bytes)
            wtxn.set_immutable(key, value)  # the same value if it exists (checked)
        elif key_type == KeyType.MUTABLE:
            assert isinstance(value, (list, PackedMembers))
            _write_mutable(wtxn, key, value)
        else:
            assert isinstance(value, dict)
            _write_indexed(wtxn, key, value)


def is_newest(txn: Any, tables: Tables, key_id: bytes) -> bool:
    """Whether `key_id` is the last one given out: no table holds a greater one."""
    return KEY_ID.unpack(key_id)[0] + 1 == key_counter(txn, tables)


def _write_mutable(wtxn: WriteTxn, key: bytes, members: list[bytes] | PackedMembers) -> None:
    txn, tables = wtxn.txn, wtxn.tables
    name_key = name_key_of(key)
    stored = _stored(txn, tables, key)
    if stored is None:
        stored = wtxn.new_key(name_key, MUTABLE, key, b"")
        newest = True
    else:
        # Samples up to the key's latest that it lacks take the per-sample
        # path, which puts late ones in their blocks; those it has (a file
        # imported again) are found by one merge with the stored ones.
        latest = latest_member(txn, tables, stored.key_id, stored.flags)
        after = bisect.bisect_right(members, latest)
        early = members.part(0, after) if isinstance(members, PackedMembers) else members[:after]
        absent = absent_members(txn, tables, stored.key_id, stored.flags, stored.sealed, early)
        for member in absent:
            wtxn.add_mutable(key, member[8:], TIMESTAMP.unpack_from(member)[0])
        if after == len(members):
            return
        if after:
            members = members[after:]
        stored = _stored(txn, tables, key)  # the per-sample path may have changed its flags
        assert stored is not None
        newest = is_newest(txn, tables, stored.key_id)
    append_samples(
        txn, tables, name_key, stored.key_id, stored.flags, members, wtxn.next_seq(), newest
    )
    longest = members.size - 8 if isinstance(members, PackedMembers) else max(map(len, members)) - 8
    if longest >= INLINE_LIMIT:
        # The store points at the event of each long value: one event per sample.
        values = [memoryview(member)[8:] for member in members]
        stamps = np.frombuffer(b"".join(map(first8, members)), ">f8")
        wtxn.append_events(log.ADD_MUTABLE, name_key, key, values, None, stamps)
        return
    per_event = max(1, min(settings.BULK_EVENT_SAMPLES, settings.BULK_EVENT_BYTES // (longest + 8)))
    starts = range(0, len(members), per_event)
    if isinstance(members, PackedMembers):
        size = members.size
        payloads = [
            log.encode_uniform_samples(
                members.buffer[start * size : (start + per_event) * size], size
            )
            for start in starts
        ]
    else:
        payloads = [log.encode_samples(members[start : start + per_event]) for start in starts]
    wtxn.append_events(log.ADD_MUTABLE_MANY, name_key, key, payloads)


def _write_indexed(wtxn: WriteTxn, key: bytes, sub_keys: dict[bytes, bytes]) -> None:
    txn, tables = wtxn.txn, wtxn.tables
    if _stored(txn, tables, key) is not None:
        for sub_key, value in sub_keys.items():
            wtxn.set_indexed(key, sub_key, value)  # skips sub-keys it has (the same: checked)
        return
    name_key = name_key_of(key)
    key_id = wtxn.new_key(name_key, INDEXED, key, b"").key_id
    entries = []
    for sub_key, value in sub_keys.items():
        data = value
        if len(sub_key) >= INLINE_LIMIT:
            data = U32.pack(len(sub_key)) + sub_key + value
        entries.append((key_id + inline(sub_key), data))
    entries.sort()
    # A new key has the greatest key id: its entries are appends.
    added = txn.cursor(tables.indexed).putmulti(entries, overwrite=False, append=True)
    if added != (len(entries), len(entries)):
        raise StoreError(f"indexed key {display_str(key)}: sub-keys overlap stored ones")
    wtxn.append_events(log.SET_INDEXED, name_key, key, list(sub_keys.values()), list(sub_keys))
