"""Streaming reader for the RDB files that Redis, Valkey and katsdptelstate write.

It understands magic ``REDIS`` with RDB versions 1 to 12 (Redis 1.x to 7.4)
and magic ``VALKEY`` with version 80 (Valkey 9), every opcode they write,
every string encoding (lengths of 6, 14, 32 and 64 bits, 8/16/32-bit
integers, LZF) and every encoding of the three types telstate uses:

- strings (type 0) become immutable keys;
- sorted sets (types 3, 5, 12 and 17) become mutable keys, their members
  sorted by score and then by bytes (for telstate's all-zero scores, byte
  order, which is time order);
- hashes (types 4, 9, 13 and 16, and the hashes with field expiry of
  Redis 7.4, types 22 to 25, and of Valkey 9, type 22) become indexed keys.

Keys of any other type (lists, sets, streams, module values) are parsed,
skipped, counted and reported in one warning. Key and field expiry times
are ignored: every key and field in the file is loaded, as katsdptelstate
does. Keys of every database are returned.

Input is read in bounded chunks and no length or count from the file is
trusted for an allocation, so a corrupt or hostile file fails quickly with
:class:`~telstate.errors.RdbParseError` instead of exhausting memory. The
CRC-64 trailer is verified when it is non-zero.
"""

from __future__ import annotations

import io
import logging
import os
import struct
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

import numpy as np

from . import lzf
from .backend import PackedMembers, Record, RecordValue, split_members
from .errors import RdbParseError
from .rdb_utility import crc64
from .utils import KeyType, PathType

logger = logging.getLogger(__name__)

#: RDB versions accepted for each magic string.
SUPPORTED_VERSIONS = {b"REDIS": range(1, 13), b"VALKEY": range(80, 81)}

# Opcodes, which share the type byte's position in the file.
_OP_SLOT_IMPORT = 0xF3  # Valkey only
_OP_SLOT_INFO = 0xF4
_OP_FUNCTION2 = 0xF5
_OP_FUNCTION_PRE_GA = 0xF6
_OP_MODULE_AUX = 0xF7
_OP_IDLE = 0xF8
_OP_FREQ = 0xF9
_OP_AUX = 0xFA
_OP_RESIZEDB = 0xFB
_OP_EXPIRETIME_MS = 0xFC
_OP_EXPIRETIME = 0xFD
_OP_SELECTDB = 0xFE
_OP_EOF = 0xFF

RDB_TYPE_HASH_LISTPACK = 16
RDB_TYPE_ZSET_LISTPACK = 17

_MODULE_OPCODE_EOF = 0
_MODULE_OPCODE_SINT = 1
_MODULE_OPCODE_UINT = 2
_MODULE_OPCODE_FLOAT = 3
_MODULE_OPCODE_DOUBLE = 4
_MODULE_OPCODE_STRING = 5

# Files of RDB version 5 and later end with a CRC-64.
_FIRST_VERSION_WITH_CHECKSUM = 5

_CHUNK_SIZE = 16 << 20
#: A read guessed from an item's header adds at most this many times the
#: bytes of the item already in the buffer.
_GUESS_GROWTH = 4
_ZERO_DOUBLE = bytes(8)
_DOUBLE = struct.Struct("<d")

_Entry = bytes | int
#: A value parser: (buffer, offset) -> (key type or None if skipped, value, new offset).
_Handler = Callable[[bytes, int], tuple[KeyType | None, Any, int]]


class _NeedMore(Exception):
    """The buffer ended inside the item being parsed (more input may fix that).

    `end` is an offset the buffer must reach at least; `expected`, where
    the item probably ends (a guess; 0 if there is none); `minimum`, where
    it ends at the earliest if its header is true (0 if not known): a file
    too short for that is corrupt, but it is not read in advance (a
    header may lie).
    """

    def __init__(self, end: int = 0, expected: int = 0, minimum: int = 0) -> None:
        super().__init__(end)
        self.end = end
        self.expected = expected
        self.minimum = minimum


class _Corrupt(Exception):
    """The item being parsed is invalid; `pos` is its offset in the buffer."""

    def __init__(self, message: str, pos: int) -> None:
        super().__init__(message, pos)
        self.message = message
        self.pos = pos


# -- strings and lengths ---------------------------------------------------------------


def _read_length(buf: bytes, pos: int) -> tuple[int, int]:
    first = buf[pos]
    kind = first >> 6
    if kind == 0:
        return first, pos + 1
    if kind == 1:
        return ((first & 0x3F) << 8) | buf[pos + 1], pos + 2
    if first == 0x80:
        end = pos + 5
    elif first == 0x81:
        end = pos + 9
    else:
        raise _Corrupt(f"invalid length encoding 0x{first:02x}", pos)
    if end > len(buf):
        raise _NeedMore(end)
    return int.from_bytes(buf[pos + 1 : end], "big"), end


def _read_fixed(buf: bytes, pos: int, size: int) -> tuple[bytes, int]:
    end = pos + size
    if end > len(buf):
        raise _NeedMore(end)
    return buf[pos:end], end


def _read_string(buf: bytes, pos: int) -> tuple[bytes, int]:
    first = buf[pos]
    if first < 0x40:
        end = pos + 1 + first
        if end > len(buf):
            raise _NeedMore(end)
        return buf[pos + 1 : end], end
    if first < 0xC0:
        length, start = _read_length(buf, pos)
        end = start + length
        if end > len(buf):
            raise _NeedMore(end)
        return buf[start:end], end
    if first <= 0xC2:
        size = 1 << (first - 0xC0)
        raw, end = _read_fixed(buf, pos + 1, size)
        return b"%d" % int.from_bytes(raw, "little", signed=True), end
    if first == 0xC3:
        compressed_length, start = _read_length(buf, pos + 1)
        length, start = _read_length(buf, start)
        compressed, end = _read_fixed(buf, start, compressed_length)
        try:
            return lzf.decompress(compressed, length), end
        except lzf.LzfError as exc:
            raise _Corrupt(f"bad LZF string: {exc}", pos) from None
    raise _Corrupt(f"invalid string encoding 0x{first:02x}", pos)


def _skip_string(buf: bytes, pos: int) -> int:
    """Like :func:`_read_string` but only returns the new offset (no decompression)."""
    first = buf[pos]
    if first < 0xC0:
        length, start = _read_length(buf, pos)
    elif first <= 0xC2:
        length, start = 1 << (first - 0xC0), pos + 1
    elif first == 0xC3:
        length, start = _read_length(buf, pos + 1)
        _, start = _read_length(buf, start)
    else:
        raise _Corrupt(f"invalid string encoding 0x{first:02x}", pos)
    end = start + length
    if end > len(buf):
        raise _NeedMore(end)
    return end


