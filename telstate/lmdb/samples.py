"""The sample engine: the samples of mutable keys, in a tail and sealed blocks.

A mutable key's samples live in two places. The *tail* holds its recent
samples, one sorted duplicate each in the samples table, so an add is one
put. When the tail reaches ``settings.TAIL_MAX`` samples, all but those
with its last timestamp are *sealed* into a block: one record of the
blocks table, key id + first timestamp -> count n, n big-endian
timestamps and a msgpack array of the values, sorted like the zset.
Blocks are disjoint in time and all older than the tail (the key record
keeps the last sealed timestamp), so reading a long history is a scan of
a few big records. A late sample (not after the sealed timestamp) goes
into its block, which splits in two at a timestamp boundary when it
outgrows ``settings.BLOCK_MAX``. Keys with sample values of 480 bytes or
more (arrays, mostly) are not sealed: their reads are dominated by
copying the values anyway. The table layouts are in
:mod:`telstate.lmdb.layout`.

Invariant
---------
For every mutable key, with ``sealed`` the timestamp in its key record:

- Every timestamp is in [0, inf] (the callers reject others), so packed
  big-endian timestamps sort like the numbers and ``NO_SEALED`` (-1)
  cannot be one: ``sealed == NO_SEALED`` exactly when the key has no
  blocks.
- The samples of the key are the union of its blocks and its tail, each
  (timestamp, value) once; sorted by (timestamp, value bytes) that union
  is the key's zset.
- Blocks hold members with timestamp <= ``sealed``; the tail holds those
  with timestamp > ``sealed``. Blocks are disjoint in time: each block's
  table key is key id + its first timestamp, and all members of one
  timestamp are in one block (so a block of a single timestamp may exceed
  ``BLOCK_MAX``; it cannot be split).
- Every block is non-empty and sorted; the last block ends at ``sealed``.
- Only keys without long values in the tail get sealed, and a tail is
  only sealed when it holds at least two timestamps: checking that
  costs two cursor moves, not a scan, so many samples at one timestamp
  stay cheap to add.

Every seek checks that it stays within the key id it seeks in, so damage
or odd input cannot reach another key's records.
"""

from __future__ import annotations

import bisect
import itertools
import math
import struct
from collections.abc import Iterator, Sequence
from typing import Any

import msgpack
import numpy as np

from .. import log
from ..backend import PackedMembers
from ..errors import StoreError
from . import settings
from .layout import (
    FLAG_LONG_VALUES,
    INLINE_LIMIT,
    INLINE_PREFIX,
    KEY_ID,
    LONG_PADDING,
    LONG_SAMPLE_LEN,
    NO_SEALED,
    TIMESTAMP,
    U32,
    Tables,
    after8,
    checked_put,
    first8,
    update_record,
)

_BYTES_ONLY = {bytes}
_U16 = struct.Struct(">H")


def _encode_block(members: list[bytes]) -> bytes:
    """One block of members (8-byte timestamp + full value), in order."""
    return b"".join(
        [
            U32.pack(len(members)),
            *map(first8, members),
            msgpack.packb(list(map(after8, members))),
        ]
    )


class _Block:
    """A block read from the blocks table: timestamps decoded at once, values on demand."""

    __slots__ = ("data", "count", "stamps", "_values")

    def __init__(self, data: bytes) -> None:
        self.data = data
        try:
            self.count = count = U32.unpack_from(data)[0]
            self.stamps: tuple[float, ...] = struct.unpack_from(f">{count}d", data, 4)
        except struct.error:
            raise StoreError(f"damaged sample block ({len(data)} bytes)") from None
        if not count:
            raise StoreError("damaged sample block: it is empty")
        self._values: list[bytes] | None = None

    def values(self) -> list[bytes]:
        if self._values is None:
            try:
                values = msgpack.unpackb(self.data[4 + 8 * self.count :])
            except Exception as error:  # msgpack raises many kinds on damaged input
                raise StoreError(f"damaged sample block: {error!r}") from None
            if (
                type(values) is not list
                or len(values) != self.count
                or set(map(type, values)) != _BYTES_ONLY
            ):
                raise StoreError("damaged sample block: its values do not match its timestamps")
            self._values = values
        return self._values

    def member(self, index: int) -> bytes:
        return self.data[4 + 8 * index : 12 + 8 * index] + self.values()[index]

    def members(self) -> list[bytes]:
        stamps = self.data[4 : 4 + 8 * self.count]
        return [stamps[8 * i : 8 * i + 8] + value for i, value in enumerate(self.values())]

    def before(self, start: float) -> int:
        """Index of the greatest member not above the packed `start`, or -1.

        That is the last sample before `start`, or one at `start` with an
        empty value (ZREVRANGEBYLEX's inclusive bound, which Redis uses).
        """
        index = bisect.bisect_left(self.stamps, start)
        if index < self.count and self.stamps[index] == start and not self.values()[index]:
            return index
        return index - 1


