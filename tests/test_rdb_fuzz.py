"""Corrupt RDB input gives RdbParseError and nothing else: no other exception, no hang,
no allocation beyond a small multiple of the input."""

from __future__ import annotations

import io
import time
import tracemalloc
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from telstate import rdb_reader
from telstate.errors import RdbParseError
from telstate.rdb_reader import RdbReader

from .test_rdb_reader import (
    SKIPPED,
    TrickleStream,
    aux,
    int_string,
    key,
    length,
    listpack,
    lzf_string,
    rdb_file,
    string,
    ts,
    ziplist,
    zipmap,
    zset_binary,
    zset_text,
)


def seed_items() -> list[bytes]:
    """One item of every kind the reader knows, kept small so that mutations hit them all."""
    members = [ts(float(i), b"m%d" % (i % 3)) for i in range(40)]
    items = [
        aux(b"redis-ver", b"7.2.0"),
        b"\xfe" + length(0) + b"\xfb" + length(3) + length(0),
        key(0, b"s", string(b"abc")),
        key(0, int_string(7), int_string(-300)),
        key(0, b"lzf", lzf_string(b"abcd" * 20)),
        b"\xfc" + bytes(8) + key(3, b"z3", zset_text(members)),
        key(5, b"z5", zset_binary(members[:5], [0.0, 1.0, 0.0, -2.0, 0.0])),
        key(12, b"z12", string(ziplist([b"a", 0, b"b", 1]))),
        key(17, b"z17", string(listpack([b"a", 0, 300, b"2.5"]))),
        key(4, b"h4", length(2) + string(b"f") + string(b"v") + int_string(5) + string(b"")),
        key(9, b"h9", string(zipmap([(b"f", b"v"), (b"g", b"w" * 10)], free=1))),
        key(13, b"h13", string(ziplist([b"f", 70000, b"g", b"v"]))),
        key(16, b"h16", string(listpack([b"f", -5, b"g", b"x" * 70]))),
        key(24, b"h24", bytes(8) + length(1) + length(0) + string(b"f") + string(b"v")),
        key(25, b"h25", bytes(8) + string(listpack([b"f", b"v", 0]))),
        b"\xf8" + length(5) + b"\xf9\x01",
    ]
    items += [key(rdb_type, b"x", value) for rdb_type, value, _ in SKIPPED]
    return items


SEED = rdb_file(*seed_items(), version=12, checksum="zero")
SEED_CHECKED = rdb_file(*seed_items(), version=12)
VALKEY_SEED = rdb_file(
    key(22, b"h", length(1) + string(b"f") + string(b"v") + bytes(8)),
    b"\xf3" + string(b"job") + length(1) + length(0) + length(5),
    magic=b"VALKEY",
    version=80,
    checksum="zero",
)
SEEDS = [SEED, SEED_CHECKED, VALKEY_SEED]


def check(data: bytes, chunk: int = 16 << 20, trickle: bool = False) -> None:
    """Parse `data` to the end: it must work or raise RdbParseError, within a second."""
    source = TrickleStream(data, 97) if trickle else io.BytesIO(data)
    start = time.perf_counter()
    with mock.patch.object(rdb_reader, "_CHUNK_SIZE", chunk):
        try:
            for _ in RdbReader(source):
                pass
        except RdbParseError:
            pass
    assert time.perf_counter() - start < 1.0


def test_seeds_are_valid() -> None:
    for seed in SEEDS:
        reader = RdbReader(io.BytesIO(seed))
        assert len(list(reader)) > 10 or seed is VALKEY_SEED
        assert not reader.skipped or sum(reader.skipped.values()) == len(SKIPPED)


seeds = st.sampled_from(SEEDS)
chunks = st.sampled_from([1, 3, 64, 16 << 20])


@given(seeds, st.data(), chunks)
def test_truncation(seed: bytes, data, chunk: int) -> None:
    cut = data.draw(st.integers(0, len(seed) - 1))
    with pytest.raises(RdbParseError):
        with mock.patch.object(rdb_reader, "_CHUNK_SIZE", chunk):
            list(RdbReader(io.BytesIO(seed[:cut])))


@given(seeds, st.data(), chunks, st.booleans())
def test_bit_flips(seed: bytes, data, chunk: int, trickle: bool) -> None:
    corrupt = bytearray(seed)
    for _ in range(data.draw(st.integers(1, 4))):
        corrupt[data.draw(st.integers(0, len(seed) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    check(bytes(corrupt), chunk, trickle)


@given(seeds, st.data())
def test_byte_overwrites_and_insertions(seed: bytes, data) -> None:
    corrupt = bytearray(seed)
    for _ in range(data.draw(st.integers(1, 3))):
        pos = data.draw(st.integers(0, len(corrupt) - 1))
        junk = data.draw(st.binary(min_size=1, max_size=9))
        if data.draw(st.booleans()):
            corrupt[pos : pos + len(junk)] = junk
        else:
            corrupt[pos:pos] = junk
    check(bytes(corrupt))


@given(st.sampled_from([b"", b"REDIS0009", b"REDIS0011\xfe\x00", b"VALKEY080"]), st.binary())
def test_random_bytes(prefix: bytes, junk: bytes) -> None:
    check(prefix + junk)


def peak_memory(data: bytes) -> int:
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    try:
        for _ in RdbReader(io.BytesIO(data)):
            pass
    except RdbParseError:
        pass
    return tracemalloc.get_traced_memory()[1] - before


@pytest.fixture(scope="module")
def traced():
    # Warm up the lazily built tables first, so that they do not count.
    peak_memory(SEED_CHECKED)
    tracemalloc.start()
    yield
    tracemalloc.stop()


# The parsed records themselves are Python objects worth several times the
# bytes they came from; on top of that only a fixed amount is allowed.
MEMORY_FACTOR = 40
MEMORY_ALLOWANCE = 256 * 1024


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seeds, st.data())
def test_memory_stays_bounded(traced, seed: bytes, data) -> None:
    corrupt = bytearray(seed)
    for _ in range(data.draw(st.integers(1, 4))):
        corrupt[data.draw(st.integers(0, len(seed) - 1))] = data.draw(st.integers(0, 255))
    assert peak_memory(bytes(corrupt)) < MEMORY_ALLOWANCE + MEMORY_FACTOR * len(corrupt)


@pytest.mark.parametrize(
    "item",
    [
        key(0, b"k", length(2**32 - 1)),
        key(0, b"k", length(2**63, 64)),
        key(0, b"k", b"\xc3" + length(2**31) + length(2**31)),
        key(0, b"k", b"\xc3" + length(3) + length(2**31) + b"\xe0\xff\x00"),
        key(3, b"z", length(2**63, 64) + string(b"a") + b"\x010" * 5),
        key(4, b"h", length(2**32 - 1) + string(b"")),
        key(12, b"z", string(b"\xff\xff\xff\x7f" + bytes(6) + b"\xff")),
        key(17, b"z", string(b"\xff\xff\xff\x7f" + bytes(2) + b"\xff")),
        key(15, b"s", length(2**40)),
        key(1, b"l", length(2**40) + string(b"")),
    ],
)
def test_huge_claims_allocate_nothing(traced, item: bytes) -> None:
    data = rdb_file(item, checksum="zero")
    assert peak_memory(data) < MEMORY_ALLOWANCE
