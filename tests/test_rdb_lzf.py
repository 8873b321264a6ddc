"""The LZF codec: pure Python against the C extension, and corrupt input."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from telstate import lzf

c_lzf = pytest.importorskip("lzf")

SAMPLES = [
    b"",
    b"a",
    b"abc",
    b"a" * 1000,
    b"abcabcabd" * 50,
    os.urandom(300),
    b"".join(b"%d," % i for i in range(5000)),
    bytes(range(256)) * 40,
]

# Mostly-repetitive data, which exercises back-references of every length and distance.
compressible = st.lists(
    st.one_of(st.binary(max_size=40), st.sampled_from([b"x" * 300, b"sensor", bytes(64)])),
    max_size=60,
).map(b"".join)


@pytest.mark.parametrize("data", SAMPLES, ids=range(len(SAMPLES)))
def test_round_trip_both_ways(data: bytes) -> None:
    ours = lzf.compress_python(data)
    assert lzf.decompress_python(ours, len(data)) == data
    assert lzf.decompress(ours, len(data)) == data
    if data:
        assert c_lzf.decompress(ours, len(data)) == data
        theirs = c_lzf.compress(data, 2 * len(data) + 16)
        assert lzf.decompress_python(theirs, len(data)) == data


@given(compressible)
def test_pure_python_matches_c_extension(data: bytes) -> None:
    packed = c_lzf.compress(data, 2 * len(data) + 16) if data else b""
    assert lzf.decompress_python(packed, len(data)) == data
    assert lzf.decompress_python(lzf.compress_python(data), len(data)) == data


def test_compress_shrinks_repetitive_data() -> None:
    data = b"telescope state " * 1000
    assert len(lzf.compress_python(data)) < len(data) // 10
    assert len(lzf.compress(data)) < len(data) // 10


@pytest.mark.parametrize(
    ("packed", "length"),
    [
        (b"\x05abc", 6),  # literal run past the end of the input
        (b"\x00a\x20\x05", 4),  # back-reference before the start
        (b"\x00a\xe0", 12),  # back-reference cut short
        (b"\x00a", 2),  # shorter than promised
        (b"\x01ab", 1),  # longer than promised
        (b"\x00a\xe0\xff\x00", 300),  # longer than promised, by a back-reference
        (b"\x00a", 1000),  # more than any input of this size can produce
        (b"", 1),
    ],
)
@pytest.mark.parametrize("decompress", [lzf.decompress, lzf.decompress_python])
def test_corrupt_input(decompress, packed: bytes, length: int) -> None:
    with pytest.raises(lzf.LzfError):
        decompress(packed, length)


@given(st.binary(max_size=200), st.integers(0, 20000))
def test_random_input_only_raises_lzf_error(packed: bytes, length: int) -> None:
    for decompress in (lzf.decompress, lzf.decompress_python):
        try:
            result = decompress(packed, length)
        except lzf.LzfError:
            continue
        assert len(result) == length


def test_claimed_length_is_not_allocated() -> None:
    # 2 GB from 3 bytes is impossible: refused before any allocation.
    with pytest.raises(lzf.LzfError, match="cannot expand"):
        lzf.decompress(b"\x00a\x00", 2**31)