def _long_value(txn: Any, tables: Tables, member: bytes) -> bytes:
    """The full value of a long tail member, from the event that added it."""
    record = txn.get(member[-8:], db=tables.log)
    if record is None:
        raise StoreError(f"the log lacks event {log.unpack_seq(member[-8:])} of a sample")
    try:
        return log.decode_record(record)[6]
    except ValueError as error:
        raise StoreError(f"event {log.unpack_seq(member[-8:])}: {error}") from None


def _check_member(member: bytes) -> bytes:
    if len(member) < 8:
        raise StoreError(f"damaged sample: {len(member)} bytes, without a timestamp")
    return member


def _tail_members(txn: Any, tables: Tables, members: list) -> list[bytes]:
    """Tail members as full members: long values fetched, and the order they lost restored."""
    resolved = []
    for member in members:
        member = _check_member(bytes(member))
        if len(member) == LONG_SAMPLE_LEN:
            member = member[:8] + _long_value(txn, tables, member)
        resolved.append(member)
    resolved.sort()
    return resolved


def _max_of_run(txn: Any, tables: Tables, key_id: bytes, cursor: Any) -> bytes:
    """The greatest member with the timestamp of the tail member at `cursor`.

    Long values lost their order, so every member of the run is compared.
    """
    member = bytes(cursor.value())
    stamp = member[:8]
    run = [member]
    while cursor.prev_dup() and cursor.value()[:8] == stamp:
        run.append(bytes(cursor.value()))
    return _tail_members(txn, tables, run)[-1]


def latest_member(txn: Any, tables: Tables, key_id: bytes, flags: int) -> bytes:
    """The greatest (timestamp, value) member of a mutable key (always in its tail)."""
    cursor = txn.cursor(tables.samples)
    if not (cursor.set_key(key_id) and cursor.last_dup()):
        raise StoreError(f"mutable key id {key_id.hex()} has no samples")
    if flags & FLAG_LONG_VALUES:
        return _max_of_run(txn, tables, key_id, cursor)
    return _check_member(bytes(cursor.value()))


def _previous_member(
    txn: Any, tables: Tables, key_id: bytes, flags: int, sealed: float, start: float
) -> bytes | None:
    """The greatest member not above the packed `start` (> 0), or None (see _Block.before)."""
    bound = TIMESTAMP.pack(start)
    if start > sealed:
        cursor = txn.cursor(tables.samples)
        if start < math.inf and cursor.set_range_dup(key_id, bound):
            if cursor.value() == bound:
                return bound
            found = cursor.prev_dup()
        else:
            found = cursor.set_key(key_id) and cursor.last_dup()
        if found:
            if flags & FLAG_LONG_VALUES:
                return _max_of_run(txn, tables, key_id, cursor)
            return _check_member(bytes(cursor.value()))
    if sealed == NO_SEALED:
        return None
    # In the block that starts at `start` (an empty value) or the last one before.
    cursor = txn.cursor(tables.blocks)
    found = cursor.set_range(key_id + bound)
    if found and cursor.key() == key_id + bound and not _Block(cursor.value()).values()[0]:
        return bound
    if not (cursor.prev() if found else cursor.last()) or cursor.key()[:8] != key_id:
        return None
    block = _Block(cursor.value())
    index = block.before(start)
    return None if index < 0 else block.member(index)


def _add_member(values: list[bytes], stamps: list[float], member: bytes | None) -> None:
    if member is not None:
        values.append(member[8:])
        stamps.append(TIMESTAMP.unpack_from(member)[0])


def _blocks_from(txn: Any, tables: Tables, key_id: bytes, start: float) -> Iterator[_Block]:
    """The blocks of a key from the one that may hold `start` on."""
    cursor = txn.cursor(tables.blocks)
    positioned = False
    if start > 0.0:
        target = key_id + TIMESTAMP.pack(start)
        found = cursor.set_range(target)
        if found and cursor.key() == target:
            positioned = True
        elif (cursor.prev() if found else cursor.last()) and cursor.key()[:8] == key_id:
            positioned = True  # the block before may hold samples from `start` on
    if not positioned and not cursor.set_range(key_id):
        return
    while cursor.key()[:8] == key_id:
        yield _Block(cursor.value())
        if not cursor.next():
            return