def _read_text_double(buf: bytes, pos: int) -> tuple[float, int]:
    """A score of a type-3 zset: length byte then ASCII; 253-255 are NaN, +inf, -inf."""
    length = buf[pos]
    if length >= 253:
        return (float("nan"), float("inf"), float("-inf"))[length - 253], pos + 1
    text, end = _read_fixed(buf, pos + 1, length)
    return _parse_score(text, pos), end


def _parse_score(text: bytes, pos: int) -> float:
    try:
        return float(text)
    except ValueError:
        raise _Corrupt(f"invalid score {text[:40]!r}", pos) from None


def _entry_bytes(entry: _Entry) -> bytes:
    return b"%d" % entry if isinstance(entry, int) else entry


# -- ziplist, listpack and zipmap blobs ------------------------------------------------


def _listpack_entries(blob: bytes, pos: int) -> list[_Entry]:
    """Decode a listpack; `pos` is the blob's offset in the file buffer, for errors."""
    size = len(blob)
    if size < 7 or int.from_bytes(blob[:4], "little") != size:
        raise _Corrupt("listpack header does not match its size", pos)
    entries: list[_Entry] = []
    append = entries.append
    i = 6
    try:
        while True:
            first = blob[i]
            if first < 0x80:
                append(first)
                i += 2
                continue
            if first < 0xC0:
                start = i + 1
                end = start + (first & 0x3F)
                append(blob[start:end])
            elif first < 0xE0:
                value = ((first & 0x1F) << 8) | blob[i + 1]
                append(value - (1 << 13) if value >= 1 << 12 else value)
                end = i + 2
            elif first < 0xF0:
                start = i + 2
                end = start + (((first & 0x0F) << 8) | blob[i + 1])
                append(blob[start:end])
            elif first == 0xF0:
                start = i + 5
                end = start + int.from_bytes(blob[i + 1 : start], "little")
                append(blob[start:end])
            elif first <= 0xF4:
                end = i + 1 + (2, 3, 4, 8)[first - 0xF1]
                append(int.from_bytes(blob[i + 1 : end], "little", signed=True))
            elif first == 0xFF:
                break
            else:
                raise _Corrupt(f"invalid listpack entry encoding 0x{first:02x}", pos)
            # Skip the entry's length, stored to be read backwards in 7-bit
            # groups. Redis uses one byte more than needed for the lengths
            # 2**14 - 1, 2**21 - 1 and 2**28 - 1 (its first byte is then 0);
            # Valkey does not.
            length = end - i
            i = end + (
                1
                if length < 1 << 7
                else 2
                if length < 1 << 14
                else 3
                if length < 1 << 21
                else 4
                if length < 1 << 28
                else 5
            )
            if length in _BACKLEN_LIMITS and blob[end] == 0:
                i += 1
    except IndexError:
        raise _Corrupt("listpack entry overruns the listpack", pos) from None
    count = int.from_bytes(blob[4:6], "little")
    if i != size - 1 or (count != 0xFFFF and count != len(entries)):
        raise _Corrupt("listpack size or entry count is inconsistent", pos)
    return entries


_BACKLEN_LIMITS = frozenset({(1 << 14) - 1, (1 << 21) - 1, (1 << 28) - 1})
_ZIPLIST_INT_SIZES = {0xC0: 2, 0xD0: 4, 0xE0: 8, 0xF0: 3, 0xFE: 1}


def _ziplist_entries(blob: bytes, pos: int) -> list[_Entry]:
    """Decode a ziplist; `pos` is the blob's offset in the file buffer, for errors."""
    size = len(blob)
    if size < 11 or int.from_bytes(blob[:4], "little") != size:
        raise _Corrupt("ziplist header does not match its size", pos)
    entries: list[_Entry] = []
    append = entries.append
    i = 10
    try:
        while True:
            first = blob[i]
            if first == 0xFF:
                break
            i += 5 if first == 0xFE else 1
            encoding = blob[i]
            if encoding < 0x40:
                start = i + 1
                i = start + encoding
                append(blob[start:i])
            elif encoding < 0x80:
                start = i + 2
                i = start + (((encoding & 0x3F) << 8) | blob[i + 1])
                append(blob[start:i])
            elif encoding == 0x80:
                start = i + 5
                i = start + int.from_bytes(blob[i + 1 : start], "big")
                append(blob[start:i])
            elif 0xF1 <= encoding <= 0xFD:
                append((encoding & 0x0F) - 1)
                i += 1
            else:
                int_size = _ZIPLIST_INT_SIZES.get(encoding)
                if int_size is None:
                    raise _Corrupt(f"invalid ziplist entry encoding 0x{encoding:02x}", pos)
                start = i + 1
                i = start + int_size
                append(int.from_bytes(blob[start:i], "little", signed=True))
    except IndexError:
        raise _Corrupt("ziplist entry overruns the ziplist", pos) from None
    count = int.from_bytes(blob[8:10], "little")
    if i != size - 1 or (count != 0xFFFF and count != len(entries)):
        raise _Corrupt("ziplist size or entry count is inconsistent", pos)
    return entries


def _zipmap_entries(blob: bytes, pos: int) -> list[_Entry]:
    """Decode a zipmap (hashes of Redis before 2.6) into field, value, field, value..."""
    entries: list[_Entry] = []
    i = 1
    try:
        while True:
            length = blob[i]
            if length == 0xFF:
                break
            if length >= 254:
                length = int.from_bytes(blob[i + 1 : i + 5], "little")
                i += 5
            else:
                i += 1
            end = i + length
            entries.append(blob[i:end])
            length = blob[end]
            if length >= 254:
                length = int.from_bytes(blob[end + 1 : end + 5], "little")
                end += 5
            else:
                end += 1
            free = blob[end]
            start = end + 1
            i = start + length
            entries.append(blob[start:i])
            i += free
    except IndexError:
        raise _Corrupt("zipmap entry overruns the zipmap", pos) from None
    if i != len(blob) - 1:
        raise _Corrupt("zipmap size is inconsistent", pos)
    return entries


# -- values of the three telstate types ------------------------------------------------


def _zset_from_pairs(members: list[bytes], scores: list[float] | None) -> list[bytes]:
    """Order members as the zset does: by score, then by bytes.

    Files list members in score order (skiplists in reverse), and telstate
    scores are all zero, so this is usually a cheap sort of sorted data.
    """
    if scores is None:
        members.sort()
        return members
    return [member for _, member in sorted(zip(scores, members))]


