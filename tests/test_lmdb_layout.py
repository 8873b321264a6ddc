"""The key-record codec of the LMDB store's keys table."""

from hypothesis import given
from hypothesis import strategies as st

from telstate.lmdb.layout import (
    FLAG_LONG_NAME,
    FLAG_LONG_VALUES,
    IMMUTABLE,
    INLINE_LIMIT,
    MUTABLE,
    KeyRecord,
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