def sample_range(
    txn: Any,
    tables: Tables,
    key_id: bytes,
    flags: int,
    sealed: float,
    start: float,
    end: float,
    include_previous: bool,
    include_end: bool,
) -> tuple[list[bytes], list[float]]:
    """Values and timestamps of the samples in [start, end) or [start, end], in order.

    `include_previous` adds the last sample before a positive `start` first.
    """
    values: list[bytes] = []
    stamps: list[float] = []
    want_previous = include_previous and start > 0.0
    if want_previous and start > sealed:
        _add_member(values, stamps, _previous_member(txn, tables, key_id, flags, sealed, start))
        want_previous = False
    empty = start == math.inf or end < 0.0
    if start <= sealed and not (empty and not want_previous):
        below_end = bisect.bisect_right if include_end else bisect.bisect_left
        for block in _blocks_from(txn, tables, key_id, start):
            low = bisect.bisect_left(block.stamps, start) if start > block.stamps[0] else 0
            if want_previous:
                # The first block holds the previous sample, unless it starts at `start`.
                want_previous = False
                index = block.before(start)
                if index >= 0:
                    _add_member(values, stamps, block.member(index))
                elif block.stamps[0] == start:
                    previous = _previous_member(txn, tables, key_id, flags, sealed, start)
                    _add_member(values, stamps, previous)
            if empty or block.stamps[0] > end or (block.stamps[0] == end and not include_end):
                break
            high = below_end(block.stamps, end)
            if low == 0 and high == block.count:
                values += block.values()
                stamps += block.stamps
            else:
                values += block.values()[low:high]
                stamps += block.stamps[low:high]
            if high < block.count:
                return values, stamps
    if empty:
        return values, stamps
    if end > sealed:
        cursor = txn.cursor(tables.samples)
        if (
            cursor.set_range_dup(key_id, TIMESTAMP.pack(start))
            if start > 0.0
            else cursor.set_key(key_id)
        ):
            members = cursor.iternext_dup(keys=False)
            if end < math.inf:
                bound = TIMESTAMP.pack(end)
                members = itertools.takewhile(
                    (_next_packed(bound) if include_end else bound).__gt__, members
                )
            tail = list(members)
            if flags & FLAG_LONG_VALUES:
                tail = _tail_members(txn, tables, tail)
            values += map(after8, tail)
            stamps += _unpack_stamps(tail)
    return values, stamps


def _unpack_stamps(members: list) -> tuple[float, ...]:
    """The timestamps of tail members."""
    packed = b"".join(map(first8, members))
    if len(packed) != 8 * len(members):
        raise StoreError("damaged sample: a tail member without a timestamp")
    return struct.unpack(f">{len(members)}d", packed)


def member_count(txn: Any, tables: Tables, key_id: bytes) -> int:
    """How many members a mutable key has: its blocks' counts and its tail's, without values."""
    count = 0
    for block in _blocks_from(txn, tables, key_id, -1.0):
        count += block.count
    cursor = txn.cursor(tables.samples)
    if cursor.set_key(key_id):
        count += cursor.count()
    return count


def member_chunks(txn: Any, tables: Tables, key_id: bytes, flags: int) -> Iterator[list[bytes]]:
    """Every member of a mutable key, in order, in lists of a block or ``settings.MEMBER_CHUNK``.

    Long tail values lost their order beyond their stored prefix, so each
    run of tail members sharing a prefix is resolved and sorted as a
    whole: a list may be longer than ``MEMBER_CHUNK`` only by such a run
    (or by a block of one timestamp, see the invariant).
    """
    for block in _blocks_from(txn, tables, key_id, -1.0):
        yield block.members()
    yield from _tail_chunks(txn, tables, key_id, flags, 0.0)


