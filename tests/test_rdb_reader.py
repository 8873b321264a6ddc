"""The RDB reader on hand-built files: every opcode, string form, type and encoding.

Files made by real servers are tested in test_rdb_servers.py; corrupt input
in test_rdb_fuzz.py. The builders here are written independently of
telstate.rdb_utility, so that the reader is not only checked against the
writer.
"""

from __future__ import annotations

import io
import logging
import math
import os
import pathlib
import struct
import time

import pytest

from telstate import lzf, rdb_reader, rdb_utility
from telstate.errors import RdbParseError
from telstate.rdb_reader import RdbReader, read_aux, read_records
from telstate.utils import KeyType

IMMUTABLE, MUTABLE, INDEXED = KeyType.IMMUTABLE, KeyType.MUTABLE, KeyType.INDEXED


# -- builders -----------------------------------------------------------------------------


def crc64(data: bytes) -> int:
    """Bit-by-bit CRC-64/Jones: slow and obviously right.

    Large files use telstate's fast CRC instead, which test_rdb_utility checks
    against this.
    """
    if len(data) > 100_000:
        return rdb_utility.crc64(data)
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x95AC9329AC4BC9B5 if crc & 1 else 0)
    return crc


def length(n: int, width: int | None = None) -> bytes:
    """RDB length; `width` forces the 6/14/32/64-bit form."""
    width = width or (6 if n < 64 else 14 if n < 16384 else 32 if n < 2**32 else 64)
    if width == 6:
        return bytes([n])
    if width == 14:
        return struct.pack(">H", 0x4000 | n)
    if width == 32:
        return b"\x80" + struct.pack(">I", n)
    return b"\x81" + struct.pack(">Q", n)


def string(data: bytes, width: int | None = None) -> bytes:
    return length(len(data), width) + data


def int_string(value: int) -> bytes:
    """A string stored as an 8, 16 or 32-bit integer."""
    for code, fmt in ((0xC0, "<b"), (0xC1, "<h"), (0xC2, "<i")):
        try:
            return bytes([code]) + struct.pack(fmt, value)
        except struct.error:
            continue
    raise ValueError(value)


def lzf_string(data: bytes) -> bytes:
    packed = lzf.compress_python(data)
    return b"\xc3" + length(len(packed)) + length(len(data)) + packed


def key(rdb_type: int, name: bytes, value: bytes) -> bytes:
    return bytes([rdb_type]) + string(name) + value


def rdb_file(
    *items: bytes, version: int = 9, magic: bytes = b"REDIS", checksum: str = "good"
) -> bytes:
    """A file: header, items, EOF and (from version 5) a good, zero or bad checksum."""
    digits = b"%03d" % version if magic == b"VALKEY" else b"%04d" % version
    data = magic + digits + b"".join(items) + b"\xff"
    if version >= 5:
        crc = {"good": crc64(data), "zero": 0, "bad": crc64(data) ^ 1}[checksum]
        data += struct.pack("<Q", crc)
    return data


def aux(name: bytes, value: bytes) -> bytes:
    return b"\xfa" + string(name) + string(value)


def listpack(entries: list[bytes | int], valkey: bool = False) -> bytes:
    """A listpack, choosing the smallest encoding for each entry (as Redis does).

    Redis stores an entry length of 2**14 - 1 (and 2**21 - 1, 2**28 - 1) in
    one byte more than needed; Valkey (`valkey`) does not.
    """
    body = b""
    for entry in entries:
        if isinstance(entry, int):
            if 0 <= entry < 128:
                encoded = bytes([entry])
            elif -4096 <= entry < 4096:
                encoded = struct.pack(">H", 0xC000 | (entry & 0x1FFF))
            elif -(2**15) <= entry < 2**15:
                encoded = b"\xf1" + struct.pack("<h", entry)
            elif -(2**23) <= entry < 2**23:
                encoded = b"\xf2" + struct.pack("<i", entry)[:3]
            elif -(2**31) <= entry < 2**31:
                encoded = b"\xf3" + struct.pack("<i", entry)
            else:
                encoded = b"\xf4" + struct.pack("<q", entry)
        elif len(entry) < 64:
            encoded = bytes([0x80 | len(entry)]) + entry
        elif len(entry) < 4096:
            encoded = struct.pack(">H", 0xE000 | len(entry)) + entry
        else:
            encoded = b"\xf0" + struct.pack("<I", len(entry)) + entry
        # The entry's length, stored to be read backwards: 7 bits a byte, with the
        # high bit set on all but the first (Redis's lpEncodeBacklen thresholds).
        size = len(encoded)
        width = 1 + sum(size >= 1 << bits for bits in (7, 14, 21, 28))
        if not valkey and size in (2**14 - 1, 2**21 - 1, 2**28 - 1):
            width += 1
        back = bytes(
            ((size >> (7 * (width - 1 - k))) & 127) | (128 if k else 0) for k in range(width)
        )
        body += encoded + back
    total = 6 + len(body) + 1
    return struct.pack("<IH", total, min(len(entries), 65535)) + body + b"\xff"


