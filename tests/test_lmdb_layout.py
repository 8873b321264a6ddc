"""The record codecs of the LMDB store: key records, and remote writes' request records."""

import threading

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from telstate.lmdb.layout import (
    FLAG_LONG_NAME,
    FLAG_LONG_VALUES,
    IMMUTABLE,
    INLINE_LIMIT,
    MUTABLE,
    KeyRecord,
    RequestRecord,
    record_name,
)


@given(
    type_code=st.sampled_from([1, 2, 3]),
    key_id=st.binary(min_size=8, max_size=8),
    key=st.binary(max_size=2 * INLINE_LIMIT),
    value=st.binary(max_size=64),
    long_values=st.booleans(),
    sealed=st.floats(allow_nan=False),
)
def test_key_record_round_trip(type_code, key_id, key, value, long_values, sealed):
    record = KeyRecord.new(type_code, key_id, key, value)
    if long_values:
        record = record._replace(flags=record.flags | FLAG_LONG_VALUES)
    record = record._replace(sealed=sealed)
    data = record.encode()
    assert KeyRecord.decode(data) == record
    assert KeyRecord.decode(memoryview(data)) == record
    assert KeyRecord.type_of(data) == record.key_type
    long_name = len(key) >= INLINE_LIMIT
    assert bool(record.flags & FLAG_LONG_NAME) == long_name
    assert record.name == (key if long_name else None)
    name_key = b"\x01" + (key if not long_name else bytes(INLINE_LIMIT))
    assert record_name(name_key, data) == key


def test_key_record_bytes():
    """The layout documented in telstate.lmdb.layout, byte for byte."""
    data = KeyRecord.new(MUTABLE, bytes.fromhex("0000000000000007"), b"k").encode()
    assert data == bytes.fromhex("02 0000000000000007 00 bff0000000000000")
    data = KeyRecord.new(IMMUTABLE, bytes(8), b"k", b"value").encode()
    assert data[18:] == b"value" and data[9] == 0


request_records = st.builds(
    RequestRecord,
    st.integers(min_value=0, max_value=2**64 - 1),
    st.integers(min_value=0, max_value=2**64 - 1),
    st.sampled_from([b"ok", b"exists", b"error"]),
    st.binary(max_size=300),
    st.sampled_from([b"", b"immutable", b"expired"]),
    st.text(max_size=300),
)


@given(st.lists(request_records, max_size=5))
def test_a_request_record_is_a_msgpack_array_of_its_fields(records):
    # The stored format: what older telstate wrote with msgpack.packb, and decodes.
    for record in records:
        data = record.encode()
        assert data == msgpack.packb(list(record), use_bin_type=True)
        assert RequestRecord.decode(data) == record


def test_request_records_encode_alike_in_threads():
    records = [
        RequestRecord(i, i * 7, b"ok", b"v" * (i % 50), b"", "m" * (i % 30)) for i in range(2000)
    ]
    expected = [msgpack.packb(list(record), use_bin_type=True) for record in records]
    found: list[list[bytes]] = [[] for _ in range(4)]

    def encode_all(out: list[bytes]) -> None:
        out.extend(record.encode() for record in records)

    threads = [threading.Thread(target=encode_all, args=(out,)) for out in found]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert found == [expected] * 4


def test_import_records_of_files_keep_their_layout_and_streams_have_a_nonce():
    """A record written before nonces existed is found by the import that completes it."""
    from telstate.errors import StoreError
    from telstate.lmdb.layout import ImportRecord

    record = ImportRecord("/data/a.rdb", 10, 20)
    assert record.encode() == msgpack.packb(("/data/a.rdb", 10, 20))
    assert ImportRecord.decode(record.encode()) == record
    stream = ImportRecord("<stream>", None, None, "00ff")
    assert ImportRecord.decode(stream.encode()) == stream
    assert stream.entry != ImportRecord("<stream>", None, None, "0100").entry
    with pytest.raises(StoreError, match="damaged import record"):
        ImportRecord.decode(msgpack.packb(("<stream>", None, None, "00", "extra")))