def _tail_chunks(
    txn: Any, tables: Tables, key_id: bytes, flags: int, start: float
) -> Iterator[list[bytes]]:
    """The tail members from timestamp `start` on, in order, in lists (see member_chunks)."""
    cursor = txn.cursor(tables.samples)
    if not (
        cursor.set_range_dup(key_id, TIMESTAMP.pack(start))
        if start > 0.0
        else cursor.set_key(key_id)
    ):
        return
    tail = cursor.iternext_dup(keys=False)
    size = settings.MEMBER_CHUNK
    if not flags & FLAG_LONG_VALUES:
        while chunk := [_check_member(bytes(member)) for member in itertools.islice(tail, size)]:
            yield chunk
        return
    chunk = []
    for _, run in itertools.groupby(map(bytes, tail), _stored_prefix):
        chunk += _tail_members(txn, tables, list(run))
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def absent_members(
    txn: Any, tables: Tables, key_id: bytes, flags: int, sealed: float, members: Sequence[bytes]
) -> list[bytes]:
    """The members of sorted, distinct `members` that a mutable key lacks, in order.

    The key's stored members from the first timestamp of `members` on are
    read once, a block or ``settings.MEMBER_CHUNK`` at a time, and merged
    with `members`: a file imported again costs a read of what it holds,
    not a lookup per sample.
    """
    if not members:
        return []
    start = TIMESTAMP.unpack_from(members[0])[0]
    chunks = _tail_chunks(txn, tables, key_id, flags, start)
    if start <= sealed:
        blocks = (block.members() for block in _blocks_from(txn, tables, key_id, start))
        chunks = itertools.chain(blocks, chunks)
    stored = itertools.chain.from_iterable(chunks)
    absent = []
    current = next(stored, None)
    for member in members:
        while current is not None and current < member:
            current = next(stored, None)
        if current != member:
            absent.append(member)
    return absent


def _stored_prefix(member: bytes) -> bytes:
    """What orders a tail member as stored: its timestamp and its value's inline prefix."""
    return member[: 8 + INLINE_PREFIX]


def all_members(txn: Any, tables: Tables, key_id: bytes, flags: int) -> list[bytes]:
    """Every member of a mutable key, in order."""
    members: list[bytes] = []
    for chunk in member_chunks(txn, tables, key_id, flags):
        members += chunk
    return members


def add_sample(
    txn: Any,
    tables: Tables,
    name_key: bytes,
    key_id: bytes,
    flags: int,
    sealed: float,
    stamp: float,
    value: bytes,
    seq: int,
) -> bool:
    """Store one sample of a mutable key, added by event `seq`; False if it is already there."""
    if stamp <= sealed:
        return _insert_into_block(txn, tables, key_id, stamp, value)
    cursor = txn.cursor(tables.samples)
    if len(value) < INLINE_LIMIT:
        # dupdata=False (by position: py-lmdb parses keywords slowly): an
        # identical (timestamp, value) is refused, returning False.
        if not cursor.put(key_id, TIMESTAMP.pack(stamp) + value, False):
            return False
    else:
        prefix = TIMESTAMP.pack(stamp) + value[:INLINE_PREFIX]
        if cursor.set_range_dup(key_id, prefix):
            for member in cursor.iternext_dup(keys=False):
                if member[: len(prefix)] != prefix:
                    break
                if len(member) == LONG_SAMPLE_LEN and _long_value(txn, tables, member) == value:
                    return False
        checked_put(txn, key_id, prefix + LONG_PADDING + log.pack_seq(seq), tables.samples)
        if not flags & FLAG_LONG_VALUES:
            flags |= FLAG_LONG_VALUES
            update_record(txn, tables, name_key, flags=flags)
    if (
        not flags & FLAG_LONG_VALUES
        and cursor.count() >= settings.TAIL_MAX
        and _has_two_timestamps(cursor)
    ):
        _seal(txn, tables, name_key, key_id)
    return True


def _has_two_timestamps(cursor: Any) -> bool:
    """Whether the tail at `cursor` holds more than one timestamp (two cursor moves)."""
    cursor.first_dup()
    first = cursor.value()[:8]
    cursor.last_dup()
    return cursor.value()[:8] != first


def _seal(txn: Any, tables: Tables, name_key: bytes, key_id: bytes) -> None:
    """Move all tail samples but those with the last timestamp into a new block.

    Only for keys without long values in the tail: blocks speed up reading
    many small samples, while sealing big ones would only copy them.
    """
    cursor = txn.cursor(tables.samples)
    cursor.set_key(key_id)
    tail = [_check_member(bytes(member)) for member in cursor.iternext_dup(keys=False)]
    last = tail[-1][:8]
    keep = len(tail)
    while keep and tail[keep - 1][:8] == last:
        keep -= 1
    if not keep:
        return  # every sample has the same timestamp: nothing can be sealed yet
    moving = tail[:keep]
    txn.delete(key_id, db=tables.samples)  # every duplicate at once, then put back the rest
    for member in tail[keep:]:
        checked_put(txn, key_id, member, tables.samples)
    for part in _split_block(moving):
        checked_put(txn, key_id + part[0][:8], _encode_block(part), tables.blocks)
    update_record(txn, tables, name_key, sealed=TIMESTAMP.unpack_from(moving[-1])[0])