def ziplist(entries: list[bytes | int]) -> bytes:
    """A ziplist, with every integer width that Redis uses."""
    body = b""
    previous = 0
    tail = 10
    for entry in entries:
        prev = bytes([previous]) if previous < 254 else b"\xfe" + struct.pack("<I", previous)
        if isinstance(entry, int):
            if 0 <= entry <= 12:
                encoded = bytes([0xF1 + entry])
            elif -128 <= entry < 128:
                encoded = b"\xfe" + struct.pack("<b", entry)
            elif -(2**15) <= entry < 2**15:
                encoded = b"\xc0" + struct.pack("<h", entry)
            elif -(2**23) <= entry < 2**23:
                encoded = b"\xf0" + struct.pack("<i", entry)[:3]
            elif -(2**31) <= entry < 2**31:
                encoded = b"\xd0" + struct.pack("<i", entry)
            else:
                encoded = b"\xe0" + struct.pack("<q", entry)
        elif len(entry) < 64:
            encoded = bytes([len(entry)]) + entry
        elif len(entry) < 16384:
            encoded = struct.pack(">H", 0x4000 | len(entry)) + entry
        else:
            encoded = b"\x80" + struct.pack(">I", len(entry)) + entry
        tail = 10 + len(body)
        body += prev + encoded
        previous = len(prev) + len(encoded)
    total = 10 + len(body) + 1
    return struct.pack("<IIH", total, tail, min(len(entries), 65535)) + body + b"\xff"


def zipmap(pairs: list[tuple[bytes, bytes]], free: int = 0) -> bytes:
    def zm_len(n: int) -> bytes:
        return bytes([n]) if n < 254 else b"\xfe" + struct.pack("<I", n)

    body = b"".join(
        zm_len(len(f)) + f + zm_len(len(v)) + bytes([free]) + v + b"\0" * free for f, v in pairs
    )
    return bytes([len(pairs)]) + body + b"\xff"


def parse(data: bytes) -> list:
    return list(read_records(io.BytesIO(data)))


def ts(t: float, value: bytes = b"v") -> bytes:
    return struct.pack(">d", t) + value


# -- strings and lengths ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("encoded", "value"),
    [
        (string(b"abc"), b"abc"),
        (string(b""), b""),
        (string(b"x" * 100), b"x" * 100),
        (string(b"x" * 20000), b"x" * 20000),
        (string(b"abc", 14), b"abc"),
        (string(b"abc", 32), b"abc"),
        (string(b"abc", 64), b"abc"),
        (int_string(-5), b"-5"),
        (int_string(127), b"127"),
        (int_string(-1000), b"-1000"),
        (int_string(2**31 - 1), b"2147483647"),
        (int_string(-(2**31)), b"-2147483648"),
        (lzf_string(b"compressible " * 50), b"compressible " * 50),
    ],
)
def test_string_forms(encoded: bytes, value: bytes) -> None:
    assert parse(rdb_file(key(0, b"k", encoded))) == [(b"k", IMMUTABLE, value)]
    # Keys use the same forms.
    assert parse(rdb_file(bytes([0]) + encoded + string(b"v"))) == [(value, IMMUTABLE, b"v")]


def test_binary_and_empty_keys() -> None:
    records = parse(rdb_file(key(0, b"\x00\xff\n", b"\x00"), key(0, b"", string(b"\xff"))))
    assert records == [(b"\x00\xff\n", IMMUTABLE, b""), (b"", IMMUTABLE, b"\xff")]


# -- opcodes ------------------------------------------------------------------------------


def module_value() -> bytes:
    # Every module opcode: signed, unsigned, float, double, string, then EOF.
    return (
        length(1)
        + length(5)
        + length(2)
        + length(2**40)
        + length(3)
        + struct.pack("<f", 1.5)
        + length(4)
        + struct.pack("<d", 2.5)
        + length(5)
        + string(b"module data")
        + length(0)
    )


