"""What an import may hold, and what it may do to the keys a store already has.

Every backend's ``load_records`` and ``load_from_file`` (and ``telstate
import``) follow these rules, so an RDB file means the same thing whatever
it is loaded into.

Records
-------
A record is ``(key, key_type, value)``: bytes for an immutable key, a
sequence of members (8-byte big-endian timestamp + value) for a mutable
key, a dict of sub-key to value for an indexed key, everything bytes. A
member timestamp must be finite and not negative (-0.0, whose sign bit
would sort it after every other time, counts as negative), and a member
must have its 8 bytes. Members may come in any order and repeat: they are
stored as the zset they stand for (sorted, distinct). Anything else is an
:class:`~telstate.errors.RdbParseError` (wrong types, short members) or
:class:`~telstate.errors.InvalidTimestampError` naming the key.

Keys that already exist
-----------------------
An import adds what the store lacks and never changes a value the store
holds:

- a mutable key gets the samples it lacks (the union, as ``ZADD`` does in
  katsdptelstate's Redis load);
- an indexed key gets the sub-keys it lacks; a sub-key it has must have
  the same value;
- an immutable key must have the same value;
- a key of another type is a conflict.

A conflict raises :class:`~telstate.errors.ImmutableKeyError` naming the
key. This departs from katsdptelstate's Redis load (``SET`` and ``HSET``
overwrite, and a type clash fails half-way with ``WRONGTYPE``) and its
memory load (every key replaced) on purpose: immutable keys and sub-keys
never change in telstate, the LMDB log has no event that would overwrite
one, and the frontend raises the same error for the same write. Importing
a file twice therefore changes nothing the second time.

When an import fails, the store is unchanged where the backend can
promise it. The LMDB store's ``load_from_file`` of a regular file (by
path, opened once, or a seekable file object) checks the whole file
(records, conflicts with the store, and copies of a key in the file that
contradict each other) before it writes anything; the memory backend's
loads are all or nothing. The Redis backend (and the asyncio ones) check
each batch of about 10,000 elements before writing it, so a bad record
leaves the batches before it, as katsdptelstate's Redis load would:
checking a file whole first would parse it twice, and Redis loads are
meant to be fast. The LMDB store's ``load_records`` of an iterator
checks each chunk in the transaction that writes it.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from typing import Any, BinaryIO

import numpy as np

from .backend import PackedMembers, Record
from .errors import ImmutableKeyError, InvalidTimestampError, RdbParseError
from .utils import KeyType, PathType, display_str

# A packed timestamp is valid iff its big-endian bits, read as an unsigned
# integer, are below those of +inf: that excludes the sign bit (negative
# numbers, -0.0, negative NaNs), +inf and the positive NaNs.
_INFINITY_BITS = 0x7FF0_0000_0000_0000


_first8 = operator.itemgetter(slice(0, 8))


def check_record(record: Any, source: PathType | None = None) -> Record:
    """Check one record to import; return it with a mutable key's members in zset order.

    Parameters
    ----------
    record
        ``(key, key_type, value)``, as an RDB reader yields them.
    source
        The file the record comes from, named in errors.

    Raises
    ------
    RdbParseError
        If the record, key or value has the wrong type, or a member is
        shorter than 8 bytes.
    InvalidTimestampError
        If a member's timestamp is negative or not finite.
    """
    try:
        key, key_type, value = record
    except (TypeError, ValueError):
        raise RdbParseError(source, f"{record!r:.80} is not a (key, type, value) record") from None
    if not isinstance(key, bytes):
        raise RdbParseError(source, f"key {key!r:.80} is not bytes")
    name = display_str(key)
    if key_type == KeyType.IMMUTABLE:
        if not isinstance(value, bytes):
            raise RdbParseError(source, f"immutable key {name}: value is not bytes")
        return key, KeyType.IMMUTABLE, value
    if key_type == KeyType.INDEXED:
        if not isinstance(value, Mapping) or not all(
            type(sub_key) is bytes and type(sub_value) is bytes
            for sub_key, sub_value in value.items()
        ):
            raise RdbParseError(source, f"indexed key {name}: value is not a dict of bytes")
        return key, KeyType.INDEXED, value if type(value) is dict else dict(value)
    if key_type == KeyType.MUTABLE:
        if type(value) is PackedMembers:  # one buffer, sorted and distinct already
            return key, KeyType.MUTABLE, _checked_packed(name, value, source)
        return key, KeyType.MUTABLE, _checked_members(name, value, source)
    raise RdbParseError(source, f"key {name}: unknown key type {key_type!r}")


def _checked_packed(name: str, members: PackedMembers, source: PathType | None) -> PackedMembers:
    if members.size < 8:
        raise RdbParseError(source, f"mutable key {name}: a member is shorter than its timestamp")
    rows = np.frombuffer(members.buffer, np.uint8).reshape(len(members), members.size)
    _check_stamps(name, np.ascontiguousarray(rows[:, :8]).view(">u8"), source)
    return members


def _check_stamps(name: str, stamps: np.ndarray, source: PathType | None) -> None:
    """Raise InvalidTimestampError if a packed timestamp (as big-endian bits) is not valid."""
    if len(stamps) and stamps.max() >= _INFINITY_BITS:
        raise InvalidTimestampError(
            f"mutable key {name}: a sample has a negative or non-finite timestamp"
            + (f" (in {os.fsdecode(source)!r})" if source else "")
        )


def _checked_members(name: str, members: Any, source: PathType | None) -> list[bytes]:
    if isinstance(members, (bytes, str, Mapping)) or not isinstance(members, Collection):
        raise RdbParseError(source, f"mutable key {name}: value is not a sequence of members")
    if not isinstance(members, Sequence):
        members = list(members)  # e.g. a store's lazy members (valid only while it is read)
    if not set(map(type, members)) <= {bytes}:
        raise RdbParseError(source, f"mutable key {name}: a member is not bytes")
    if members and min(map(len, members)) < 8:
        raise RdbParseError(source, f"mutable key {name}: a member is shorter than its timestamp")
    _check_stamps(name, np.frombuffer(b"".join(map(_first8, members)), ">u8"), source)
    if not all(map(operator.lt, members, members[1:])):
        return sorted(set(members))
    return members if type(members) is list else list(members)


def batches(
    records: Iterable[Any], source: PathType | None = None, elements: int = 10_000
) -> Iterator[list[Record]]:
    """`records`, checked (:func:`check_record`), in lists of about `elements` elements.

    An element is an immutable value, a sample or a sub-key; a bigger
    record makes a list of its own.
    """
    batch: list[Record] = []
    count = 0
    for record in records:
        checked = check_record(record, source)
        batch.append(checked)
        count += 1 if checked[1] == KeyType.IMMUTABLE else len(checked[2])
        if count >= elements:
            yield batch
            batch = []
            count = 0
    if batch:
        yield batch


def contradiction(record: Record, existing_type: KeyType | None, existing: Any) -> str | None:
    """Why importing `record` would change what the store holds, or None if it would not.

    `existing` is the stored value of an immutable key, the stored dict of
    an indexed key (or anything with ``.get(sub_key)``), unused otherwise.
    """
    key, key_type, value = record
    if existing_type is None:
        return None
    name = display_str(key)
    if existing_type != key_type:
        return (
            f"cannot import {name} as a {key_type.name.lower()} key: "
            f"the store has it as a {existing_type.name.lower()} key"
        )
    if key_type == KeyType.IMMUTABLE and existing != value:
        return f"cannot import immutable key {name}: the store has it with another value"
    if key_type == KeyType.INDEXED:
        assert isinstance(value, dict)
        for sub_key, sub_value in value.items():
            stored = existing.get(sub_key)
            if stored is not None and stored != sub_value:
                return (
                    f"cannot import indexed key {name}: the store has sub-key "
                    f"{display_str(sub_key)} with another value"
                )
    return None


def raise_contradiction(record: Record, existing_type: KeyType | None, existing: Any) -> None:
    """Raise :exc:`ImmutableKeyError` if :func:`contradiction` finds one."""
    reason = contradiction(record, existing_type, existing)
    if reason is not None:
        raise ImmutableKeyError(reason)


def rereadable(file: BinaryIO) -> bool:
    """Whether the file object `file` can be read twice: a seekable one (not a pipe)."""
    try:
        return bool(file.seekable())
    except (AttributeError, OSError, ValueError):
        return False


def file_source(file: PathType | BinaryIO) -> PathType | None:
    """The name to put in errors about records of `file`."""
    if isinstance(file, (str, bytes, os.PathLike)):
        return file
    name = getattr(file, "name", None)
    return name if isinstance(name, (str, bytes, os.PathLike)) else None