def _zset_from_entries(entries: list[_Entry], pos: int) -> tuple[KeyType, list[bytes], int]:
    if len(entries) % 2:
        raise _Corrupt("zset has a member without a score", pos)
    members = [_entry_bytes(entry) for entry in entries[0::2]]
    scores: list[float] | None = None
    raw_scores = entries[1::2]
    if any(score != 0 for score in raw_scores):
        scores = [
            float(score) if isinstance(score, int) else _parse_score(score, pos)
            for score in raw_scores
        ]
        if not any(scores):
            scores = None
    return KeyType.MUTABLE, _zset_from_pairs(members, scores), pos


# Members of one sensor often all have the same length (float samples: an
# 8-byte timestamp and a 10-byte value). Runs of at least this many such
# members, each with score 0, are parsed with numpy instead of one at a time.
_UNIFORM_RUN = 32
# Members parsed one at a time between two attempts at finding a uniform run.
_SEQUENTIAL_RUN = 64


def _uniform_run(
    buf: bytes, pos: int, limit: int, score_size: int
) -> tuple[np.ndarray, int] | None:
    """The uniform run of up to `limit` members at `pos`, as (rows, member length), or None.

    A uniform run is a sequence of members with the same 6-bit length, each
    followed by the score 0 (``"\\x01" "0"`` as text, or 8 zero bytes). Each
    row of the result is one member with its length byte and score. None if
    there is no run worth taking.
    """
    length = buf[pos]
    stride = 1 + length + score_size
    rows = min(limit, (len(buf) - pos) // stride)
    if length >= 0x40 or rows < _UNIFORM_RUN:
        return None
    # Cheap test of a few rows before involving numpy.
    for row in range(1, 8):
        if buf[pos + row * stride] != length:
            return None
    table = np.frombuffer(buf, np.uint8, count=rows * stride, offset=pos).reshape(rows, stride)
    good = table[:, 0] == length
    if score_size == 2:
        good &= (table[:, length + 1] == 1) & (table[:, length + 2] == 0x30)
    else:
        good &= ~table[:, length + 1 :].any(axis=1)
    run = rows if good.all() else int(good.argmin())
    if run < _UNIFORM_RUN:
        return None
    return table[:run], length


def _take_uniform_run(
    buf: bytes, pos: int, limit: int, score_size: int, members: list[bytes]
) -> tuple[int, int]:
    """Append up to `limit` members forming a uniform run at `pos`; return (taken, new pos).

    Returns (0, pos) if there is no run worth taking (see :func:`_uniform_run`).
    """
    found = _uniform_run(buf, pos, limit, score_size)
    if found is None:
        return 0, pos
    table, length = found
    run = len(table)
    if length:
        members += split_members(table[:, 1 : length + 1].tobytes(), length)
    else:
        members.extend([b""] * run)
    return run, pos + run * table.shape[1]


def _read_packed_zset(buf: bytes, pos: int, binary_scores: bool) -> tuple[KeyType, Any, int]:
    """Types 3 and 5 as :class:`PackedMembers` when every member is in one uniform run.

    Any other zset is read as a list by :func:`_read_zset`.
    """
    count, start = _read_length(buf, pos)
    if count >= _UNIFORM_RUN:
        found = _uniform_run(buf, start, count, 8 if binary_scores else 2)
        if found is not None and found[1]:
            table, length = found
            run, stride = table.shape
            if run == count:
                members = PackedMembers.from_buffer(table[:, 1 : length + 1].tobytes(), length)
                return KeyType.MUTABLE, members, start + count * stride
            if start + (run + 1) * stride > len(buf):
                # Uniform up to the end of the buffer: read on rather than
                # parse the members one by one only to run out of input.
                raise _NeedMore()
    return _read_zset(buf, pos, binary_scores)


def _read_zset(buf: bytes, pos: int, binary_scores: bool) -> tuple[KeyType, list[bytes], int]:
    """Types 3 (scores as text) and 5 (scores as binary doubles)."""
    count, pos = _read_length(buf, pos)
    score_size = 8 if binary_scores else 2
    members: list[bytes] = []
    append = members.append
    # Materialised only once a non-zero score turns up (never, for telstate).
    scores: list[float] | None = None
    # `count` is not trusted: parsing stops at the end of the buffer.
    start = pos
    index = 0
    try:
        while index < count:
            if scores is None and count - index >= _UNIFORM_RUN:
                taken, pos = _take_uniform_run(buf, pos, count - index, score_size, members)
                index += taken
                if taken:
                    continue
            stop = min(count, index + _SEQUENTIAL_RUN)
            for index in range(index, stop):  # noqa: B020 - resumes where the run left off
                # The common case, inlined for speed: short member, score 0. An
                # IndexError here means the buffer ends inside the item.
                first = buf[pos]
                end = pos + 1 + first
                if first < 0x40 and scores is None:
                    if binary_scores:
                        if buf[end : end + 8] == _ZERO_DOUBLE:
                            append(buf[pos + 1 : end])
                            pos = end + 8
                            continue
                    elif buf[end] == 1 and buf[end + 1] == 0x30:
                        append(buf[pos + 1 : end])
                        pos = end + 2
                        continue
                member, end = _read_string(buf, pos)
                append(member)
                if binary_scores:
                    raw, pos = _read_fixed(buf, end, 8)
                    score = _DOUBLE.unpack(raw)[0]
                else:
                    score, pos = _read_text_double(buf, end)
                if scores is None:
                    if score == 0.0:
                        continue
                    scores = [0.0] * index
                scores.append(score)
            index = stop
    except (_NeedMore, IndexError) as exc:
        # A zset bigger than the buffer (one of 8 KB arrays can be 80 MB):
        # guess its end from the members read so far, so that a regular
        # file is read up to there at once, rather than in doublings of the
        # buffer that each parse the zset again.
        done = len(members)
        expected = start + (pos - start) * (count + 1) // done if done else 0
        # Each member left takes a length byte and a score at least.
        minimum = pos + (count - done) * (1 + (8 if binary_scores else 1))
        raise _NeedMore(getattr(exc, "end", 0), expected, minimum) from None
    return KeyType.MUTABLE, _zset_from_pairs(members, scores), pos


def _read_zset_text(buf: bytes, pos: int) -> tuple[KeyType, list[bytes], int]:
    return _read_zset(buf, pos, False)


def _read_zset_binary(buf: bytes, pos: int) -> tuple[KeyType, list[bytes], int]:
    return _read_zset(buf, pos, True)


def _read_packed_zset_text(buf: bytes, pos: int) -> tuple[KeyType, Any, int]:
    return _read_packed_zset(buf, pos, False)


def _read_packed_zset_binary(buf: bytes, pos: int) -> tuple[KeyType, Any, int]:
    return _read_packed_zset(buf, pos, True)


def _read_hash(buf: bytes, pos: int) -> tuple[KeyType, dict[bytes, bytes], int]:
    count, pos = _read_length(buf, pos)
    fields: dict[bytes, bytes] = {}
    for _ in range(count):
        field, pos = _read_string(buf, pos)
        fields[field], pos = _read_string(buf, pos)
    return KeyType.INDEXED, fields, pos


def _hash_from_entries(
    entries: list[_Entry], pos: int, stride: int = 2
) -> tuple[KeyType, dict[bytes, bytes], int]:
    if len(entries) % stride:
        raise _Corrupt("hash has a field without a value", pos)
    fields = map(_entry_bytes, entries[0::stride])
    values = map(_entry_bytes, entries[1::stride])
    return KeyType.INDEXED, dict(zip(fields, values)), pos


def _blob_reader(
    decode: Callable[[bytes, int], list[_Entry]],
    build: Callable[[list[_Entry], int], tuple[KeyType, Any, int]],
) -> _Handler:
    """A handler for a value stored as one string holding a ziplist, listpack or zipmap."""

    def handler(buf: bytes, pos: int) -> tuple[KeyType | None, Any, int]:
        blob, end = _read_string(buf, pos)
        key_type, value, _ = build(decode(blob, pos), pos)
        return key_type, value, end

    return handler


def _read_hash_with_ttls(
    buf: bytes, pos: int, min_expiry: bool
) -> tuple[KeyType, dict[bytes, bytes], int]:
    """Redis 7.4 types 22 and 24: [min expiry,] count, then (TTL, field, value) each."""
    if min_expiry:
        _, pos = _read_fixed(buf, pos, 8)
    count, pos = _read_length(buf, pos)
    fields: dict[bytes, bytes] = {}
    for _ in range(count):
        _, pos = _read_length(buf, pos)
        field, pos = _read_string(buf, pos)
        fields[field], pos = _read_string(buf, pos)
    return KeyType.INDEXED, fields, pos


def _read_hash_listpack_with_ttls(
    buf: bytes, pos: int, min_expiry: bool
) -> tuple[KeyType, dict[bytes, bytes], int]:
    """Redis 7.4 types 23 and 25: [min expiry,] listpack of (field, value, TTL)."""
    if min_expiry:
        _, pos = _read_fixed(buf, pos, 8)
    blob, end = _read_string(buf, pos)
    _, fields, _ = _hash_from_entries(_listpack_entries(blob, pos), pos, stride=3)
    return KeyType.INDEXED, fields, end


def _read_valkey_hash_with_ttls(buf: bytes, pos: int) -> tuple[KeyType, dict[bytes, bytes], int]:
    """Valkey 9 type 22: count, then (field, value, 8-byte expiry) each."""
    count, pos = _read_length(buf, pos)
    fields: dict[bytes, bytes] = {}
    for _ in range(count):
        field, pos = _read_string(buf, pos)
        fields[field], pos = _read_string(buf, pos)
        _, pos = _read_fixed(buf, pos, 8)
    return KeyType.INDEXED, fields, pos


# -- skipped types ---------------------------------------------------------------------


def _skip_strings(buf: bytes, pos: int) -> int:
    count, pos = _read_length(buf, pos)
    for _ in range(count):
        pos = _skip_string(buf, pos)
    return pos


def _skip_quicklist2(buf: bytes, pos: int) -> int:
    count, pos = _read_length(buf, pos)
    for _ in range(count):
        _, pos = _read_length(buf, pos)
        pos = _skip_string(buf, pos)
    return pos


def _skip_lengths(buf: bytes, pos: int, count: int) -> int:
    for _ in range(count):
        _, pos = _read_length(buf, pos)
    return pos


def _skip_stream(buf: bytes, pos: int, version: int) -> int:
    """Stream types 15, 19 and 21 (versions 1 to 3)."""
    count, pos = _read_length(buf, pos)
    for _ in range(count):
        pos = _skip_string(buf, _skip_string(buf, pos))
    # Length and last ID; version 2 adds first ID, max deleted ID and entries added.
    pos = _skip_lengths(buf, pos, 3 if version == 1 else 8)
    groups, pos = _read_length(buf, pos)
    for _ in range(groups):
        pos = _skip_string(buf, pos)
        pos = _skip_lengths(buf, pos, 2 if version == 1 else 3)
        pending, pos = _read_length(buf, pos)
        for _ in range(pending):
            # Entry ID (16 bytes) and delivery time (8 bytes), then delivery count.
            _, pos = _read_fixed(buf, pos, 24)
            _, pos = _read_length(buf, pos)
        consumers, pos = _read_length(buf, pos)
        for _ in range(consumers):
            pos = _skip_string(buf, pos)
            _, pos = _read_fixed(buf, pos, 8 if version < 3 else 16)
            pending, pos = _read_length(buf, pos)
            _, pos = _read_fixed(buf, pos, 16 * pending)
    return pos


def _skip_module_value(buf: bytes, pos: int) -> int:
    """Module data saved self-describing (RDB_TYPE_MODULE_2, MODULE_AUX): opcodes until EOF."""
    while True:
        opcode, pos = _read_length(buf, pos)
        if opcode == _MODULE_OPCODE_EOF:
            return pos
        if opcode in (_MODULE_OPCODE_SINT, _MODULE_OPCODE_UINT):
            _, pos = _read_length(buf, pos)
        elif opcode == _MODULE_OPCODE_FLOAT:
            _, pos = _read_fixed(buf, pos, 4)
        elif opcode == _MODULE_OPCODE_DOUBLE:
            _, pos = _read_fixed(buf, pos, 8)
        elif opcode == _MODULE_OPCODE_STRING:
            pos = _skip_string(buf, pos)
        else:
            raise _Corrupt(f"invalid module value opcode {opcode}", pos)


def _skipper(skip: Callable[[bytes, int], int]) -> _Handler:
    def handler(buf: bytes, pos: int) -> tuple[KeyType | None, Any, int]:
        return None, None, skip(buf, pos)

    return handler


def _read_string_value(buf: bytes, pos: int) -> tuple[KeyType, bytes, int]:
    value, pos = _read_string(buf, pos)
    return KeyType.IMMUTABLE, value, pos


def _skip_module_key(buf: bytes, pos: int) -> int:
    _, pos = _read_length(buf, pos)
    return _skip_module_value(buf, pos)


_COMMON_HANDLERS: dict[int, _Handler] = {
    0: _read_string_value,
    1: _skipper(_skip_strings),
    2: _skipper(_skip_strings),
    3: _read_zset_text,
    4: _read_hash,
    5: _read_zset_binary,
    7: _skipper(_skip_module_key),
    9: _blob_reader(_zipmap_entries, _hash_from_entries),
    10: _skipper(_skip_string),
    11: _skipper(_skip_string),
    12: _blob_reader(_ziplist_entries, _zset_from_entries),
    13: _blob_reader(_ziplist_entries, _hash_from_entries),
    14: _skipper(_skip_strings),
    15: _skipper(lambda buf, pos: _skip_stream(buf, pos, 1)),
    RDB_TYPE_HASH_LISTPACK: _blob_reader(_listpack_entries, _hash_from_entries),
    RDB_TYPE_ZSET_LISTPACK: _blob_reader(_listpack_entries, _zset_from_entries),
    18: _skipper(_skip_quicklist2),
    19: _skipper(lambda buf, pos: _skip_stream(buf, pos, 2)),
    20: _skipper(_skip_string),
    21: _skipper(lambda buf, pos: _skip_stream(buf, pos, 3)),
}

#: Value parsers by type byte, for files with the REDIS magic (Redis 7.4 adds 22-25).
_REDIS_HANDLERS: dict[int, _Handler] = {
    **_COMMON_HANDLERS,
    22: lambda buf, pos: _read_hash_with_ttls(buf, pos, False),
    23: lambda buf, pos: _read_hash_listpack_with_ttls(buf, pos, False),
    24: lambda buf, pos: _read_hash_with_ttls(buf, pos, True),
    25: lambda buf, pos: _read_hash_listpack_with_ttls(buf, pos, True),
}

#: Value parsers for the VALKEY magic, where type 22 means something else.
_VALKEY_HANDLERS: dict[int, _Handler] = {**_COMMON_HANDLERS, 22: _read_valkey_hash_with_ttls}

#: Names of the types that are skipped, for the warning.
_SKIPPED_TYPE_NAMES = {
    1: "list",
    10: "list",
    14: "list",
    18: "list",
    2: "set",
    11: "set",
    20: "set",
    15: "stream",
    19: "stream",
    21: "stream",
    7: "module",
}


#: The same, for readers that return uniform zsets as :class:`PackedMembers`.
_PACKED_ZSET_HANDLERS = {3: _read_packed_zset_text, 5: _read_packed_zset_binary}
_REDIS_PACKED_HANDLERS = {**_REDIS_HANDLERS, **_PACKED_ZSET_HANDLERS}
_VALKEY_PACKED_HANDLERS = {**_VALKEY_HANDLERS, **_PACKED_ZSET_HANDLERS}


def _handlers_for_version(version: int, packed: bool = False) -> dict[int, _Handler]:
    if version >= 80:
        return _VALKEY_PACKED_HANDLERS if packed else _VALKEY_HANDLERS
    return _REDIS_PACKED_HANDLERS if packed else _REDIS_HANDLERS


# -- the reader ------------------------------------------------------------------------


def _peek(buf: bytes, pos: int) -> tuple[int, int]:
    return buf[pos], pos


def _is_path(file: object) -> bool:
    return isinstance(file, (str, bytes, os.PathLike))


class RdbReader:
    """A one-pass parser of an RDB file, yielding telstate records as it goes.

    Iterate over the reader (or call :meth:`records`) to get
    ``(key, key_type, value)`` records; see the module documentation for
    how types map. The attributes fill in as parsing proceeds.

    Parameters
    ----------
    file
        A path (str, bytes or path-like), opened and closed by the reader,
        or a binary file-like object with a ``read`` method, which need not
        be seekable (an HTTP response body will do) and is left open.
    packed_members
        Return the value of a mutable key whose members all have one length
        as a :class:`~telstate.backend.PackedMembers` (one buffer, sliced
        on access) instead of a list, for consumers that keep it whole (the
        in-memory backend). Others want lists.

    Attributes
    ----------
    version : int or None
        The RDB version, once the header is read.
    magic : bytes or None
        ``b"REDIS"`` or ``b"VALKEY"``, once the header is read.
    aux : dict[bytes, bytes]
        The AUX fields read so far (``redis-ver``, ``ctime``, and any that
        telstate writes such as ``telstate-seq``).
    skipped : collections.Counter[str]
        Keys skipped so far, by type name (``list``, ``set``, ``stream``,
        ``module``, or ``empty zset``/``empty hash`` for empty collections,
        which Redis does not allow).
    keys_read : int
        Records returned so far.
    checksum : int or None
        The CRC-64 from the file's trailer, once read (0 means "not computed").
    """

    def __init__(self, file: PathType | BinaryIO, *, packed_members: bool = False) -> None:
        self.version: int | None = None
        self.magic: bytes | None = None
        self.aux: dict[bytes, bytes] = {}
        self.skipped: Counter[str] = Counter()
        self.keys_read = 0
        self.checksum: int | None = None
        self._filename: PathType | None
        self._owned = _is_path(file)
        if self._owned:
            self._filename = file  # type: ignore[assignment]
            self._file: BinaryIO = open(file, "rb")  # type: ignore[arg-type,assignment]  # noqa: SIM115
        else:
            self._filename = getattr(file, "name", None)
            if not isinstance(self._filename, (str, bytes, os.PathLike)):
                self._filename = None
            self._file = file  # type: ignore[assignment]
        self._remaining = self._known_size()
        self._buf = b""
        self._pos = 0
        self._base = 0  # file offset of self._buf[0]
        self._eof = False
        self._crc: int | None = 0
        self._packed = packed_members
        self._handlers = _handlers_for_version(0, packed_members)
        self._finished = False

    def __enter__(self) -> RdbReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Record]:
        return self.records()

    def close(self) -> None:
        """Close the file if the reader opened it."""
        if self._owned:
            self._file.close()

    # -- input ------------------------------------------------------------------

    def _known_size(self) -> int | None:
        """Bytes left in the input if it is a regular file, else None."""
        try:
            stat = os.fstat(self._file.fileno())
            position = self._file.tell()
        except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
            return None
        if not (stat.st_mode & 0o170000 == 0o100000):
            return None
        return max(stat.st_size - position, 0)

    def _error(self, reason: str, pos: int | None = None) -> RdbParseError:
        offset = self._base + (self._pos if pos is None else pos)
        return RdbParseError(self._filename, f"{reason} (at byte offset {offset})")

    def _fill(self, needed: int, expected: int = 0, minimum: int = 0) -> None:
        """Read more input so that the buffer holds at least `needed` unparsed bytes.

        The buffer at least doubles each time, so re-parsing an item that
        did not fit costs at most as much again as parsing it. From a
        regular file, it also holds the `expected` bytes the item probably
        needs, as far as the file goes and at most :data:`_GUESS_GROWTH`
        times the unparsed bytes: the guess comes from the item's header,
        which a corrupt file may inflate, so memory follows the data read.
        A file shorter than the `minimum` bytes the header implies fails.
        """
        available = len(self._buf) - self._pos
        if self._remaining is not None and max(needed, minimum) > available + self._remaining:
            # A regular file is too short for what the item claims: fail
            # now instead of reading the rest of the file first.
            raise _NeedMore()
        self._checksum_parsed()
        want = max(needed - available, available, _CHUNK_SIZE)
        if self._remaining is not None:
            want = max(want, min(expected - available, _GUESS_GROWTH * available))
            self._refill_regular_file(available, min(want, self._remaining))
            return
        parts = [self._buf[self._pos :]]
        self._pos = 0
        while want > 0:
            data = self._file.read(min(want, _CHUNK_SIZE))
            if not data:
                self._eof = True
                break
            parts.append(data)
            want -= len(data)
        self._buf = b"".join(parts)

    def _checksum_parsed(self) -> None:
        """Add the parsed bytes of the buffer to the checksum and the base offset."""
        if self._crc is not None and self._pos:
            self._crc = crc64(memoryview(self._buf)[: self._pos], self._crc)
        self._base += self._pos

    def _drop_parsed(self) -> None:
        """Keep only the unparsed bytes of the buffer."""
        self._checksum_parsed()
        self._buf = self._buf[self._pos :]
        self._pos = 0

    def _refill_regular_file(self, available: int, fresh: int) -> None:
        """Replace the buffer by its last `available` bytes and `fresh` new ones, in one read.

        Reading the unparsed bytes again (from the page cache) instead of
        joining them to the new ones means the old buffer is freed first and
        nothing is copied: a key bigger than a chunk (one zset of 8 KB arrays
        can be 80 MB) needs a buffer of its size, and a join would hold the
        old buffer, the new data and the joined copy at once.
        """
        self._pos = 0
        if fresh == 0:
            self._eof = True
            self._buf = self._buf[len(self._buf) - available :]
            return
        self._buf = b""
        if available:
            self._file.seek(-available, io.SEEK_CUR)
        size = available + fresh
        chunks = [self._file.read(size)]
        got = len(chunks[0])
        while got < size and (more := self._file.read(size - got)):
            chunks.append(more)
            got += len(more)
        self._buf = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        assert self._remaining is not None
        self._remaining -= max(got - available, 0)
        if got < size:
            # The file shrank under us: what is missing is a truncated item.
            self._eof = True

    def _parse(self, parse: Callable[[bytes, int], tuple[Any, int]]) -> Any:
        """Run one item parser at the current offset, reading more input as needed.

        Raises
        ------
        RdbParseError
            If the item is invalid or the input ends inside it.
        """
        while True:
            try:
                result, pos = parse(self._buf, self._pos)
            except (_NeedMore, IndexError) as exc:
                needed = getattr(exc, "end", 0) - self._pos
                if not self._eof:
                    try:
                        self._fill(
                            max(needed, 1),
                            getattr(exc, "expected", 0) - self._pos,
                            getattr(exc, "minimum", 0) - self._pos,
                        )
                        continue
                    except _NeedMore:
                        pass
                raise self._error("file is truncated inside the item starting here") from None
            except _Corrupt as exc:
                raise self._error(exc.message, exc.pos) from None
            except (ValueError, OverflowError, struct.error) as exc:
                raise self._error(f"invalid data: {exc}") from None
            self._pos = pos
            if pos > _CHUNK_SIZE and 2 * pos > len(self._buf):
                # After a big item (an 80 MB zset of arrays, say) the buffer
                # is mostly parsed bytes: free them now, not at the next
                # read, which comes only after the caller has handled the item.
                self._drop_parsed()
            return result

    # -- parsing ----------------------------------------------------------------

    def _read_header(self) -> None:
        def parse(buf: bytes, pos: int) -> tuple[tuple[bytes, int], int]:
            head, end = _read_fixed(buf, pos, 9)
            magic = b"VALKEY" if head.startswith(b"VALKEY") else head[:5]
            digits = head[len(magic) :]
            if magic not in SUPPORTED_VERSIONS or not digits.isdigit():
                raise _Corrupt("not an RDB file (no REDIS or VALKEY magic)", pos)
            return (magic, int(digits)), end

        magic, version = self._parse(parse)
        if version not in SUPPORTED_VERSIONS[magic]:
            raise self._error(
                f"unsupported RDB version {version} for magic {magic.decode()}"
                f" (supported: {self._describe_supported()})",
                0,
            )
        self.magic = magic
        self.version = version
        self._handlers = _handlers_for_version(version, self._packed)
        if version < _FIRST_VERSION_WITH_CHECKSUM or self._trailer_is_zero():
            self._crc = None

    @staticmethod
    def _describe_supported() -> str:
        return ", ".join(
            f"{magic.decode()} {versions.start}-{versions.stop - 1}"
            for magic, versions in SUPPORTED_VERSIONS.items()
        )

    def _trailer_is_zero(self) -> bool:
        """Peek at the checksum of a seekable input: if it is zero there is nothing to verify."""
        if self._remaining is None:
            return False
        try:
            position = self._file.tell()
            self._file.seek(-8, io.SEEK_END)
            trailer = self._file.read(8)
            self._file.seek(position)
        except (AttributeError, OSError, ValueError):
            return False
        return trailer == bytes(8)

    def _parse_opcode(self, opcode: int) -> bool:
        """Handle a non-key item; return False at the end of the file."""
        if opcode == _OP_AUX:
            name, value = self._parse(self._parse_aux)
            self.aux[name] = value
        elif opcode in (_OP_SELECTDB, _OP_IDLE):
            self._parse(lambda buf, pos: _read_length(buf, pos + 1))
        elif opcode == _OP_RESIZEDB:
            self._parse(lambda buf, pos: (None, _skip_lengths(buf, pos + 1, 2)))
        elif opcode == _OP_EXPIRETIME_MS:
            self._parse(lambda buf, pos: _read_fixed(buf, pos + 1, 8))
        elif opcode == _OP_EXPIRETIME:
            self._parse(lambda buf, pos: _read_fixed(buf, pos + 1, 4))
        elif opcode == _OP_FREQ:
            self._parse(lambda buf, pos: _read_fixed(buf, pos + 1, 1))
        elif opcode == _OP_MODULE_AUX:
            self._parse(self._parse_module_aux)
        elif opcode == _OP_FUNCTION2:
            self._parse(lambda buf, pos: (None, _skip_string(buf, pos + 1)))
        elif opcode == _OP_SLOT_INFO:
            self._parse(lambda buf, pos: (None, _skip_lengths(buf, pos + 1, 3)))
        elif opcode == _OP_SLOT_IMPORT and self.magic == b"VALKEY":
            self._parse(self._parse_slot_import)
        elif opcode == _OP_EOF:
            self._parse_trailer()
            return False
        elif opcode == _OP_FUNCTION_PRE_GA:
            raise self._error("functions saved by a Redis 7.0 release candidate are not supported")
        else:
            raise self._error(f"unknown value type or opcode {opcode}")
        return True

    @staticmethod
    def _parse_aux(buf: bytes, pos: int) -> tuple[tuple[bytes, bytes], int]:
        name, pos = _read_string(buf, pos + 1)
        value, pos = _read_string(buf, pos)
        return (name, value), pos

    @staticmethod
    def _parse_module_aux(buf: bytes, pos: int) -> tuple[None, int]:
        start = pos
        _, pos = _read_length(buf, pos + 1)  # module ID
        when_opcode, pos = _read_length(buf, pos)
        if when_opcode != _MODULE_OPCODE_UINT:
            raise _Corrupt("invalid module auxiliary data", start)
        _, pos = _read_length(buf, pos)
        return None, _skip_module_value(buf, pos)

    @staticmethod
    def _parse_slot_import(buf: bytes, pos: int) -> tuple[None, int]:
        pos = _skip_string(buf, pos + 1)
        ranges, pos = _read_length(buf, pos)
        for _ in range(ranges):
            pos = _skip_lengths(buf, pos, 2)
        return None, pos

    def _parse_trailer(self) -> None:
        """After the EOF opcode: the checksum (from version 5), then nothing at all."""
        end = self._pos + 1
        crc = self._crc
        if crc is not None:
            crc = crc64(memoryview(self._buf)[:end], crc)
            self._crc = None
        self._pos = end
        if self.version is not None and self.version >= _FIRST_VERSION_WITH_CHECKSUM:
            trailer = self._parse(lambda buf, pos: _read_fixed(buf, pos, 8))
            self.checksum = int.from_bytes(trailer, "little")
            if self.checksum and crc is not None and crc != self.checksum:
                raise self._error(
                    f"checksum mismatch: file says {self.checksum:016x}, data gives {crc:016x}",
                    self._pos - 8,
                )
        if self._pos < len(self._buf) or (not self._eof and self._file.read(1)):
            raise self._error("unexpected data after the end of the file")

    def _parse_key(self, buf: bytes, pos: int) -> tuple[tuple[bytes, Any, Any], int]:
        handler = self._handlers.get(buf[pos])
        if handler is None:
            raise _Corrupt(f"unknown value type or opcode {buf[pos]}", pos)
        first = buf[pos + 1]
        if first < 0x40:
            end = pos + 2 + first
            if end > len(buf):
                raise _NeedMore(end)
            key = buf[pos + 2 : end]
        else:
            key, end = _read_string(buf, pos + 1)
        key_type, value, end = handler(buf, end)
        return (key, key_type, value), end

    def read_aux(self) -> dict[bytes, bytes]:
        """Read the header and the AUX fields that follow it, and stop there.

        Returns
        -------
        The AUX fields (also in :attr:`aux`).

        Raises
        ------
        RdbParseError
            If the header or an AUX field is invalid or truncated.
        """
        if self.version is None:
            self._read_header()
        while self._parse(_peek) == _OP_AUX:
            self._parse_opcode(_OP_AUX)
        return self.aux

    def records(self) -> Iterator[Record]:
        """Parse the rest of the file, yielding ``(key, key_type, value)`` records.

        Keys of other types are skipped (see :attr:`skipped`), with one
        warning logged at the end.

        Raises
        ------
        RdbParseError
            If the file is not a valid RDB file; records before the error have
            been yielded already.
        """
        if self._finished:
            return
        if self.version is None:
            self._read_header()
        handlers = self._handlers
        parse_key = self._parse_key
        try:
            while True:
                opcode = self._parse(_peek)
                if opcode not in handlers:
                    if not self._parse_opcode(opcode):
                        break
                    continue
                key, key_type, value = self._parse(parse_key)
                if key_type is None:
                    self.skipped[_SKIPPED_TYPE_NAMES[opcode]] += 1
                elif key_type is not KeyType.IMMUTABLE and not value:
                    self.skipped["empty zset" if key_type is KeyType.MUTABLE else "empty hash"] += 1
                else:
                    self.keys_read += 1
                    yield key, key_type, value
        finally:
            self._finished = True
        if self.skipped:
            summary = ", ".join(f"{count} {name}" for name, count in sorted(self.skipped.items()))
            logger.warning(
                "Skipped %d keys that cannot be telstate keys in RDB file %s: %s",
                sum(self.skipped.values()),
                os.fsdecode(self._filename) if self._filename else "object",
                summary,
            )