def test_every_opcode() -> None:
    data = rdb_file(
        aux(b"redis-ver", b"7.4.0"),
        b"\xfa" + string(b"ctime") + int_string(1700000000 & 0x7FFFFFFF),
        b"\xf7" + length(0x1234567890, 64) + length(2) + length(2) + module_value(),
        b"\xf5" + string(b"#!lua name=lib\nredis.register_function('f', function() end)"),
        b"\xfe" + length(0),
        b"\xfb" + length(10) + length(2),
        b"\xf4" + length(100) + length(3) + length(1),
        b"\xfc" + struct.pack("<q", 1_700_000_000_000),
        key(0, b"expires_ms", string(b"a")),
        b"\xfd" + struct.pack("<i", 1_700_000_000),
        key(0, b"expires_s", string(b"b")),
        b"\xf8" + length(12345),
        key(0, b"idle", string(b"c")),
        b"\xf9" + b"\x07",
        key(0, b"freq", string(b"d")),
        b"\xfe" + length(15),
        key(0, b"db15", string(b"e")),
        version=12,
    )
    reader = RdbReader(io.BytesIO(data))
    records = list(reader)
    assert [r[0] for r in records] == [b"expires_ms", b"expires_s", b"idle", b"freq", b"db15"]
    assert reader.version == 12 and reader.magic == b"REDIS"
    assert reader.aux == {b"redis-ver": b"7.4.0", b"ctime": b"%d" % (1700000000 & 0x7FFFFFFF)}
    assert reader.checksum == crc64(data[:-8])
    assert reader.keys_read == 5 and not reader.skipped


def test_valkey_slot_import_opcode() -> None:
    ranges = length(0) + length(100) + length(200) + length(300)
    item = b"\xf3" + string(b"j" * 40) + length(2) + ranges
    data = rdb_file(item, key(0, b"k", string(b"v")), magic=b"VALKEY", version=80)
    assert parse(data) == [(b"k", IMMUTABLE, b"v")]
    # Redis gives that opcode another meaning (key metadata), which telstate does not know.
    with pytest.raises(RdbParseError, match="opcode 243"):
        parse(rdb_file(item, version=12))


def test_function_pre_ga_is_refused() -> None:
    with pytest.raises(RdbParseError, match="release candidate"):
        parse(rdb_file(b"\xf6" + string(b"lib"), version=10))


def test_module_aux_with_bad_when_opcode() -> None:
    with pytest.raises(RdbParseError, match="module auxiliary"):
        parse(rdb_file(b"\xf7" + length(1) + length(1) + length(2) + length(0)))


# -- types and encodings ------------------------------------------------------------------

MEMBERS = [ts(1.0, b"a"), ts(2.0, b""), ts(2.0, b"b"), ts(3.0, b"x" * 100)]


def zset_text(members: list[bytes], scores: list[bytes] | None = None) -> bytes:
    scores = scores or [b"\x010"] * len(members)
    return length(len(members)) + b"".join(string(m) + s for m, s in zip(members, scores))


def zset_binary(members: list[bytes], scores: list[float] | None = None) -> bytes:
    scores = scores or [0.0] * len(members)
    return length(len(members)) + b"".join(
        string(m) + struct.pack("<d", s) for m, s in zip(members, scores)
    )


@pytest.mark.parametrize(
    ("rdb_type", "value"),
    [
        (3, zset_text(MEMBERS[::-1])),
        (5, zset_binary(MEMBERS[::-1])),
        (5, zset_binary(MEMBERS, [0.0, -0.0, 0.0, -0.0])),
        (12, string(ziplist([x for m in MEMBERS for x in (m, 0)]))),
        (12, lzf_string(ziplist([x for m in MEMBERS for x in (m, 0)]))),
        (12, string(ziplist([x for m in MEMBERS for x in (m, b"0")]))),
        (17, string(listpack([x for m in MEMBERS for x in (m, 0)]))),
    ],
)
def test_zset_encodings(rdb_type: int, value: bytes) -> None:
    assert parse(rdb_file(key(rdb_type, b"z", value))) == [(b"z", MUTABLE, MEMBERS)]


def test_zset_ordered_by_score_then_member() -> None:
    members = [b"d", b"c", b"b", b"a", b"e", b"f"]
    scores_text = [b"\x011", b"\x02-1", b"\xfe", b"\xff", b"\x030.5", b"\x011"]
    expected = [b"a", b"c", b"e", b"d", b"f", b"b"]  # -inf, -1, 0.5, 1, 1, +inf
    assert parse(rdb_file(key(3, b"z", zset_text(members, scores_text))))[0][2] == expected
    binary = zset_binary(members, [1.0, -1.0, math.inf, -math.inf, 0.5, 1.0])
    assert parse(rdb_file(key(5, b"z", binary)))[0][2] == expected
    entries = [b"d", 1, b"c", -1, b"b", b"inf", b"a", b"-inf", b"e", b"0.5", b"f", 1]
    assert parse(rdb_file(key(17, b"z", string(listpack(entries)))))[0][2] == expected