def _insert_into_block(txn: Any, tables: Tables, key_id: bytes, stamp: float, value: bytes) -> bool:
    """Add a late sample to the block its timestamp falls in; False if already there."""
    cursor = txn.cursor(tables.blocks)
    target = key_id + TIMESTAMP.pack(stamp)
    found = cursor.set_range(target)
    if not (found and cursor.key() == target):
        if not (cursor.prev() if found else cursor.last()) or cursor.key()[:8] != key_id:
            # Before every block: the first one takes it.
            if not cursor.set_range(key_id) or cursor.key()[:8] != key_id:
                raise StoreError(f"mutable key id {key_id.hex()} lost its sample blocks")
    block_key = cursor.key()
    members = _Block(cursor.value()).members()
    member = TIMESTAMP.pack(stamp) + value
    index = bisect.bisect_left(members, member)
    if index < len(members) and members[index] == member:
        return False
    members.insert(index, member)
    txn.delete(block_key, db=tables.blocks)
    for part in _split_block(members):
        checked_put(txn, key_id + part[0][:8], _encode_block(part), tables.blocks)
    return True


def _split_block(members: list[bytes]) -> list[list[bytes]]:
    """`members` cut at timestamp boundaries into blocks of at most ``BLOCK_MAX``.

    A cut falls at the boundary nearest ``BLOCK_MAX`` members on, or
    nearest the middle of what is left if two blocks suffice; a run of one
    timestamp longer than that stays whole (see the invariant).
    """
    limit = settings.BLOCK_MAX
    parts = []
    start = 0
    while len(members) - start > limit:
        cut = _boundary_near(members, start, start + min(limit, (len(members) - start) // 2))
        if cut is None:
            break
        parts.append(members[start:cut])
        start = cut
    parts.append(members[start:])
    return parts


def _boundary_near(members: list[bytes], start: int, target: int) -> int | None:
    """The index after `start` nearest `target` where the timestamp changes, or None."""
    for offset in range(len(members)):
        below, above = target - offset, target + offset
        if below <= start and above >= len(members):
            return None
        for index in (below, above):
            if start < index < len(members) and members[index][:8] != members[index - 1][:8]:
                return index
    return None


def _next_packed(packed: bytes) -> bytes:
    """The packed timestamp just above `packed` (as an exclusive bound)."""
    return KEY_ID.pack(KEY_ID.unpack(packed)[0] + 1)


def append_samples(
    txn: Any,
    tables: Tables,
    name_key: bytes,
    key_id: bytes,
    flags: int,
    members: list[bytes] | PackedMembers,
    first_seq: int,
    newest_key: bool,
) -> None:
    """Store sorted, distinct `members` that all come after the key's latest sample.

    They are added by the events from `first_seq` on, in order.

    The bulk counterpart of :func:`add_sample` (for imports): short samples
    go straight into sealed blocks with the key's old tail, leaving in the
    tail only the samples with the last timestamp, so the invariants above
    hold (blocks disjoint in time, split only between timestamps, older
    than the tail). Keys with long values get them in the tail, unsealed,
    as :func:`add_sample` would. `newest_key` says the key id is the
    greatest of the store, so its blocks go in with LMDB appends. Short
    members of one length (:class:`~telstate.backend.PackedMembers`) of a
    key without a tail are cut into blocks with numpy, without a bytes
    object per member.
    """
    cursor = txn.cursor(tables.samples)
    long_values = flags & FLAG_LONG_VALUES
    if isinstance(members, PackedMembers):
        if not long_values and members.size - 8 < INLINE_LIMIT and not cursor.set_key(key_id):
            blocks, tail_part, sealed = _uniform_blocks(key_id, members)
            _put_blocks(txn, tables, name_key, key_id, blocks, sealed, newest_key)
            _put_tail(cursor, key_id, tail_part)
            return
        members = list(members)
    if long_values or max(map(len, members)) - 8 >= INLINE_LIMIT:
        if not long_values:
            update_record(txn, tables, name_key, flags=flags | FLAG_LONG_VALUES)
        for seq, member in enumerate(members, first_seq):
            if len(member) - 8 >= INLINE_LIMIT:
                member = member[: 8 + INLINE_PREFIX] + LONG_PADDING + log.pack_seq(seq)
            cursor.put(key_id, member)
        return
    tail = []
    if cursor.set_key(key_id):
        tail = [bytes(member) for member in cursor.iternext_dup(keys=False)]
    if tail:
        txn.delete(key_id, db=tables.samples)
    combined = tail + members if tail else members
    last = combined[-1][:8]
    keep = len(combined) - 1
    while keep and combined[keep - 1][:8] == last:
        keep -= 1
    blocks = []
    start = 0
    target = max(settings.BLOCK_MAX // 2, 1)
    while start < keep:
        end = min(start + target, keep)
        while end < keep and combined[end][:8] == combined[end - 1][:8]:
            end += 1
        part = combined[start:end]
        blocks.append((key_id + part[0][:8], _encode_block(part)))
        start = end
    sealed = TIMESTAMP.unpack_from(combined[keep - 1])[0] if keep else NO_SEALED
    _put_blocks(txn, tables, name_key, key_id, blocks, sealed, newest_key)
    _put_tail(cursor, key_id, combined[keep:])


def _uniform_blocks(
    key_id: bytes, members: PackedMembers
) -> tuple[list[tuple[bytes, bytes]], list[bytes], float]:
    """The blocks, tail members and sealed timestamp of short members of one length.

    The same blocks as the list path of :func:`append_samples` makes (the
    same cuts, and :func:`_encode_block`'s bytes: a msgpack array of bin
    values, laid out here with numpy).
    """
    size = members.size
    length = size - 8
    table = np.frombuffer(members.buffer, np.uint8).reshape(-1, size)
    count = len(table)
    stamps = np.ascontiguousarray(table[:, :8])
    times = stamps.view(">u8").ravel().astype(np.uint64)  # sorts like the timestamps
    keep = int(np.searchsorted(times, times[-1]))  # the samples of the last timestamp stay
    header = b"\xc4" + bytes((length,)) if length < 256 else b"\xc5" + _U16.pack(length)
    values = np.empty((count, len(header) + length), np.uint8)
    values[:, : len(header)] = np.frombuffer(header, np.uint8)
    values[:, len(header) :] = table[:, 8:]
    stamp_bytes = stamps.tobytes()
    value_bytes = values.tobytes()
    row = values.shape[1]
    blocks = []
    start = 0
    target = max(settings.BLOCK_MAX // 2, 1)
    while start < keep:
        end = min(start + target, keep)
        if times[end] == times[end - 1]:
            end = min(int(np.searchsorted(times, times[end - 1], "right")), keep)
        part = end - start
        array = bytes((0x90 | part,)) if part < 16 else _array_header(part)
        data = b"".join(
            (
                U32.pack(part),
                stamp_bytes[8 * start : 8 * end],
                array,
                value_bytes[row * start : row * end],
            )
        )
        blocks.append((key_id + stamp_bytes[8 * start : 8 * start + 8], data))
        start = end
    sealed = TIMESTAMP.unpack_from(stamp_bytes, 8 * (keep - 1))[0] if keep else NO_SEALED
    return blocks, list(members.part(keep, count)), sealed


def _array_header(count: int) -> bytes:
    """The msgpack header of an array of `count` (>= 16) items."""
    return b"\xdc" + _U16.pack(count) if count < 1 << 16 else b"\xdd" + U32.pack(count)


def _put_blocks(
    txn: Any,
    tables: Tables,
    name_key: bytes,
    key_id: bytes,
    blocks: list[tuple[bytes, bytes]],
    sealed: float,
    newest_key: bool,
) -> None:
    """Add a key's new sealed `blocks`, which end at timestamp `sealed`."""
    if not blocks:
        return
    added = txn.cursor(tables.blocks).putmulti(blocks, overwrite=False, append=newest_key)
    if added != (len(blocks), len(blocks)):
        raise StoreError(f"key id {key_id.hex()}: sealed blocks overlap ones already stored")
    update_record(txn, tables, name_key, sealed=sealed)


def _put_tail(cursor: Any, key_id: bytes, members: list[bytes]) -> None:
    added = cursor.putmulti(zip(itertools.repeat(key_id), members), dupdata=True, append=True)
    if added != (len(members), len(members)):
        raise StoreError(f"key id {key_id.hex()}: the tail is out of order")
