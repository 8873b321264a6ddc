"""Loading RDB files into the in-memory backend, where uniform zsets stay packed.

MemoryBackend.load_from_file keeps a mutable key whose members all have one
length as PackedMembers; everything it answers must be what the same key
answers when it is loaded as a list (the general path), before and after
further writes, and what katsdptelstate answers for the same file.
"""

from __future__ import annotations

import bisect
import io
import struct

import katsdptelstate
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import telstate
from telstate import rdb_reader
from telstate.backend import PackedMembers
from telstate.errors import ImmutableKeyError, RdbParseError
from telstate.memory import MemoryBackend
from telstate.rdb_reader import read_records
from telstate.utils import KeyType, pack_timestamp

from .test_rdb_reader import (
    expected_sample,
    key,
    rdb_file,
    sample_file,
    string,
    zset_binary,
    zset_text,
)


def members_of(size: int, count: int, seed: int = 0) -> list[bytes]:
    """`count` distinct members of `size` bytes: packed timestamp + value bytes."""
    return [
        pack_timestamp(1000.0 + i) + bytes((i * 7 + seed + j) % 256 for j in range(size - 8))
        for i in range(count)
    ]


# -- PackedMembers -------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["sorted", "reversed", "shuffled", "repeated"])
def test_packed_members_are_in_zset_order(order: str) -> None:
    members = members_of(18, 100)
    given_order = {
        "sorted": members,
        "reversed": members[::-1],
        "shuffled": members[1::2] + members[::2],
        "repeated": members + members[::3],
    }[order]
    packed = PackedMembers.from_buffer(b"".join(given_order), 18)
    assert len(packed) == 100
    assert list(packed) == members


def test_packed_members_behave_as_a_list() -> None:
    members = members_of(12, 50) + [bytes(11) + b"\x01", bytes(12)]
    members.sort()
    packed = PackedMembers.from_buffer(b"".join(reversed(members)), 12)
    for index in (0, 1, 49, 51, -1, -52):
        assert packed[index] == members[index]
    for index in (52, -53):
        with pytest.raises(IndexError):
            packed[index]
    for cut in (slice(None), slice(3, 9), slice(-5, None), slice(10, 2), slice(None, None, -3)):
        assert packed[cut] == members[cut]
    for probe in (b"", bytes(12), members[20], members[20] + b"\x00", b"\xff" * 13):
        assert bisect.bisect_left(packed, probe) == bisect.bisect_left(members, probe)
    assert list(PackedMembers.from_buffer(b"", 12)) == []


@pytest.mark.parametrize(("size", "length"), [(0, 0), (-1, 4), (5, 12)])
def test_packed_members_refuse_a_buffer_that_does_not_divide(size: int, length: int) -> None:
    with pytest.raises(ValueError, match="not members"):
        PackedMembers.from_buffer(bytes(length), size)


# -- the backend -------------------------------------------------------------------------


def load_both(data: bytes) -> tuple[MemoryBackend, MemoryBackend]:
    """The file loaded packed (load_from_file) and as lists (the general reader)."""
    packed = MemoryBackend()
    packed.load_from_file(io.BytesIO(data))
    plain = MemoryBackend()
    plain.load_records(read_records(io.BytesIO(data)))
    return packed, plain


def assert_same(packed: MemoryBackend, plain: MemoryBackend, bounds: list[float]) -> None:
    assert list(packed.records()) == list(plain.records())
    for name in plain.keys(b"*"):
        assert packed.key_type(name) == plain.key_type(name)
        assert packed.get(name) == plain.get(name)
        if plain.key_type(name) != KeyType.MUTABLE:
            continue
        for start in bounds:
            for end in bounds:
                for previous in (False, True):
                    for include_end in (False, True):
                        args = (name, start, end, previous, include_end)
                        assert packed.get_range(*args) == plain.get_range(*args), args


def test_uniform_zsets_are_kept_packed() -> None:
    uniform = members_of(18, 500)
    mixed = uniform[:100] + [pack_timestamp(5000.0) + b"odd"]
    data = rdb_file(
        key(3, b"text", zset_text(uniform)),
        key(5, b"binary", zset_binary(uniform[::-1])),
        key(3, b"mixed", zset_text(mixed)),
        key(3, b"nonzero", zset_text(uniform[:50], [b"\x011"] + [b"\x010"] * 49)),
        key(0, b"attr", string(b"value")),
    )
    packed, plain = load_both(data)
    assert isinstance(packed._data[b"text"], PackedMembers)
    assert isinstance(packed._data[b"binary"], PackedMembers)
    assert isinstance(packed._data[b"mixed"], list)
    assert isinstance(packed._data[b"nonzero"], list)
    assert_same(packed, plain, [0.0, 999.0, 1000.0, 1200.5, 1499.0, 1e9])