def test_zset_integer_members_and_scores() -> None:
    # Members that look like integers are stored as integers in ziplists and listpacks.
    numbers = [0, 12, 13, -1, 127, 128, -4096, 4095, 40000, -(2**23), 2**31, -(2**63)]
    expected = sorted(b"%d" % n for n in numbers)
    for blob in (ziplist, listpack):
        entries = [x for n in numbers for x in (n, 0)]
        records = parse(rdb_file(key(17 if blob is listpack else 12, b"z", string(blob(entries)))))
        assert records == [(b"z", MUTABLE, expected)]


def test_large_zsets_with_uniform_and_mixed_members() -> None:
    uniform = [ts(float(i), b"\xcb" + struct.pack(">d", i / 7)) for i in range(1000)]
    mixed = [ts(float(i), b"v" * (i % 13)) for i in range(1000)]
    runs = uniform[:100] + [ts(5000.0, b"odd")] + uniform[100:300]
    shuffled = uniform[::2] + uniform[1::2]
    data = rdb_file(
        key(3, b"uniform", zset_text(uniform)),
        key(5, b"uniform5", zset_binary(uniform)),
        key(3, b"mixed", zset_text(mixed)),
        key(3, b"runs", zset_text(runs)),
        key(5, b"shuffled", zset_binary(shuffled)),
        key(3, b"nonzero", zset_text(uniform[:50], [b"\x011"] + [b"\x010"] * 49)),
    )
    records = {k: v for k, _, v in parse(data)}
    assert records[b"uniform"] == uniform == records[b"uniform5"]
    assert records[b"mixed"] == sorted(mixed)
    assert records[b"runs"] == sorted(runs)
    assert records[b"shuffled"] == uniform
    assert records[b"nonzero"] == uniform[1:50] + uniform[:1]


HASH = {b"a": b"1", b"": b"", b"field": b"x" * 100, b"\xff": b"-70000"}


def hash_plain(fields: dict[bytes, bytes]) -> bytes:
    return length(len(fields)) + b"".join(string(f) + string(v) for f, v in fields.items())


@pytest.mark.parametrize(
    ("rdb_type", "value"),
    [
        (4, hash_plain(HASH)),
        (9, string(zipmap(list(HASH.items())))),
        (9, string(zipmap(list(HASH.items()), free=3))),
        (13, string(ziplist([b"a", 1, b"", b"", b"field", b"x" * 100, b"\xff", -70000]))),
        (16, string(listpack([b"a", 1, b"", b"", b"field", b"x" * 100, b"\xff", -70000]))),
    ],
)
def test_hash_encodings(rdb_type: int, value: bytes) -> None:
    assert parse(rdb_file(key(rdb_type, b"h", value))) == [(b"h", INDEXED, HASH)]


def test_hash_with_encoded_strings() -> None:
    value = length(2) + int_string(1) + lzf_string(b"ab" * 50) + lzf_string(b"cd" * 50)
    value += int_string(-70000)
    expected = {b"1": b"ab" * 50, b"cd" * 50: b"-70000"}
    assert parse(rdb_file(key(4, b"h", value))) == [(b"h", INDEXED, expected)]


def test_zipmap_long_entries() -> None:
    pairs = [(b"f" * 300, b"v" * 1000), (b"g", b"")]
    assert parse(rdb_file(key(9, b"h", string(zipmap(pairs)))))[0][2] == dict(pairs)


def test_long_listpack_and_ziplist_entries() -> None:
    # String headers of every width, and the backwards lengths around their boundaries.
    sizes = [63, 64, 124, 125, 126, 4095, 4096, 16377, 16378, 16379, 70000, 2**21 - 6]
    fields = {b"%d" % n: b"v" * n for n in sizes}
    flat = [x for f, v in fields.items() for x in (f, v)]
    for rdb_type, blob in ((16, listpack), (16, lambda e: listpack(e, valkey=True)), (13, ziplist)):
        assert parse(rdb_file(key(rdb_type, b"h", string(blob(flat)))))[0][2] == fields