def read_records(file: PathType | BinaryIO, *, packed_members: bool = False) -> Iterator[Record]:
    """Yield the ``(key, key_type, value)`` records of an RDB file as they are parsed.

    Parameters
    ----------
    file
        A path, or a binary file-like object (need not be seekable).
    packed_members
        Mutable keys whose members all have one length come as
        :class:`~telstate.backend.PackedMembers` (see :class:`RdbReader`).

    Raises
    ------
    RdbParseError
        If the file is not a valid RDB file (raised when iteration reaches
        the problem).
    OSError
        If the file cannot be opened or read.
    """
    with RdbReader(file, packed_members=packed_members) as reader:
        yield from reader.records()


def read_aux(file: PathType | BinaryIO) -> dict[bytes, bytes]:
    """Return the AUX fields of an RDB file, reading only its beginning.

    Raises
    ------
    RdbParseError
        If the header or an AUX field is invalid.
    OSError
        If the file cannot be opened or read.
    """
    with RdbReader(file) as reader:
        return reader.read_aux()


def _parse_dump(
    payload: bytes, verify_checksum: bool, parse: Callable[[bytes, int], tuple[Any, int]]
) -> Any:
    """Check a DUMP payload's footer, then run `parse` on its body from offset 1."""
    if len(payload) < 11:
        raise RdbParseError(None, f"DUMP payload of {len(payload)} bytes is too short")
    checksum = int.from_bytes(payload[-8:], "little")
    if verify_checksum and checksum and crc64(memoryview(payload)[:-8]) != checksum:
        raise RdbParseError(None, "DUMP payload checksum mismatch")
    body = payload[:-10]
    try:
        result, end = parse(body, 1)
    except (_NeedMore, IndexError):
        raise RdbParseError(None, "DUMP payload is truncated") from None
    except _Corrupt as exc:
        raise RdbParseError(None, f"DUMP payload: {exc.message} (offset {exc.pos})") from None
    except (ValueError, OverflowError, struct.error) as exc:
        raise RdbParseError(None, f"DUMP payload is invalid: {exc}") from None
    if end != len(body):
        raise RdbParseError(None, "DUMP payload has trailing data")
    return result


