"""Encoding to the RDB format: values, DUMP payloads and the CRC-64 that guards both.

Values are encoded the way Redis 2.6 to 6.2 encode them, so that every
reader we care about accepts them: redis-server 6.x and 7.x, Valkey 9,
katsdptelstate 1.0.0 (through rdbtools, which stops at RDB version 9) and
telstate itself.

- immutable keys: a plain string (type 0);
- mutable keys (zsets, every score 0): a ziplist (type 12) when small, as
  Redis would keep it in memory, otherwise type 3 whose scores are the
  two-byte string ``"0"``;
- indexed keys (hashes): a ziplist (type 13) when small, otherwise type 4.

A DUMP payload is the type byte and encoded value followed by a footer: the
RDB version (2 bytes, little-endian) and the CRC-64 of everything before it
(8 bytes, little-endian). RESTORE refuses a payload whose checksum is wrong,
including an all-zero one, so the footer carries a real checksum.

The CRC is CRC-64/Jones as Redis computes it (reflected polynomial
0x95ac9329ac4bc9b5, no initial or final XOR). It is linear, which makes it
fast in numpy: long inputs are split into lanes whose CRCs are computed in
parallel and then combined by shifting each through the right number of
zero bytes.
"""

from __future__ import annotations

import functools
import itertools
import struct
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence

import numpy as np

from . import lzf
from .backend import in_zset_order, member_chunks

#: The RDB version written in DUMP payload footers and RDB file headers.
#: Version 9 (Redis 5 to 6.2) is the newest that every target reads: Redis
#: 6.2 refuses 10, rdbtools stops at 9, and Valkey refuses 12 to 79.
RDB_VERSION = 9

#: The DUMP footer katsdptelstate appends to its payloads: RDB version 6
#: and a zero checksum, which Redis and telstate take as "not computed".
#: telstate's payloads end with :func:`dump_footer` instead (version 9, real
#: CRC-64); the constant is kept for code that builds payloads itself.
DUMP_POSTFIX = b"\x06\x00" + bytes(8)

RDB_TYPE_STRING = 0
RDB_TYPE_ZSET = 3
RDB_TYPE_HASH = 4
RDB_TYPE_ZSET_ZIPLIST = 12
RDB_TYPE_HASH_ZIPLIST = 13

# Redis's default thresholds (zset-max-ziplist-entries/-value and the hash
# equivalents): collections within them are saved as ziplists by Redis too.
ZIPLIST_MAX_ENTRIES = 128
ZIPLIST_MAX_VALUE = 64

# Strings shorter than this are not worth compressing (Redis uses the same cut-off).
_LZF_MIN_LENGTH = 21

_CRC_POLY = 0x95AC9329AC4BC9B5
_U64 = np.dtype("<u8")


def _byte_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _CRC_POLY if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _byte_table()


def _apply_columns(columns: Sequence[int], value: int) -> int:
    """Apply a GF(2) 64x64 matrix, given as the images of each bit, to `value`."""
    result = 0
    bit = 0
    while value:
        if value & 1:
            result ^= columns[bit]
        value >>= 1
        bit += 1
    return result