def test_redis_hashes_with_field_expiry() -> None:
    fields = {b"a": b"1", b"b": b"2"}
    ttl_pairs = length(2) + length(0) + string(b"a") + string(b"1")
    ttl_pairs += length(1_700_000_000_000) + string(b"b") + string(b"2")
    min_expiry = struct.pack("<Q", 1_700_000_000_000)
    triples = listpack([b"a", b"1", 0, b"b", b"2", 1_700_000_000_000])
    data = rdb_file(
        key(22, b"metadata_pre_ga", ttl_pairs),
        key(23, b"listpack_ex_pre_ga", string(triples)),
        key(24, b"metadata", min_expiry + ttl_pairs),
        key(25, b"listpack_ex", min_expiry + string(triples)),
        version=12,
    )
    assert parse(data) == [
        (name, INDEXED, fields)
        for name in (b"metadata_pre_ga", b"listpack_ex_pre_ga", b"metadata", b"listpack_ex")
    ]


def test_valkey_hash_with_field_expiry() -> None:
    value = length(2) + string(b"a") + string(b"1") + struct.pack("<q", -1)
    value += string(b"b") + string(b"2") + struct.pack("<q", 1_700_000_000_000)
    data = rdb_file(key(22, b"h", value), magic=b"VALKEY", version=80)
    assert parse(data) == [(b"h", INDEXED, {b"a": b"1", b"b": b"2"})]


def stream_value(version: int) -> bytes:
    value = length(1) + string(b"\0" * 16) + string(listpack([b"entry"]))
    value += length(1) + length(5) + length(0)  # length, last ID
    if version > 1:
        value += length(1) + length(0) + length(0) + length(0) + length(1)
    value += length(1) + string(b"group") + length(5) + length(0)  # one group, its last ID
    if version > 1:
        value += length(1)  # entries read
    value += length(1) + b"\1" * 16 + struct.pack("<q", 1) + length(1)  # one pending entry
    value += length(1) + string(b"consumer") + struct.pack("<q", 2)  # one consumer
    if version > 2:
        value += struct.pack("<q", 3)  # active time
    return value + length(1) + b"\1" * 16  # its pending entry


SKIPPED = [
    (1, length(2) + string(b"a") + lzf_string(b"b" * 100), "list"),
    (10, string(ziplist([b"a"])), "list"),
    (14, length(2) + string(ziplist([b"a"])) + string(ziplist([1])), "list"),
    (18, length(2) + length(2) + string(listpack([b"a"])) + length(1) + string(b"p"), "list"),
    (2, length(1) + int_string(5), "set"),
    (11, string(struct.pack("<II", 2, 1) + b"\1\0"), "set"),
    (20, string(listpack([b"a", 1])), "set"),
    (15, stream_value(1), "stream"),
    (19, stream_value(2), "stream"),
    (21, stream_value(3), "stream"),
    (7, length(0x1234567890, 64) + module_value(), "module"),
]


def test_other_types_are_skipped_with_one_warning(caplog) -> None:
    items = [key(rdb_type, b"skip%d" % rdb_type, value) for rdb_type, value, _ in SKIPPED]
    items.insert(3, key(0, b"kept", string(b"v")))
    items.append(key(3, b"empty zset", length(0)))
    items.append(key(13, b"empty hash", string(ziplist([]))))
    reader = RdbReader(io.BytesIO(rdb_file(*items)))
    with caplog.at_level(logging.WARNING, logger="telstate.rdb_reader"):
        assert list(reader) == [(b"kept", IMMUTABLE, b"v")]
    assert reader.skipped == {"list": 4, "set": 3, "stream": 3, "module": 1,
                              "empty zset": 1, "empty hash": 1}  # fmt: skip
    warnings = [r for r in caplog.records if r.name == "telstate.rdb_reader"]
    assert len(warnings) == 1
    assert "13 keys" in warnings[0].getMessage() and "4 list" in warnings[0].getMessage()


@pytest.mark.parametrize("rdb_type", [6, 8, 26, 200])
def test_unknown_types_are_errors(rdb_type: int) -> None:
    with pytest.raises(RdbParseError, match=f"unknown value type or opcode {rdb_type}"):
        parse(rdb_file(key(rdb_type, b"k", string(b"v"))))


def test_corrupt_blobs_are_errors() -> None:
    good = listpack([b"a", 0])
    for blob in (good[:-1] + b"\0", good[:4] + b"\x05\x00" + good[6:], b"\x08\0\0\0\0\0\xff"):
        with pytest.raises(RdbParseError, match="listpack"):
            parse(rdb_file(key(17, b"z", string(blob))))
    with pytest.raises(RdbParseError, match="without a score"):
        parse(rdb_file(key(17, b"z", string(listpack([b"a"])))))
    with pytest.raises(RdbParseError, match="invalid score"):
        parse(rdb_file(key(17, b"z", string(listpack([b"a", b"zero"])))))
    with pytest.raises(RdbParseError, match="ziplist"):
        parse(rdb_file(key(12, b"z", string(ziplist([b"a", 0])[:-2] + b"\xff"))))
    with pytest.raises(RdbParseError, match="LZF"):
        parse(rdb_file(key(0, b"k", b"\xc3" + length(3) + length(10) + b"\x05abc")))