def decode_dump(
    payload: bytes, verify_checksum: bool = True
) -> tuple[int, KeyType | None, RecordValue | None]:
    """Decode a Redis DUMP payload into (RDB type, key type, value).

    Key type and value are None for types telstate does not use. The footer's
    RDB version picks the meaning of type numbers that Redis and Valkey use
    differently. With `verify_checksum`, a non-zero checksum is verified.
    Sorted sets lose their scores (telstate's are all 0).

    Raises
    ------
    RdbParseError
        If the payload is corrupt or of an unknown type.
    """
    rdb_type = payload[0] if payload else -1
    version = int.from_bytes(payload[-10:-8], "little")
    handler = _handlers_for_version(version).get(rdb_type)
    if handler is None:
        raise RdbParseError(None, f"DUMP payload has unknown type {rdb_type}")

    def parse(buf: bytes, pos: int) -> tuple[tuple[KeyType | None, Any], int]:
        key_type, value, end = handler(buf, pos)
        return (key_type, value), end

    key_type, value = _parse_dump(payload, verify_checksum, parse)
    return rdb_type, key_type, value


def decode_listpack_dump(payload: bytes, verify_checksum: bool = True) -> list[bytes | int]:
    """Return the entries of a DUMP payload holding a listpack (types 16 and 17).

    Entries stored as integers are returned as int, so that they can be
    re-encoded as integers.

    Raises
    ------
    RdbParseError
        If the payload is corrupt or not a listpack.
    """
    if not payload or payload[0] not in (RDB_TYPE_HASH_LISTPACK, RDB_TYPE_ZSET_LISTPACK):
        raise RdbParseError(None, "DUMP payload does not hold a listpack")

    def parse(buf: bytes, pos: int) -> tuple[list[_Entry], int]:
        blob, end = _read_string(buf, pos)
        return _listpack_entries(blob, pos), end

    return _parse_dump(payload, verify_checksum, parse)