def test_writes_to_a_packed_key_behave_as_on_a_list() -> None:
    data = rdb_file(key(3, b"sensor", zset_text(members_of(18, 200))))
    packed, plain = load_both(data)
    for backend in (packed, plain):
        with pytest.raises(ImmutableKeyError):
            backend.set_immutable(b"sensor", b"x")
        with pytest.raises(ImmutableKeyError):
            backend.set_indexed(b"sensor", b"s", b"x")
        with pytest.raises(ImmutableKeyError):
            backend.get_indexed(b"sensor", b"s")
        backend.add_mutable(b"sensor", b"late", 1050.5)
        backend.add_mutable(b"sensor", b"new", 2000.0)
        backend.add_mutable(b"sensor", members_of(18, 3)[2][8:], 1002.0)  # already there
    assert_same(packed, plain, [0.0, 1050.5, 1100.0, 2000.0, 3000.0])
    packed.delete(b"sensor")
    assert packed.get(b"sensor") == (None, None)


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(9, 40),
    stamps=st.lists(st.integers(0, 300), min_size=32, max_size=150),
    binary=st.booleans(),
    data=st.data(),
)
def test_packed_loads_answer_as_list_loads(size, stamps, binary, data) -> None:
    members = [pack_timestamp(float(s)) + bytes([s % 7]) * (size - 8) for s in stamps]
    writer = zset_binary if binary else zset_text
    packed, plain = load_both(rdb_file(key(5 if binary else 3, b"k", writer(members))))
    assert isinstance(packed._data[b"k"], PackedMembers)
    bounds = data.draw(st.lists(st.floats(-1, 400, allow_nan=False), min_size=1, max_size=4))
    assert_same(packed, plain, bounds)
    value = data.draw(st.binary(max_size=12))
    stamp = float(data.draw(st.integers(0, 300)))
    packed.add_mutable(b"k", value, stamp)
    plain.add_mutable(b"k", value, stamp)
    assert_same(packed, plain, bounds)


def test_packed_load_matches_katsdptelstate(tmp_path) -> None:
    """The state of a file with float sensors, read back through the frontends of both."""
    sensors = {
        f"m{a:03d}_pos_actual_scan_azim": [
            pack_timestamp(1e9 + 2 * i) + b"\xff\xcb" + struct.pack(">d", a + i / 3)
            for i in range(300)
        ]
        for a in range(3)
    }
    path = tmp_path / "dump.rdb"
    path.write_bytes(
        rdb_file(
            *(
                key(3 if i % 2 else 5, name.encode(), (zset_text if i % 2 else zset_binary)(m))
                for i, (name, m) in enumerate(sensors.items())
            ),
            version=9,
            checksum="zero",
        )
    )
    ours = telstate.TelescopeState()
    theirs = katsdptelstate.TelescopeState()
    assert ours.load_from_file(str(path)) == theirs.load_from_file(str(path)) == 3
    for name in sensors:
        assert ours.get_range(name, st=0) == theirs.get_range(name, st=0)
        assert ours.get_range(name, st=1e9 + 100, et=1e9 + 200, include_previous=True) == (
            theirs.get_range(name, st=1e9 + 100, et=1e9 + 200, include_previous=True)
        )
        assert ours[name] == theirs[name]


# -- regular files, re-read rather than joined when an item outgrows the buffer ----------


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000, 1 << 20])
def test_regular_files_in_small_chunks(monkeypatch, tmp_path, chunk: int) -> None:
    monkeypatch.setattr(rdb_reader, "_CHUNK_SIZE", chunk)
    uniform = members_of(18, 300)
    arrays = [pack_timestamp(1000.0 + i) + bytes([i]) * 3000 for i in range(40)]
    data = sample_file()
    big = rdb_file(
        key(3, b"uniform", zset_text(uniform)),
        key(5, b"arrays", zset_binary(arrays[::-1])),
        key(0, b"attr", string(b"x" * 5000)),
    )
    for content, expected in ((data, expected_sample()), (big, None)):
        path = tmp_path / "file.rdb"
        path.write_bytes(content)
        records = list(read_records(path))
        assert records == (expected or list(read_records(io.BytesIO(content))))
        packed, plain = load_both(content)
        from_path = MemoryBackend()
        from_path.load_from_file(str(path))
        assert list(from_path.records()) == list(plain.records())
    # A file object that is not at its start: the reader starts where it is.
    path.write_bytes(b"junk" + big)
    with open(path, "rb") as file:
        file.read(4)
        assert list(read_records(file)) == list(read_records(io.BytesIO(big)))
    # Truncated anywhere: an error, never fewer keys.
    for cut in (len(big) // 3, len(big) - 9, len(big) - 1):
        path.write_bytes(big[:cut])
        with pytest.raises(RdbParseError):
            list(read_records(path))