@functools.cache
def _zero_shift(n_bytes: int) -> tuple[int, ...]:
    """The linear map on the CRC register that feeding `n_bytes` zero bytes performs."""
    if n_bytes == 1:
        return tuple(_CRC_TABLE[(1 << bit) & 0xFF] ^ ((1 << bit) >> 8) for bit in range(64))
    half = _zero_shift(n_bytes // 2)
    columns = tuple(_apply_columns(half, column) for column in half)
    if n_bytes % 2:
        one = _zero_shift(1)
        columns = tuple(_apply_columns(one, column) for column in columns)
    return columns


@functools.cache
def _shift_tables(n_bytes: int) -> list[list[int]]:
    """Eight 256-entry tables, one per byte of the register, for :func:`_zero_shift`.

    For 8 bytes these are the classic slicing-by-8 tables.
    """
    columns = _zero_shift(n_bytes)
    tables = []
    for byte in range(8):
        table = [0] * 256
        for value in range(1, 256):
            low = value & -value
            table[value] = table[value ^ low] ^ columns[8 * byte + low.bit_length() - 1]
        tables.append(table)
    return tables


@functools.cache
def _shift_tables_np(n_bytes: int) -> np.ndarray:
    return np.array(_shift_tables(n_bytes), dtype=np.uint64)


@functools.cache
def _step_tables_np() -> np.ndarray:
    """Tables for feeding 8 bytes, indexed by 16-bit pieces of the register (4 x 65536).

    Four look-ups per word instead of eight make the lane loop faster.
    """
    tables = _shift_tables_np(8)
    return np.stack(
        [(tables[2 * k][None, :] ^ tables[2 * k + 1][:, None]).reshape(-1) for k in range(4)]
    )


def _shift_np(tables: np.ndarray, registers: np.ndarray) -> np.ndarray:
    """Shift every CRC register in the array through the zero bytes `tables` stands for.

    `tables` has one row per piece of the register (8 bits or 16 bits wide).
    """
    pieces = registers.view(np.uint8 if tables.shape[1] == 256 else np.uint16)
    pieces = pieces.reshape(len(registers), len(tables))
    result = tables[0][pieces[:, 0]]
    for index in range(1, len(tables)):
        result ^= tables[index][pieces[:, index]]
    return result


def _crc64_python(data: bytes | memoryview, crc: int) -> int:
    """Slicing-by-8 CRC in pure Python: fastest for short inputs."""
    words = len(data) // 8
    t0, t1, t2, t3, t4, t5, t6, t7 = _shift_tables(8)
    for word in struct.unpack_from(f"<{words}Q", data):
        x = crc ^ word
        crc = (
            t0[x & 0xFF]
            ^ t1[(x >> 8) & 0xFF]
            ^ t2[(x >> 16) & 0xFF]
            ^ t3[(x >> 24) & 0xFF]
            ^ t4[(x >> 32) & 0xFF]
            ^ t5[(x >> 40) & 0xFF]
            ^ t6[(x >> 48) & 0xFF]
            ^ t7[x >> 56]
        )
    table = _CRC_TABLE
    for byte in data[8 * words :]:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc


# Each numpy lane covers this many bytes; lanes come in powers of two so that
# every shift needed to combine them is by LANE_BYTES * 2**k and the few
# tables involved are computed once. 1 KiB lanes, up to 16 MiB at once: fewer,
# longer numpy steps than 2 KiB lanes (about 20% faster from 1 MiB up, measured);
# below 32 lanes (32 KiB) the Python loop is faster.
_LANE_WORDS = 128
_LANE_BYTES = 8 * _LANE_WORDS
_MIN_LANES = 32
_MAX_LANES = 16384


def _crc64_lanes(data: memoryview, lanes: int) -> int:
    """CRC (from zero) of exactly ``lanes * _LANE_BYTES`` bytes, computed lane-parallel."""
    words = np.frombuffer(data, dtype=_U64, count=lanes * _LANE_WORDS)
    # Step j processes word j of every lane at once: make those adjacent.
    columns = np.ascontiguousarray(words.reshape(lanes, _LANE_WORDS).T)
    step = _step_tables_np()
    registers = np.zeros(lanes, dtype=np.uint64)
    for column in columns:
        registers ^= column
        registers = _shift_np(step, registers)
    span = _LANE_BYTES
    while len(registers) > 1:
        # crc(A + B) = shift(crc(A), len(B)) ^ crc(B) for this CRC (no XORs).
        evens = np.ascontiguousarray(registers[0::2])
        registers = _shift_np(_shift_tables_np(span), evens) ^ registers[1::2]
        span *= 2
    return int(registers[0])


def crc64(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """Return the Redis CRC-64 of `data`, continuing from `crc` (the CRC of what came before)."""
    view = memoryview(data).cast("B")
    pos = 0
    while len(view) - pos >= _MIN_LANES * _LANE_BYTES:
        lanes = min(_MAX_LANES, 1 << ((len(view) - pos) // _LANE_BYTES).bit_length() - 1)
        size = lanes * _LANE_BYTES
        block = _crc64_lanes(view[pos : pos + size], lanes)
        crc = _shifted(_shift_tables(size), crc) ^ block
        pos += size
    return _crc64_python(view[pos:], crc)


def _shifted(tables: list[list[int]], crc: int) -> int:
    """The CRC register `crc` after the zero bytes that `tables` (of _shift_tables) stand for."""
    return (
        tables[0][crc & 0xFF]
        ^ tables[1][(crc >> 8) & 0xFF]
        ^ tables[2][(crc >> 16) & 0xFF]
        ^ tables[3][(crc >> 24) & 0xFF]
        ^ tables[4][(crc >> 32) & 0xFF]
        ^ tables[5][(crc >> 40) & 0xFF]
        ^ tables[6][(crc >> 48) & 0xFF]
        ^ tables[7][crc >> 56]
    )


def crc64_shift(crc: int, n_bytes: int) -> int:
    """The CRC register `crc` after `n_bytes` zero bytes more.

    Linearity gives ``crc64(a + b) == crc64_shift(crc64(a), len(b)) ^ crc64(b)``:
    the CRC of a concatenation from the CRCs of its parts, without reading them.
    """
    power = 0
    while n_bytes and crc:
        if n_bytes & 1:
            crc = _shifted(_shift_tables(1 << power), crc)
        n_bytes >>= 1
        power += 1
    return crc


@functools.cache
def _table_by_top_byte() -> dict[int, int]:
    """Index of each entry of the byte table by its top byte (all 256 differ)."""
    inverse = {entry >> 56: index for index, entry in enumerate(_CRC_TABLE)}
    assert len(inverse) == 256
    return inverse


def crc64_before(crc: int, data: bytes) -> int:
    """The CRC before `data`, given `crc`, the CRC after it: ``crc64(a)`` from ``crc64(a + data)``.

    Each step of the CRC is invertible (the table's entries differ in
    their top byte), so a checksum that covers a suffix one does not want
    (a DUMP payload's version bytes) can be taken back.
    """
    table = _CRC_TABLE
    by_top = _table_by_top_byte()
    for byte in reversed(data):
        index = by_top[crc >> 56]
        crc = ((crc ^ table[index]) << 8) | (index ^ byte)
    return crc


def encode_len(length: int) -> bytes:
    """Encode a length in the RDB length format (1, 2, 5 or 9 bytes).

    Lengths below 64 take one byte, below 16384 two bytes (14 bits, big-endian),
    below 2**32 a marker byte 0x80 and 4 big-endian bytes, otherwise a
    marker 0x81 and 8 bytes.

    Raises
    ------
    ValueError
        If `length` is negative or does not fit in 64 bits.
    """
    if length < 0 or length >= 1 << 64:
        raise ValueError(f"cannot encode length {length} in RDB format")
    if length < 1 << 6:
        return bytes((length,))
    if length < 1 << 14:
        return bytes((0x40 | (length >> 8), length & 0xFF))
    if length < 1 << 32:
        return b"\x80" + length.to_bytes(4, "big")
    return b"\x81" + length.to_bytes(8, "big")


def encode_prev_length(length: int) -> bytes:
    """Encode the previous-entry length field of a ziplist entry.

    Lengths below 254 take one byte; longer ones are 0xFE followed by 4
    little-endian bytes.

    Raises
    ------
    ValueError
        If `length` is negative or does not fit in 32 bits.
    """
    if length < 0 or length >= 1 << 32:
        raise ValueError(f"cannot encode ziplist entry length {length}")
    if length < 254:
        return bytes((length,))
    return b"\xfe" + length.to_bytes(4, "little")


def encode_string(data: bytes, compress: bool = False) -> bytes:
    """Encode `data` as an RDB string: its length then its bytes, or LZF-compressed.

    With `compress`, strings that LZF shrinks by more than 4 bytes are stored
    compressed, as Redis does with ``rdbcompression yes``.

    Raises
    ------
    ValueError
        If `data` is too long to encode.
    """
    if compress and len(data) >= _LZF_MIN_LENGTH:
        packed = lzf.compress(data)
        if len(packed) < len(data) - 4:
            return b"\xc3" + encode_len(len(packed)) + encode_len(len(data)) + packed
    return encode_len(len(data)) + data


def encode_ziplist(entries: Iterable[bytes | int]) -> bytes:
    """Create a ziplist, without the RDB string envelope around it.

    Entries are byte strings, or integers from 0 to 12 (stored in the
    encoding byte itself); other integers are stored as their decimal digits.

    Layout (little-endian): total bytes (4), offset of the last entry (4),
    number of entries (2, or 65535 if it does not fit), the entries, 0xFF.
    Each entry is the previous entry's length (see
    :func:`encode_prev_length`), an encoding header, then the data.

    Raises
    ------
    ValueError
        If an entry is too long for a ziplist.
    """
    parts = [b""]
    size = 10
    previous = 0
    last = size
    count = 0
    for entry in entries:
        header = encode_prev_length(previous)
        if isinstance(entry, int) and 0 <= entry <= 12:
            body = bytes((0xF1 + entry,))
        else:
            data = b"%d" % entry if isinstance(entry, int) else entry
            length = len(data)
            if length < 1 << 6:
                body = bytes((length,)) + data
            elif length < 1 << 14:
                body = bytes((0x40 | (length >> 8), length & 0xFF)) + data
            elif length < 1 << 32:
                body = b"\x80" + length.to_bytes(4, "big") + data
            else:
                raise ValueError(f"ziplist entry of {length} bytes is too long")
        last = size
        previous = len(header) + len(body)
        size += previous
        parts.append(header)
        parts.append(body)
        count += 1
    size += 1
    parts.append(b"\xff")
    parts[0] = struct.pack("<IIH", size, last, min(count, 0xFFFF))
    return b"".join(parts)


@functools.cache
def _length_headers() -> list[bytes]:
    """:func:`encode_len` of every length below 2**14, to encode many strings at C speed."""
    return [encode_len(length) for length in range(1 << 14)]


def _encode_strings(entries: Sequence[bytes], suffix: bytes = b"") -> bytes:
    """Concatenate each entry as an RDB string, each followed by `suffix`."""
    if entries and max(map(len, entries)) < 1 << 14:
        headers: Iterable[bytes] = map(_length_headers().__getitem__, map(len, entries))
    else:
        headers = [encode_len(len(entry)) for entry in entries]
    if suffix:
        return b"".join(
            itertools.chain.from_iterable(zip(headers, entries, itertools.repeat(suffix)))
        )
    return b"".join(itertools.chain.from_iterable(zip(headers, entries)))


def dump_iterable(prefix: bytes, suffix: bytes, entries: Iterable[bytes]) -> bytes:
    """Concatenate `prefix`, each entry as an RDB string, and `suffix`.

    Raises
    ------
    ValueError
        If an entry is too long to encode.
    """
    return prefix + _encode_strings(list(entries)) + suffix


def _fits_ziplist(entries: Sequence[bytes], count: int) -> bool:
    return count <= ZIPLIST_MAX_ENTRIES and max(map(len, entries), default=0) <= ZIPLIST_MAX_VALUE


#: Members encoded per piece when a big zset is streamed.
ZSET_CHUNK = 4096


def encode_zset_value(members: Collection[bytes], compress: bool = False) -> tuple[int, bytes]:
    """Encode zset `members`, all with score 0, as (RDB type, encoded value).

    The members must be distinct and in order (see :func:`encode_zset_parts`).

    Raises
    ------
    ValueError
        If a member is too long to encode, or the members are not in order.
    """
    rdb_type, parts = encode_zset_parts(members, compress)
    return rdb_type, b"".join(parts)


def encode_zset_parts(
    members: Collection[bytes], compress: bool = False
) -> tuple[int, Iterator[bytes]]:
    """Encode zset `members`, all with score 0, as (RDB type, pieces of the encoded value).

    The members must be distinct and in order (RDB readers trust the order
    of a ziplist, and Redis refuses a repeated member). A big zset is
    streamed: its length (``len(members)``) first, then the members in
    pieces of :data:`ZSET_CHUNK`, read from `members` only as the pieces
    are taken, so that a key of any length needs memory for one piece.

    Raises
    ------
    ValueError
        If a member is too long to encode (from the first piece), or the
        members are out of order or number other than ``len(members)``
        (from the piece that shows it: a file with the pieces before it
        written is corrupt and must be discarded).
    """
    count = len(members)
    if count <= ZIPLIST_MAX_ENTRIES:
        small = list(members)
        if len(small) != count:
            raise ValueError(f"a zset of {count} members gave {len(small)}")
        _check_order(small, None)
        if _fits_ziplist(small, count):
            entries: list[bytes | int] = []
            for member in small:
                entries += (member, 0)
            return RDB_TYPE_ZSET_ZIPLIST, iter([encode_string(encode_ziplist(entries), compress)])
        members = small
    return RDB_TYPE_ZSET, _zset_pieces(members, count, compress)


def _zset_pieces(members: Collection[bytes], count: int, compress: bool) -> Iterator[bytes]:
    """Type 3: the length, then each member as a string followed by the score "0"."""
    yield encode_len(count)
    seen = 0
    last: bytes | None = None
    for chunk in member_chunks(members, ZSET_CHUNK):
        _check_order(chunk, last)
        seen += len(chunk)
        if seen > count:
            break
        last = chunk[-1]
        if compress:
            yield b"".join(encode_string(member, True) + b"\x010" for member in chunk)
        else:
            # Type 3 stores each score as a string: "\x01" "0" is the score 0.
            yield _encode_strings(chunk, b"\x010")
    if seen != count:
        raise ValueError(f"a zset of {count} members gave {'more' if seen > count else seen}")


def _check_order(members: Sequence[bytes], last: bytes | None) -> None:
    """Raise ValueError unless `members` are distinct, in order, and all after `last`."""
    if (last is not None and members and not last < members[0]) or not in_zset_order(members):
        raise ValueError("zset members are not distinct and in order")


def encode_hash_value(fields: Mapping[bytes, bytes], compress: bool = False) -> tuple[int, bytes]:
    """Encode a hash as (RDB type, encoded value).

    Raises
    ------
    ValueError
        If a field or value is too long to encode.
    """
    flat = list(itertools.chain.from_iterable(fields.items()))
    if _fits_ziplist(flat, len(fields)):
        return RDB_TYPE_HASH_ZIPLIST, encode_string(encode_ziplist(flat), compress)
    if compress:
        body = b"".join(encode_string(entry, True) for entry in flat)
        return RDB_TYPE_HASH, encode_len(len(fields)) + body
    return RDB_TYPE_HASH, encode_len(len(fields)) + _encode_strings(flat)


def dump_footer(payload: bytes) -> bytes:
    """Return the DUMP footer for `payload` (type byte and encoded value).

    It is the RDB version as 2 little-endian bytes and then the CRC-64 of
    payload and version as 8 little-endian bytes.
    """
    version = RDB_VERSION.to_bytes(2, "little")
    return version + crc64(version, crc64(payload)).to_bytes(8, "little")


def _dump(rdb_type: int, value: bytes) -> bytes:
    payload = bytes((rdb_type,)) + value
    return payload + dump_footer(payload)


def dump_string(data: bytes) -> bytes:
    """Encode a binary string as the Redis DUMP command would.

    Raises
    ------
    ValueError
        If `data` is too long to encode.
    """
    return _dump(RDB_TYPE_STRING, encode_string(data))


def dump_zset(data: Collection[bytes]) -> bytes:
    """Encode zset members, all with score 0, as the Redis DUMP command would.

    Small sets become a ziplist (type 12); larger ones type 3, whose
    scores are strings.

    Raises
    ------
    ValueError
        If a member is too long to encode.
    """
    return _dump(*encode_zset_value(data))


def dump_hash(data: Mapping[bytes, bytes]) -> bytes:
    """Encode a hash as the Redis DUMP command would.

    Small hashes become a ziplist (type 13); larger ones type 4.

    Raises
    ------
    ValueError
        If a field or value is too long to encode.
    """
    return _dump(*encode_hash_value(data))