# -- katsdptelstate's callback API -------------------------------------------------------


class BackendCallback:
    """Receives the keys of an RDB file one by one from :func:`load_from_file`.

    This is katsdptelstate's callback interface (the method names and
    arguments of rdbtools' ``RdbCallback``, which katsdptelstate's callbacks
    subclass), kept so that callbacks written for katsdptelstate work
    unchanged; telstate's backends load files through
    :meth:`~telstate.backend.Backend.load_records` instead. Every method
    here does nothing: subclasses override those they need.

    A string key is one call of :meth:`set`; a sorted set is
    :meth:`start_sorted_set`, :meth:`zadd` once per member (in zset order)
    and :meth:`end_sorted_set`; a hash is :meth:`start_hash`, :meth:`hset`
    once per field and :meth:`end_hash`. `expiry` is always None (expiry
    times are ignored, see the module docstring), `info` is an empty dict
    and every score is 0.0 (members come in the zset's order instead).

    Attributes
    ----------
    n_keys : int
        Keys stored so far: subclasses count them, and :func:`load_from_file`
        returns the count.
    client_busy : bool
        Kept for katsdptelstate's callbacks, which set it while they talk
        to their client. telstate needs no such flag: exceptions raised by
        a callback always reach the caller unchanged.
    """

    def __init__(self) -> None:
        self.n_keys = 0
        self.client_busy = False

    def set(self, key: bytes, value: bytes, expiry: Any, info: dict) -> None:
        """Store a string key."""

    def start_sorted_set(self, key: bytes, length: int, expiry: Any, info: dict) -> None:
        """Begin a sorted set of `length` members."""

    def zadd(self, key: bytes, score: float, member: bytes) -> None:
        """Add one member of the sorted set begun last."""

    def end_sorted_set(self, key: bytes) -> None:
        """End the sorted set begun last."""

    def start_hash(self, key: bytes, length: int, expiry: Any, info: dict) -> None:
        """Begin a hash of `length` fields."""

    def hset(self, key: bytes, field: bytes, value: bytes) -> None:
        """Add one field of the hash begun last."""

    def end_hash(self, key: bytes) -> None:
        """End the hash begun last."""


def load_from_file(callback: BackendCallback, file: PathType | BinaryIO) -> int:
    """Hand every string, sorted set and hash key of an RDB file to `callback`.

    Parameters
    ----------
    callback
        Receives the keys (see :class:`BackendCallback`).
    file
        A path, or a binary file-like object (need not be seekable).

    Returns
    -------
    int
        ``callback.n_keys`` at the end: the number of keys the callback stored.

    Raises
    ------
    RdbParseError
        If the file is not a valid RDB file. Keys before the problem have
        been handed to `callback` already.
    OSError
        If the file cannot be opened or read.
    Exception
        Whatever `callback` raises, unchanged.
    """
    for key, _, value in read_records(file):
        # The value's type says the key's type (bytes, dict, or members).
        if isinstance(value, bytes):
            callback.set(key, value, None, {})
        elif isinstance(value, dict):
            callback.start_hash(key, len(value), None, {})
            for field, field_value in value.items():
                callback.hset(key, field, field_value)
            callback.end_hash(key)
        else:
            callback.start_sorted_set(key, len(value), None, {})
            for member in value:
                callback.zadd(key, 0.0, member)
            callback.end_sorted_set(key)
    return callback.n_keys
