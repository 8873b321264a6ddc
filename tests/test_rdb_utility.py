"""RDB encoding helpers: CRC-64, lengths, ziplists and DUMP payloads that RESTORE accepts."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from telstate import rdb_utility
from telstate.rdb_reader import decode_dump
from telstate.rdb_utility import (
    crc64,
    crc64_before,
    crc64_shift,
    dump_hash,
    dump_iterable,
    dump_string,
    dump_zset,
    encode_len,
    encode_prev_length,
    encode_ziplist,
)
from telstate.utils import KeyType

from .servers import RedisServer, server_binaries


def reference_crc64(data: bytes, crc: int = 0) -> int:
    """CRC-64/Jones bit by bit, straight from its definition (reflected, no XORs)."""
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x95AC9329AC4BC9B5 if crc & 1 else 0)
    return crc


def test_crc64_check_value() -> None:
    # The check value Redis's crc64.c documents for this CRC.
    assert crc64(b"123456789") == 0xE9C6D914C4B8D9CA


@pytest.mark.parametrize(
    "size", [0, 1, 7, 8, 9, 1000, 32 * 1024 - 1, 32 * 1024, 32 * 1024 + 13, 3 << 20]
)
def test_crc64_matches_reference(size: int) -> None:
    data = os.urandom(size)
    reference = reference_crc64(data[:100_000]) if size > 100_000 else reference_crc64(data)
    if size > 100_000:
        # Continue the bit-by-bit reference with the (already checked) fast CRC of the rest.
        assert crc64(data[:100_000]) == reference
        reference = crc64(data[100_000:], reference)
        assert crc64(data[100_000:], crc64(data[:100_000])) == reference
    assert crc64(data) == reference
    assert crc64(memoryview(data)) == reference
    assert crc64(bytearray(data)) == reference


@given(st.binary(max_size=300), st.binary(max_size=300), st.integers(0, 1 << 40))
def test_crc64_of_a_concatenation_follows_from_the_parts_and_steps_back(
    first: bytes, second: bytes, zeros: int
) -> None:
    """What the writer uses to take a file's CRC from DUMP checksums without reading the bytes."""
    assert crc64(first + second) == crc64_shift(crc64(first), len(second)) ^ crc64(second)
    assert crc64_before(crc64(first + second), second) == crc64(first)
    if zeros <= 5000:
        assert crc64_shift(crc64(first), zeros) == crc64(bytes(zeros), crc64(first))
    # Shifting by a + b is shifting by a, then by b.
    half = zeros // 2
    assert crc64_shift(crc64(first), zeros) == crc64_shift(
        crc64_shift(crc64(first), half), zeros - half
    )


@given(st.binary(max_size=300), st.binary(max_size=300))
def test_crc64_continues(first: bytes, second: bytes) -> None:
    assert crc64(second, crc64(first)) == crc64(first + second) == reference_crc64(first + second)


def test_crc64_large_input_in_pieces() -> None:
    data = os.urandom((9 << 20) + 12345)
    whole = crc64(data)
    crc = 0
    for start in range(0, len(data), 3 << 20):
        crc = crc64(data[start : start + (3 << 20)], crc)
    assert crc == whole


@pytest.mark.parametrize(
    ("length", "encoded"),
    [
        (0, b"\x00"),
        (63, b"\x3f"),
        (64, b"\x40\x40"),
        (16383, b"\x7f\xff"),
        (16384, b"\x80\x00\x00\x40\x00"),
        (2**32 - 1, b"\x80\xff\xff\xff\xff"),
        (2**32, b"\x81\x00\x00\x00\x01\x00\x00\x00\x00"),
    ],
)
def test_encode_len(length: int, encoded: bytes) -> None:
    assert encode_len(length) == encoded


@pytest.mark.parametrize("length", [-1, 2**64])
def test_encode_len_out_of_range(length: int) -> None:
    with pytest.raises(ValueError):
        encode_len(length)