# -- versions, checksums, inputs ----------------------------------------------------------


@pytest.mark.parametrize("version", range(1, 13))
def test_redis_versions(version: int) -> None:
    data = rdb_file(key(0, b"k", string(b"v")), version=version)
    assert parse(data) == [(b"k", IMMUTABLE, b"v")]
    if version < 5:
        # No checksum in these versions: anything after EOF is an error.
        with pytest.raises(RdbParseError, match="after the end"):
            parse(data + bytes(8))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"REDIS0000\xff", "unsupported RDB version 0 for magic REDIS"),
        (b"REDIS0013\xff", "unsupported RDB version 13 for magic REDIS"),
        (b"VALKEY079\xff", "unsupported RDB version 79 for magic VALKEY"),
        (b"VALKEY081\xff", "unsupported RDB version 81 for magic VALKEY"),
        (b"REDIX0009\xff", "not an RDB file"),
        (b"REDIS00x9\xff", "not an RDB file"),
        (b"REDIS0009", "truncated"),
        (b"REDIS", "truncated"),
        (b"", "truncated"),
    ],
)
def test_bad_headers(data: bytes, message: str) -> None:
    with pytest.raises(RdbParseError, match=message):
        parse(data)


def test_checksums(tmp_path) -> None:
    item = key(0, b"k", string(b"v"))
    for checksum in ("good", "zero"):
        assert parse(rdb_file(item, checksum=checksum)) == [(b"k", IMMUTABLE, b"v")]
    bad = rdb_file(item, checksum="bad")
    with pytest.raises(RdbParseError, match="checksum mismatch"):
        parse(bad)
    path = tmp_path / "bad.rdb"
    path.write_bytes(bad)
    with pytest.raises(RdbParseError, match="checksum mismatch") as info:
        list(read_records(path))
    assert info.value.filename == path and "bad.rdb" in str(info.value)


def test_truncated_and_trailing_data() -> None:
    data = rdb_file(key(0, b"k", string(b"value")))
    with pytest.raises(RdbParseError, match="truncated"):
        parse(data[:-3])
    with pytest.raises(RdbParseError, match="after the end"):
        parse(data + b"\0")
    with pytest.raises(RdbParseError, match=r"truncated .*offset 9\)"):
        parse(data[:14])


class TrickleStream(io.RawIOBase):
    """A non-seekable stream that returns at most a few bytes per read, like a socket."""

    def __init__(self, data: bytes, step: int = 3) -> None:
        self._data = memoryview(data)
        self._step = step
        self.reads = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        self.reads += 1
        n = min(len(buffer), self._step, len(self._data))
        buffer[:n] = self._data[:n]
        self._data = self._data[n:]
        return n


def sample_file(checksum: str = "good") -> bytes:
    return rdb_file(
        aux(b"telstate-seq", b"42"),
        key(0, b"attr", lzf_string(b"value " * 40)),
        key(3, b"sensor", zset_text([ts(float(i), b"v%d" % i) for i in range(200)])),
        key(16, b"indexed", string(listpack([b"a", 1, b"b", b"x" * 70]))),
        checksum=checksum,
    )


def expected_sample() -> list:
    return [
        (b"attr", IMMUTABLE, b"value " * 40),
        (b"sensor", MUTABLE, sorted(ts(float(i), b"v%d" % i) for i in range(200))),
        (b"indexed", INDEXED, {b"a": b"1", b"b": b"x" * 70}),
    ]


def test_inputs(tmp_path) -> None:
    data = sample_file()
    path = tmp_path / "sample.rdb"
    path.write_bytes(data)
    expected = expected_sample()
    for file in (str(path), os.fsencode(path), pathlib.Path(path)):
        assert list(read_records(file)) == expected
    with open(path, "rb") as f:
        assert list(read_records(f)) == expected
        assert not f.closed
    stream = TrickleStream(data)
    assert not stream.seekable()
    assert list(read_records(stream)) == expected
    assert stream.reads > 100


def test_backend_load_from_file_interface(tmp_path) -> None:
    """The reader fits Backend.load_from_file, which the backends use."""
    from telstate.memory import MemoryBackend

    backend = MemoryBackend()
    assert backend.load_from_file(io.BytesIO(sample_file())) == 3
    assert backend.get(b"attr") == (b"value " * 40, None)
    assert backend.get_indexed(b"indexed", b"b") == b"x" * 70


@pytest.mark.parametrize("chunk", [1, 2, 7, 64, 1000])
def test_tiny_chunks_give_the_same_records(monkeypatch, chunk: int) -> None:
    # Every item then straddles refills, which exercises re-parsing.
    monkeypatch.setattr(rdb_reader, "_CHUNK_SIZE", chunk)
    assert parse(sample_file()) == expected_sample()
    with pytest.raises(RdbParseError, match="checksum"):
        parse(sample_file("bad"))


def test_read_aux(tmp_path) -> None:
    data = rdb_file(aux(b"telstate-store-uuid", b"abc"), aux(b"telstate-seq", b"7"))
    expected = {b"telstate-store-uuid": b"abc", b"telstate-seq": b"7"}
    assert read_aux(io.BytesIO(data)) == expected
    # Only the beginning is read: the rest may even be missing.
    cut = data[: data.index(b"7") + 1] + b"\x00"
    assert read_aux(TrickleStream(cut)) == expected
    path = tmp_path / "aux.rdb"
    path.write_bytes(sample_file())
    assert read_aux(path) == {b"telstate-seq": b"42"}
    with RdbReader(path) as reader:
        assert reader.read_aux() == {b"telstate-seq": b"42"}
        assert list(reader) == expected_sample()
    with pytest.raises(RdbParseError, match="truncated"):
        read_aux(io.BytesIO(data[:20]))


def test_claimed_lengths_fail_fast(tmp_path) -> None:
    huge_string = key(0, b"k", length(2**32 - 1) + b"x" * 100)
    huge_lzf = key(0, b"k", b"\xc3" + length(10) + length(2**40) + b"x" * 10)
    huge_count = key(3, b"z", length(2**62, 64) + string(b"a") + b"\x010")
    path = tmp_path / "huge.rdb"
    for item in (huge_string, huge_lzf, huge_count):
        data = rdb_file(item)
        path.write_bytes(data)
        for source in (io.BytesIO(data), TrickleStream(data, 100), path):
            start = time.perf_counter()
            with pytest.raises(RdbParseError):
                list(read_records(source))
            assert time.perf_counter() - start < 1


# -- katsdptelstate's callback API -----------------------------------------------------


# Packed sample timestamps (members must have them to load into a backend).
_A, _C = struct.pack(">d", 1.0), struct.pack(">d", 2.0)


def _written(tmp_path: pathlib.Path) -> pathlib.Path:
    from telstate.rdb_writer import RDBWriter

    path = tmp_path / "callback.rdb"
    with RDBWriter(path) as writer:
        writer.write_record(b"attr", IMMUTABLE, b"value")
        writer.write_record(b"sensor", MUTABLE, [_A + b"b", _A + b"a", _C + b"c"])
        writer.write_record(b"indexed", INDEXED, {b"f1": b"v1", b"f2": b"v2"})
    return path


class RecordingCallback(rdb_reader.BackendCallback):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def set(self, *args) -> None:
        self.calls.append(("set", *args))
        self.n_keys += 1

    def start_sorted_set(self, *args) -> None:
        self.calls.append(("start_sorted_set", *args))
        self.n_keys += 1

    def zadd(self, *args) -> None:
        self.calls.append(("zadd", *args))

    def end_sorted_set(self, *args) -> None:
        self.calls.append(("end_sorted_set", *args))

    def start_hash(self, *args) -> None:
        self.calls.append(("start_hash", *args))
        self.n_keys += 1

    def hset(self, *args) -> None:
        self.calls.append(("hset", *args))

    def end_hash(self, *args) -> None:
        self.calls.append(("end_hash", *args))


def test_load_from_file_calls_back_in_rdbtools_order(tmp_path) -> None:
    callback = RecordingCallback()
    assert rdb_reader.load_from_file(callback, _written(tmp_path)) == 3
    assert callback.calls == [
        ("set", b"attr", b"value", None, {}),
        ("start_sorted_set", b"sensor", 3, None, {}),
        ("zadd", b"sensor", 0.0, _A + b"a"),
        ("zadd", b"sensor", 0.0, _A + b"b"),
        ("zadd", b"sensor", 0.0, _C + b"c"),
        ("end_sorted_set", b"sensor"),
        ("start_hash", b"indexed", 2, None, {}),
        ("hset", b"indexed", b"f1", b"v1"),
        ("hset", b"indexed", b"f2", b"v2"),
        ("end_hash", b"indexed"),
    ]
    # The base class stores nothing and counts nothing.
    assert rdb_reader.load_from_file(rdb_reader.BackendCallback(), _written(tmp_path)) == 0