def test_encode_prev_length() -> None:
    assert encode_prev_length(253) == b"\xfd"
    assert encode_prev_length(254) == b"\xfe\xfe\x00\x00\x00"
    assert encode_prev_length(70000) == b"\xfe" + struct.pack("<I", 70000)
    with pytest.raises(ValueError):
        encode_prev_length(-1)


def test_encode_ziplist_layout() -> None:
    blob = encode_ziplist([b"ab", 0, 12, 13, b"x" * 300])
    size, tail, count = struct.unpack_from("<IIH", blob)
    assert size == len(blob) and count == 5 and blob[-1] == 0xFF
    # Entries: prev length, then encoding: 6-bit string, small ints in the
    # encoding byte, other ints as digits, a 14-bit string.
    assert blob[10:14] == b"\x00\x02ab"
    assert blob[14:16] == b"\x04\xf1"
    assert blob[16:18] == b"\x02\xfd"
    assert blob[18:22] == b"\x02\x0213"
    assert blob[tail : tail + 3] == b"\x04\x41\x2c"
    assert dump_iterable(b"<", b">", [b"a", b""]) == b"<\x01a\x00>"


def check_footer(payload: bytes) -> None:
    assert payload[-10:-8] == b"\x09\x00"
    assert int.from_bytes(payload[-8:], "little") == reference_crc64(payload[:-8])


SMALL_ZSET = [struct.pack(">d", 1.5) + b"a", struct.pack(">d", 2.0) + b""]
LARGE_ZSET = [struct.pack(">d", float(i)) + b"v" * (i % 70) for i in range(300)]
SMALL_HASH = {b"a": b"1", b"": b"", b"\x92": b"\xff" * 64}
LARGE_HASH = {b"f%d" % i: b"v" * i for i in range(200)}
PAYLOADS = {
    "string": (dump_string, b"hello"),
    "empty string": (dump_string, b""),
    "integer string": (dump_string, b"-123"),
    "long string": (dump_string, b"x" * 20000),
    "small zset": (dump_zset, SMALL_ZSET),
    "large zset": (dump_zset, LARGE_ZSET),
    "small hash": (dump_hash, SMALL_HASH),
    "large hash": (dump_hash, LARGE_HASH),
}


@pytest.mark.parametrize("name", PAYLOADS)
def test_dump_payloads_decode(name: str) -> None:
    dump, value = PAYLOADS[name]
    payload = dump(value)
    check_footer(payload)
    _, key_type, decoded = decode_dump(payload)
    expected_type = {dump_string: KeyType.IMMUTABLE, dump_zset: KeyType.MUTABLE}.get(
        dump, KeyType.INDEXED
    )
    assert key_type == expected_type
    assert decoded == (sorted(value) if isinstance(value, list) else value)


def test_dump_encodings() -> None:
    assert dump_zset(SMALL_ZSET)[0] == rdb_utility.RDB_TYPE_ZSET_ZIPLIST
    assert dump_zset(LARGE_ZSET)[0] == rdb_utility.RDB_TYPE_ZSET
    assert dump_hash(SMALL_HASH)[0] == rdb_utility.RDB_TYPE_HASH_ZIPLIST
    assert dump_hash(LARGE_HASH)[0] == rdb_utility.RDB_TYPE_HASH


@pytest.fixture(scope="module", params=sorted(server_binaries()))
def any_server(request):
    with RedisServer(server_binaries()[request.param]) as server:
        yield server


def test_restore_accepts_payloads(any_server) -> None:
    client = any_server.client()
    client.flushall()
    for name, (dump, value) in PAYLOADS.items():
        client.restore(name, 0, dump(value))
        if dump is dump_string:
            assert client.get(name) == value
        elif dump is dump_zset:
            assert client.zrange(name, 0, -1) == sorted(value)
            assert set(client.zrange(name, 0, -1, withscores=True)) == {(m, 0.0) for m in value}
        else:
            assert client.hgetall(name) == value
        # What the server dumps back decodes to the same value.
        assert decode_dump(client.dump(name))[2] == (
            sorted(value) if isinstance(value, list) else value
        )
    client.close()