def test_memory_callback_fills_the_memory_backend_layout(tmp_path) -> None:
    from telstate.memory import MemoryBackend, MemoryCallback

    path = _written(tmp_path)
    data: dict = {}
    with open(path, "rb") as file:
        assert rdb_reader.load_from_file(MemoryCallback(data), file) == 3
    backend = MemoryBackend()
    backend.load_from_file(path)
    assert data == dict((key, value) for key, _, value in backend.records())


def test_load_from_file_errors(tmp_path) -> None:
    path = _written(tmp_path)

    class Refusing(rdb_reader.BackendCallback):
        def start_hash(self, *args) -> None:
            raise LookupError("callback's own error")

    with pytest.raises(LookupError, match="own error"):
        rdb_reader.load_from_file(Refusing(), path)
    with pytest.raises(RdbParseError):
        rdb_reader.load_from_file(RecordingCallback(), io.BytesIO(path.read_bytes()[1:]))
    with pytest.raises(OSError):
        rdb_reader.load_from_file(RecordingCallback(), tmp_path / "missing.rdb")


def count_refills(monkeypatch) -> list[int]:
    """Record the bytes each refill of a regular file asks the buffer to hold."""
    requested: list[int] = []
    refill = RdbReader._refill_regular_file

    def counting(self: RdbReader, available: int, fresh: int) -> None:
        requested.append(available + fresh)
        refill(self, available, fresh)

    monkeypatch.setattr(RdbReader, "_refill_regular_file", counting)
    return requested


@pytest.mark.parametrize("sizes", ["even", "shrinking"])
def test_a_zset_bigger_than_the_buffer_is_read_about_once(tmp_path, monkeypatch, sizes) -> None:
    """The reader guesses a big zset's end from its first members (right or wrong), reads a
    regular file up to there at once, and frees the big buffer once the zset is parsed."""
    from telstate.rdb_writer import RDBWriter

    monkeypatch.setattr(rdb_reader, "_CHUNK_SIZE", 64 << 10)
    lengths = [4000 + i % 7 for i in range(400)]
    if sizes == "shrinking":
        lengths = [8000 - 19 * i for i in range(400)]  # the guess overshoots the end of the file
    members = sorted(struct.pack(">d", i) + b"v" * length for i, length in enumerate(lengths))
    path = tmp_path / "big.rdb"
    with RDBWriter(path) as writer:
        writer.write_record(b"arrays", KeyType.MUTABLE, members)
        writer.write_record(b"after", KeyType.IMMUTABLE, b"x")
    requested = count_refills(monkeypatch)
    with RdbReader(path) as reader:
        records = reader.records()
        assert next(records) == (b"arrays", KeyType.MUTABLE, members)
        assert len(reader._buf) < 64 << 10  # the zset's bytes are freed
        assert list(records) == [(b"after", KeyType.IMMUTABLE, b"x")]
    size = path.stat().st_size
    assert size > 20 * (64 << 10)
    # Doubling alone would read 64 KiB, 128 KiB, ... 2 MiB: six reads, 2.5 times the
    # file. A guessed read grows the buffer at most fivefold (the header may lie), so
    # a guess that stops just short of the end costs one read more.
    assert len(requested) <= 4
    assert sum(requested) < (1.3 if sizes == "even" else 2.3) * size


@pytest.mark.parametrize("count", [41, 10**9])
def test_a_zset_whose_count_lies_is_not_read_ahead_to_the_end_of_the_file(
    tmp_path, monkeypatch, count
) -> None:
    """The guessed end of a zset comes from its count: memory must follow the data, not it."""
    monkeypatch.setattr(rdb_reader, "_CHUNK_SIZE", 64 << 10)
    members = [struct.pack(">d", i) + b"v" * 4000 for i in range(40)]
    body = length(count) + zset_binary(members)[len(length(40)) :]
    path = tmp_path / "lying.rdb"
    # After the 40 members, a bad string encoding, then 8 MB the count claims.
    path.write_bytes(rdb_file(key(5, b"z", body + b"\xc5" + bytes(8 << 20))))
    requested = count_refills(monkeypatch)
    with pytest.raises(RdbParseError):
        with RdbReader(path) as reader:
            list(reader.records())
    assert max(requested) < 1 << 20  # the zset's 160 KB, grown at most fivefold
