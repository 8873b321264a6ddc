"""Tests for telstate.encoding.

The encoder must produce exactly katsdptelstate's bytes, both packages must
decode them to the same values, and decoding must be safe on hostile input.
"""

from __future__ import annotations

import collections
import enum
import io
import math
import os
import pickle
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import katsdptelstate.encoding as peer
import katsdptelstate.errors as peer_errors
import msgpack
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from telstate import encoding
from telstate.encoding import decode_value, encode_sub_key, encode_value
from telstate.errors import DecodeError, EncodeError
from telstate.utils import ensure_binary

# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def assert_same(actual: Any, expected: Any) -> None:
    """Assert that two decoded values are identical: same types, same bits.

    Floats are compared bit for bit (so NaN equals NaN and -0.0 differs from
    0.0); arrays by dtype, shape, memory layout and contents.
    """
    assert type(actual) is type(expected), (actual, expected)
    if isinstance(expected, np.ndarray):
        assert actual.dtype == expected.dtype
        assert actual.shape == expected.shape
        assert actual.flags.f_contiguous == expected.flags.f_contiguous
        assert actual.flags.c_contiguous == expected.flags.c_contiguous
        assert actual.tobytes() == expected.tobytes()
    elif isinstance(expected, np.generic):
        assert actual.dtype == expected.dtype
        assert actual.tobytes() == expected.tobytes()
    elif isinstance(expected, float):
        assert struct.pack(">d", actual) == struct.pack(">d", expected)
    elif isinstance(expected, complex):
        assert struct.pack(">dd", actual.real, actual.imag) == struct.pack(
            ">dd", expected.real, expected.imag
        )
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected)
        for actual_item, expected_item in zip(actual, expected):
            assert_same(actual_item, expected_item)
    elif isinstance(expected, dict):
        assert list(actual) == list(expected)
        for key in expected:
            assert_same(actual[key], expected[key])
    else:
        assert actual == expected


def as_stored(value: Any) -> Any:
    """Return what decoding `value` should give: arrays become C-ordered unless Fortran."""
    if isinstance(value, np.ndarray):
        array = np.asarray(value)
        fortran_order = array.flags.f_contiguous and not array.flags.c_contiguous
        return array.copy(order="F" if fortran_order else "C")
    if isinstance(value, list):
        return [as_stored(item) for item in value]
    if isinstance(value, tuple):
        return tuple(as_stored(item) for item in value)
    if isinstance(value, dict):
        return {key: as_stored(item) for key, item in value.items()}
    return value


def has_zero_sized_scalar(value: Any) -> bool:
    if isinstance(value, np.generic):
        return value.dtype.itemsize == 0
    if isinstance(value, (list, tuple)):
        return any(has_zero_sized_scalar(item) for item in value)
    if isinstance(value, dict):
        return any(has_zero_sized_scalar(item) for item in value.values())
    return False


def check_against_peer(value: Any) -> bytes:
    """Encode `value` with both packages and decode with both; return the encoding."""
    ours = encode_value(value)
    assert ours == peer.encode_value(value)
    decoded = decode_value(ours)
    assert_same(decoded, as_stored(value))
    try:
        assert_same(decoded, peer.decode_value(ours))
    except peer_errors.DecodeError:
        # katsdptelstate cannot read back the zero-sized numpy scalars it
        # writes, such as an empty string taken from a string array.
        assert has_zero_sized_scalar(value)
    return ours


def nest_tuples(depth: int) -> Any:
    value: Any = None
    for _ in range(depth):
        value = (value,)
    return value


def nested_tuple_encoding(depth: int) -> bytes:
    """Hand-build the msgpack of `depth` nested 1-tuples around None (ext32 framing)."""
    inner = b"\xc0"
    for _ in range(depth):
        body = b"\x91" + inner
        inner = b"\xc9" + struct.pack(">I", len(body)) + b"\x01" + body
    return b"\xff" + inner


def npy_file(header: str | bytes, data: bytes = b"", version: bytes = b"\x01\x00") -> bytes:
    raw = header.encode("latin1") if isinstance(header, str) else header
    length = struct.pack("<H" if version == b"\x01\x00" else "<I", len(raw))
    return b"\x93NUMPY" + version + length + raw + data


def as_ext(code: int, payload: bytes) -> bytes:
    return b"\xff" + msgpack.packb(msgpack.ExtType(code, payload))


def assert_rejected_cheaply(value: bytes, max_bytes: int = 1 << 20) -> DecodeError:
    """Decode hostile `value`: DecodeError, within 0.5 s and `max_bytes` of allocation."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(DecodeError) as excinfo:
            decode_value(value)
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 0.5
    assert peak < max_bytes
    return excinfo.value


# ---------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------

ENDIAN = "?"
SCALAR_DTYPES = st.one_of(
    hnp.boolean_dtypes(),
    hnp.integer_dtypes(endianness=ENDIAN),
    hnp.unsigned_integer_dtypes(endianness=ENDIAN),
    hnp.floating_dtypes(endianness=ENDIAN),
    hnp.complex_number_dtypes(endianness=ENDIAN),
    hnp.byte_string_dtypes(endianness=ENDIAN, max_len=4),
    hnp.unicode_string_dtypes(endianness=ENDIAN, max_len=4),
    hnp.datetime64_dtypes(endianness=ENDIAN),
    hnp.timedelta64_dtypes(endianness=ENDIAN),
)
DTYPES = st.one_of(
    SCALAR_DTYPES,
    hnp.array_dtypes(SCALAR_DTYPES, min_size=1, max_size=3),
    hnp.nested_dtypes(SCALAR_DTYPES, max_leaves=4),
)


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray:
    """Arrays of many dtypes and shapes, C-ordered, Fortran-ordered or strided."""
    array = draw(
        hnp.arrays(
            DTYPES,
            hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
        )
    )
    layout = draw(st.sampled_from(["C", "F", "strided", "reversed"]))
    if layout == "F":
        return np.asfortranarray(array)
    if layout == "strided" and array.ndim:
        return array[::2]
    if layout == "reversed" and array.ndim:
        return array[::-1]
    return array


def numpy_scalars() -> st.SearchStrategy[np.generic]:
    # A subarray dtype gives a 0-d request a shape of its own; take its first item.
    return (
        hnp.arrays(DTYPES, ()).filter(lambda array: array.size > 0).map(lambda a: a.reshape(-1)[0])
    )


def is_hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(),
    st.complex_numbers(),
    st.text(),
    st.binary(),
    numpy_scalars(),
    arrays(),
)
KEYS = st.one_of(st.text(max_size=8), st.binary(max_size=8))
VALUES = st.recursive(
    LEAVES,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(KEYS, children, max_size=4),
    ),
    max_leaves=10,
)
HASHABLE = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**63), max_value=2**64 - 1),
        st.floats(),
        st.complex_numbers(),
        st.text(),
        st.binary(),
        numpy_scalars().filter(is_hashable),
    ),
    lambda children: st.lists(children, max_size=3).map(tuple),
    max_leaves=6,
)

# ---------------------------------------------------------------------------
# Byte-identical encoding and equal decoding
# ---------------------------------------------------------------------------


def test_public_constants_match_peer() -> None:
    for name in [
        "PICKLE_PROTOCOL",
        "ENCODING_PICKLE",
        "ENCODING_MSGPACK",
        "ENCODING_DEFAULT",
        "ALLOWED_ENCODINGS",
        "MSGPACK_EXT_TUPLE",
        "MSGPACK_EXT_COMPLEX128",
        "MSGPACK_EXT_NDARRAY",
        "MSGPACK_EXT_NUMPY_SCALAR",
        "PICKLE_WARNING",
        "PICKLE_ERROR",
    ]:
        assert getattr(encoding, name) == getattr(peer, name), name
    assert encoding.ensure_binary is ensure_binary


# Hypothesis makes field names that only .npy 3.0 can hold, and numpy warns.
NPY_FORMAT_WARNING = "ignore:Stored array in format"


@pytest.mark.filterwarnings(NPY_FORMAT_WARNING)
@given(VALUES)
@example(float("nan"))
@example(-0.0)
@example(math.inf)
@example(2**64 - 1)
@example(-(2**63))
@example(((), [()], {"": ((1,),)}))
@example(np.float64("nan"))
def test_values_match_peer(value: Any) -> None:
    check_against_peer(value)


@pytest.mark.filterwarnings(NPY_FORMAT_WARNING)
@given(arrays())
def test_arrays_match_peer(array: np.ndarray) -> None:
    check_against_peer(array)


@given(numpy_scalars())
def test_numpy_scalars_match_peer(scalar: np.generic) -> None:
    check_against_peer(scalar)


@given(st.integers())
def test_integers_of_every_size(number: int) -> None:
    try:
        expected = peer.encode_value(number)
    except peer_errors.EncodeError:
        with pytest.raises(EncodeError):
            encode_value(number)
    else:
        assert encode_value(number) == expected
        assert decode_value(expected) == number


@given(HASHABLE)
def test_sub_keys_match_peer(sub_key: Any) -> None:
    # katsdptelstate's TelescopeState hashes the sub-key, then msgpack-encodes it.
    encoded = encode_sub_key(sub_key)
    assert encoded == peer.encode_value(sub_key, peer.ENCODING_MSGPACK)
    assert_same(decode_value(encoded), sub_key)
    if not has_zero_sized_scalar(sub_key):
        assert_same(decode_value(encoded), peer.decode_value(encoded))


@pytest.mark.parametrize("sub_key", [[1], {"a": 1}, np.arange(3), (1, [2]), {1}])
def test_unhashable_sub_key(sub_key: Any) -> None:
    with pytest.raises(TypeError):
        encode_sub_key(sub_key)


def test_sub_key_ignores_value_encoding_and_rejects_unencodable() -> None:
    assert encode_sub_key("k") == b"\xff\xa1k"
    with pytest.raises(EncodeError):
        encode_sub_key(frozenset())


def matrix(rows: list[list[int]]) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        return np.matrix(rows)


class Colour(enum.IntEnum):
    RED = 1


Point = collections.namedtuple("Point", "x y")


@pytest.mark.parametrize(
    "value",
    [
        np.ma.masked_array([1, 2, 3], [False, True, False]),
        matrix([[1, 2], [3, 4]]).T,
        np.rec.array([(1, 2.0)], dtype=[("a", "<i4"), ("b", "<f8")]),
        np.zeros(3, "V0"),
        np.zeros(3, "S0"),
        np.zeros(3, dtype=[]),
        np.zeros((0, 10**12)),
        np.zeros(2, dtype=np.dtype({"names": ["a"], "formats": ["<i4"], "titles": ["T"]})),
        np.zeros(2, dtype=[("é", "<i4")]),
        np.array(["2020-01-01", "NaT"], dtype="M8[D]"),
        np.zeros(2, dtype=[("a", "u1"), ("b", "<i4")])[0],
        np.zeros(2, dtype=np.dtype([("a", "u1"), ("b", "<i4")], align=True))[0],
        np.zeros(1, dtype=[])[0],
        np.longdouble("1.5"),
        np.float16(1.5),
        np.complex64(1 + 2j),
        np.datetime64("2020-01-01T12:00"),
        np.void(b"abcd"),
        np.str_("héllo"),
        np.bytes_(b"ab\x00"),
        np.bool_(True),
        Point(1, 2),
        msgpack.Timestamp(1, 2),
        bytearray(b"ab"),
        memoryview(b"ab"),
    ],
    ids=lambda value: type(value).__name__,
)
def test_special_values_match_peer(value: Any) -> None:
    ours = encode_value(value)
    assert ours == peer.encode_value(value)
    assert_same(decode_value(ours), peer.decode_value(ours))


def test_aligned_structured_array() -> None:
    # numpy.load (and so katsdptelstate) leaves the padding between fields
    # uninitialised; we keep the bytes that were stored.
    array = np.zeros(2, dtype=np.dtype([("a", "u1"), ("b", "<i4")], align=True))
    array["a"] = 7
    array["b"] = -1
    encoded = encode_value(array)
    assert encoded == peer.encode_value(array)
    decoded = decode_value(encoded)
    theirs = peer.decode_value(encoded)
    assert decoded.dtype == theirs.dtype == array.dtype
    assert decoded.tolist() == theirs.tolist() == array.tolist()
    assert decoded.tobytes() == array.tobytes()


def test_zero_sized_scalars_round_trip() -> None:
    # katsdptelstate writes these but cannot read them back.
    for scalar in [np.array([b"", b"abc"])[0], np.array(["", "x"])[0], np.zeros(1, "V0")[0]]:
        encoded = encode_value(scalar)
        assert encoded == peer.encode_value(scalar)
        assert_same(decode_value(encoded), scalar)
        with pytest.raises(peer_errors.DecodeError):
            peer.decode_value(encoded)


@pytest.mark.parametrize(
    "value",
    [
        set(),
        frozenset([1]),
        object(),
        Colour.RED,
        collections.OrderedDict(a=1),
        range(3),
        type,
        2**64,
        -(2**63) - 1,
        [1, {2: 2**64}],
        np.array([1, "a"], dtype=object),
        np.zeros(2, dtype=[("a", "O")]),
        np.zeros(2, dtype=[("a", "O")])[0],
    ],
    ids=lambda value: type(value).__name__,
)
def test_unencodable_values(value: Any) -> None:
    with pytest.raises(EncodeError):
        encode_value(value)
    with pytest.raises(peer_errors.EncodeError):
        peer.encode_value(value)


def nest_lists(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    "value",
    ["\udcff", memoryview(b"abcd")[::2], nest_lists(2000)],
    ids=["surrogate", "view", "deep"],
)
def test_msgpack_failures_become_encode_error(value: Any) -> None:
    # katsdptelstate lets msgpack's own exception (a ValueError or
    # BufferError) escape here; EncodeError is a ValueError too.
    with pytest.raises(EncodeError):
        encode_value(value)


def test_dict_with_non_string_keys() -> None:
    # Both encoders write them; both decoders refuse them (strict map keys).
    for value in [{1: 2}, {(1, 2): 3}, {None: 1}]:
        encoded = encode_value(value)
        assert encoded == peer.encode_value(value)
        with pytest.raises(DecodeError):
            decode_value(encoded)
        with pytest.raises(peer_errors.DecodeError):
            peer.decode_value(encoded)


@pytest.mark.parametrize(
    "size",
    [0, 1, 127, 128, 129, 65535 - 128, 65536 - 128, 65537 - 128, 4096, 4097, 100_000],
)
def test_array_ext_framing(size: int) -> None:
    # Around the ext8/ext16/ext32 boundaries and the zero-copy threshold.
    array = np.arange(size, dtype=np.uint8)
    check_against_peer(array)
    check_against_peer([array, array[::-1]])


@pytest.mark.parametrize("layout", ["C", "F", "strided", "reversed"])
def test_large_arrays(layout: str) -> None:
    array = np.arange(60_000, dtype=">f8").reshape(200, 300)
    if layout == "F":
        array = np.asfortranarray(array)
    elif layout == "strided":
        array = array[:, ::3]
    elif layout == "reversed":
        array = array[::-1]
    encoded = check_against_peer(array)
    # Writable, like numpy.load's result.
    assert decode_value(encoded).flags.writeable
    check_against_peer({"nested": (array,)})


def test_npy_header_versions_match_peer() -> None:
    # Non-Latin-1 field names need .npy 3.0 and very long headers 2.0;
    # numpy warns about both, and we leave that to numpy.
    for array in [
        np.zeros(2, dtype=[("日本", "<i4")]),
        np.zeros(1, dtype=[(f"field{i}", "<i4") for i in range(5000)]),
    ]:
        with pytest.warns(UserWarning, match="Stored array in format"):
            ours = encode_value(array)
        with pytest.warns(UserWarning, match="Stored array in format"):
            assert ours == peer.encode_value(array)
        if array.dtype.names == ("日本",):
            assert_same(decode_value(ours), peer.decode_value(ours))


def test_npy_header_too_long_to_parse() -> None:
    # Both refuse headers over 10000 characters (literal_eval is unsafe).
    array = np.zeros(1, dtype=[(f"field{i}", "<i4") for i in range(5000)])
    with pytest.warns(UserWarning):
        encoded = encode_value(array)
    with pytest.raises(DecodeError):
        decode_value(encoded)
    with pytest.raises(peer_errors.DecodeError):
        peer.decode_value(encoded)


def test_dtype_metadata_is_dropped_with_numpy_warning() -> None:
    array = np.zeros(2, dtype=np.dtype("<i4", metadata={"unit": "Jy"}))
    with pytest.warns(UserWarning, match="metadata"):
        ours = encode_value(array)
    with pytest.warns(UserWarning, match="metadata"):
        assert ours == peer.encode_value(array)


def test_trailing_bytes_after_array_data_are_ignored() -> None:
    # As numpy.load (and so katsdptelstate) does.
    npy = encode_value(np.arange(3))[4:] + b"junk"
    encoded = as_ext(encoding.MSGPACK_EXT_NDARRAY, npy)
    assert_same(decode_value(encoded), np.arange(3))
    assert_same(peer.decode_value(encoded), np.arange(3))


def test_nesting_limit_is_the_same_for_encoding_and_decoding() -> None:
    deepest = nest_tuples(encoding._MAX_NESTING)
    check_against_peer(deepest)
    too_deep = nest_tuples(encoding._MAX_NESTING + 1)
    with pytest.raises(EncodeError, match="nested"):
        encode_value(too_deep)
    with pytest.raises(DecodeError, match="deep"):
        decode_value(peer.encode_value(too_deep))


def test_equal_encoded_values() -> None:
    pairs = [
        ("abc", "abc"),
        ("abc", b"abc"),
        ("é", "é".encode()),
        (["a"], [b"a"]),
        (1, 1.0),
        (b"a", 1),
        (np.arange(3), np.arange(3)),
    ]
    for a, b in pairs:
        encoded_a, encoded_b = encode_value(a), encode_value(b)
        expected = peer.equal_encoded_values(encoded_a, encoded_b)
        assert encoding.equal_encoded_values(encoded_a, encoded_b) == expected
    assert encoding.equal_encoded_values(encode_value("abc"), encode_value(b"abc"))
    assert not encoding.equal_encoded_values(encode_value(["a"]), encode_value([b"a"]))
    with pytest.raises(DecodeError):
        encoding.equal_encoded_values(b"\xff\xc1", b"\xff\x01")


def test_unknown_encoding() -> None:
    for bad in [b"\x81", "\xff", b""]:
        with pytest.raises(ValueError, match="Unknown encoding"):
            encode_value(1, bad)


def test_concurrent_encoding_and_decoding() -> None:
    # Packers are pooled; no two threads (nor a nested tuple) may share one.
    values = [
        (i, [(float(i), np.int32(i))], {"a": (np.arange(i), "x" * i)}, complex(i, 1))
        for i in range(40)
    ]
    expected = [peer.encode_value(value) for value in values]
    failures: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(25):
                for value, encoded in zip(values, expected):
                    assert encode_value(value) == encoded
                    assert_same(decode_value(encoded), value)
        except BaseException as exc:  # noqa: BLE001 - reported to the main thread
            failures.append(exc)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures


def test_large_packed_values_do_not_stay_pooled() -> None:
    # A packer's buffer never shrinks, so one that packed a large value is
    # dropped instead of being returned to the pool.
    encode_value([1])
    pool = encoding._PACKER_POOLS[0]
    before = len(pool)
    assert before >= 1
    encode_value([b"x" * (encoding._POOLED_OUTPUT_LIMIT + 1)])
    assert len(pool) == before - 1


# ---------------------------------------------------------------------------
# Pickles
# ---------------------------------------------------------------------------


@pytest.fixture
def pickle_setting() -> Iterator[None]:
    """Restore the process-wide pickle setting after the test."""
    saved = (encoding._allow_pickle, encoding._warn_on_pickle)
    yield
    with encoding._pickle_lock:
        encoding._allow_pickle, encoding._warn_on_pickle = saved


PICKLABLE = [1, "abc", (1, [2.5, {"a": b"b"}]), np.arange(3), {1, 2}]


@pytest.mark.parametrize("value", PICKLABLE, ids=lambda value: type(value).__name__)
def test_pickle_encoding_matches_peer(value: Any) -> None:
    encoded = encode_value(value, encoding.ENCODING_PICKLE)
    assert encoded == peer.encode_value(value, peer.ENCODING_PICKLE)
    assert encoded[:1] == encoding.ENCODING_PICKLE
    decoded = decode_value(encoded, allow_pickle=True)
    if isinstance(value, np.ndarray):
        assert_same(decoded, value)
    else:
        assert decoded == value


def test_unpicklable_value() -> None:
    with pytest.raises(EncodeError):
        encode_value(threading.Lock(), encoding.ENCODING_PICKLE)
    with pytest.raises(EncodeError):
        encode_value(lambda: None, encoding.ENCODING_PICKLE)


@pytest.mark.usefixtures("pickle_setting")
def test_pickles_refused_by_default() -> None:
    encoding.set_allow_pickle(False)
    encoded = pickle.dumps([1, 2], protocol=2)
    with pytest.raises(DecodeError) as excinfo:
        decode_value(encoded)
    assert str(excinfo.value) == encoding.PICKLE_ERROR
    # Protocol 0 pickles start with ASCII, below the 0x80 header byte.
    with pytest.raises(DecodeError, match="pickled"):
        decode_value(pickle.dumps([1, 2], protocol=0))
    assert decode_value(encoded, allow_pickle=True) == [1, 2]


@pytest.mark.usefixtures("pickle_setting")
def test_set_allow_pickle_warns_once() -> None:
    encoded = pickle.dumps("x", protocol=2)
    encoding.set_allow_pickle(True, warn=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert decode_value(encoded) == "x"
        assert decode_value(encoded) == "x"
    assert [str(w.message) for w in caught] == [encoding.PICKLE_WARNING]
    assert caught[0].category is FutureWarning
    with pytest.raises(DecodeError):
        decode_value(encoded, allow_pickle=False)


@pytest.mark.usefixtures("pickle_setting")
def test_explicit_allow_pickle_keeps_pending_warning() -> None:
    encoded = pickle.dumps("x", protocol=2)
    encoding.set_allow_pickle(True, warn=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decode_value(encoded, allow_pickle=True)
        assert not caught
        decode_value(encoded)
    assert len(caught) == 1


@pytest.mark.usefixtures("pickle_setting")
def test_warning_has_no_effect_when_pickles_are_refused() -> None:
    encoding.set_allow_pickle(False, warn=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DecodeError):
            decode_value(pickle.dumps("x", protocol=2))


def test_python2_pickles_load_str_as_latin1() -> None:
    # Protocol 2 pickle of the Python 2 str 'caf\xe9' (SHORT_BINSTRING).
    encoded = b"\x80\x02U\x04caf\xe9q\x00."
    assert decode_value(encoded, allow_pickle=True) == "café"


def test_malformed_pickle() -> None:
    with pytest.raises(DecodeError, match="pickle"):
        decode_value(b"\x80\x02K", allow_pickle=True)


@pytest.mark.parametrize(
    ("setting", "allowed", "warns"),
    [(None, False, False), ("0", False, False), ("1", True, False), ("yes", False, True)],
)
def test_environment_variable(setting: str | None, allowed: bool, warns: bool) -> None:
    env = {key: value for key, value in os.environ.items() if key != "KATSDPTELSTATE_ALLOW_PICKLE"}
    if setting is not None:
        env["KATSDPTELSTATE_ALLOW_PICKLE"] = setting
    script = (
        "import pickle, warnings\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    from telstate import encoding\n"
        "try:\n"
        "    encoding.decode_value(pickle.dumps(1, protocol=2))\n"
        "    allowed = True\n"
        "except encoding.DecodeError:\n"
        "    allowed = False\n"
        "warned = any('KATSDPTELSTATE_ALLOW_PICKLE' in str(w.message) for w in caught)\n"
        "print(allowed, warned)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == [str(allowed), str(warns)]


# ---------------------------------------------------------------------------
# Hostile input
# ---------------------------------------------------------------------------


def test_empty_value() -> None:
    assert "empty" in str(assert_rejected_cheaply(b""))


@pytest.mark.parametrize("header", [0x81, 0x90, 0xC0, 0xFE])
def test_unknown_header_byte(header: int) -> None:
    value = bytes([header]) + b"\x01"
    assert "header byte" in str(assert_rejected_cheaply(value))
    with pytest.raises(peer_errors.DecodeError):
        peer.decode_value(value)


def test_every_truncation_is_rejected() -> None:
    value = (
        "text",
        [1.5, 2**63, b"bytes", np.arange(6).reshape(2, 3), np.float32(2)],
        {"k": (1j, np.zeros(2, dtype=[("a", "<i2")])[0])},
    )
    encoded = encode_value(value)
    for end in range(len(encoded)):
        with pytest.raises(DecodeError):
            decode_value(encoded[:end])


@pytest.mark.parametrize(
    "claim",
    [
        b"\xdb\xff\xff\xff\xff",  # str32
        b"\xc6\xff\xff\xff\xff",  # bin32
        b"\xdd\xff\xff\xff\xff",  # array32
        b"\xdf\xff\xff\xff\xff",  # map32
        b"\xc9\xff\xff\xff\xff\x01",  # ext32 (tuple)
        b"\xdc\xff\xff",  # array16
        b"\xde\xff\xff",  # map16
        b"\x91" * 5 + b"\xdd\x7f\xff\xff\xff",  # array32 inside arrays
        b"\xd4\x01\xdd",  # tuple holding an array32 header
    ],
)
def test_lengths_beyond_the_data(claim: bytes) -> None:
    # A few bytes claiming gigabytes must not allocate them.
    assert_rejected_cheaply(b"\xff" + claim + b"\x00" * 4)


@pytest.mark.parametrize("count", [2**30, 2**40, 2**62, 10**30])
def test_npy_header_claiming_huge_array(count: int) -> None:
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({count},), }}"
    for value in [
        as_ext(encoding.MSGPACK_EXT_NDARRAY, npy_file(header, b"\x00" * 10)),
        # Over 4 KiB, so read in place instead of through msgpack.
        as_ext(encoding.MSGPACK_EXT_NDARRAY, npy_file(header, b"\x00" * 10_000)),
    ]:
        assert_rejected_cheaply(value)


def test_zero_sized_items_need_no_data() -> None:
    header = "{'descr': '|V0', 'fortran_order': False, 'shape': (1000000000,), }"
    value = as_ext(encoding.MSGPACK_EXT_NDARRAY, npy_file(header))
    tracemalloc.start()
    try:
        array = decode_value(value)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert array.shape == (1_000_000_000,)
    assert peak < 1 << 20


class _Boobytrap:
    triggered = False

    def __reduce__(self) -> tuple[Callable[[], None], tuple[()]]:
        return (_trigger, ())


def _trigger() -> None:
    _Boobytrap.triggered = True


def test_object_arrays_are_never_unpickled() -> None:
    payload = pickle.dumps(np.array([_Boobytrap()], dtype=object), protocol=4)
    for descr in ["'|O'", "[('a', '|O')]", "'i4,O'"]:
        header = f"{{'descr': {descr}, 'fortran_order': False, 'shape': (1,), }}"
        assert_rejected_cheaply(as_ext(encoding.MSGPACK_EXT_NDARRAY, npy_file(header, payload)))
    assert not _Boobytrap.triggered


def test_object_scalars_are_refused() -> None:
    for descr in ["O", "i4,O", [("a", "O")]]:
        payload = msgpack.packb(descr) + b"\x00" * 16
        assert_rejected_cheaply(as_ext(encoding.MSGPACK_EXT_NUMPY_SCALAR, payload))


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        msgpack.packb("<f8"),  # no raw bytes
        msgpack.packb("<f8") + b"\x00" * 3,  # too few raw bytes
        b"\xa3<f",  # truncated descriptor
        msgpack.packb("V1000000000") + b"\x00",  # huge itemsize
        msgpack.packb("not a dtype") + b"\x00" * 8,
        msgpack.packb("\udcff", unicode_errors="surrogatepass") + b"\x00",
        msgpack.packb(17) + b"\x00" * 8,
        msgpack.packb([["a", "<i4", [1000000, 1000000]]]) + b"\x00" * 8,
    ],
)
def test_malformed_numpy_scalars(payload: bytes) -> None:
    value = as_ext(encoding.MSGPACK_EXT_NUMPY_SCALAR, payload)
    assert_rejected_cheaply(value)
    with pytest.raises(peer_errors.DecodeError):
        peer.decode_value(value)


@pytest.mark.parametrize(
    "npy",
    [
        b"",
        b"\x93NUMP",
        b"PK\x03\x04" + b"\x00" * 60,  # a zip (.npz): numpy.load would open it
        npy_file("{}", version=b"\x04\x00"),
        b"\x93NUMPY\x01\x00\xff",  # truncated header length
        npy_file("{'descr': '<f8', 'fortran_order': False, 'shape': (1,), }")[:-3],
        npy_file("[1, 2]"),
        npy_file("{'descr': '<f8', 'shape': (1,), }"),
        npy_file("{'descr': '<f8', 'fortran_order': False, 'shape': (-1,), }"),
        npy_file("{'descr': '<f8', 'fortran_order': False, 'shape': (1.5,), }"),
        npy_file("{'descr': '<f8', 'fortran_order': False, 'shape': 'x', }"),
        npy_file("{'descr': '<f8', 'fortran_order': 'no', 'shape': (1,), }"),
        npy_file("{'descr': '<x9', 'fortran_order': False, 'shape': (1,), }"),
        npy_file("{'descr': 5, 'fortran_order': False, 'shape': (1,), }"),
        npy_file("{'descr': '<f8', 'fortran_order': False, 'shape': (1,), }", b"\x00" * 7),
        npy_file("(" * 5000 + ")" * 5000),
        npy_file("{'descr': '<f8', 'fortran_order': False, 'shape': (" + "9" * 5000 + ",), }"),
        npy_file(" " * 10_001),
        npy_file(b"\xff\xfe", version=b"\x03\x00"),
        b"\x93NUMPY\x02\x00" + struct.pack("<I", 2**31) + b"{}",
    ],
)
def test_malformed_npy(npy: bytes) -> None:
    assert_rejected_cheaply(as_ext(encoding.MSGPACK_EXT_NDARRAY, npy))


def test_npz_is_not_loaded() -> None:
    buffer = io.BytesIO()
    np.savez(buffer, a=np.arange(3))
    value = as_ext(encoding.MSGPACK_EXT_NDARRAY, buffer.getvalue())
    assert_rejected_cheaply(value)


@pytest.mark.parametrize(
    "value",
    [
        as_ext(encoding.MSGPACK_EXT_TUPLE, msgpack.packb({"a": 1})),
        as_ext(encoding.MSGPACK_EXT_TUPLE, b"\x92\x01"),
        as_ext(encoding.MSGPACK_EXT_COMPLEX128, b"\x00" * 15),
        as_ext(encoding.MSGPACK_EXT_COMPLEX128, b"\x00" * 17),
        as_ext(0, b"x"),
        as_ext(5, b"x"),
        as_ext(127, b"x"),
        b"\xff\xd4\xfex",  # fixext1 of type -2
        b"\xff\xa2\xff\xfe",  # invalid UTF-8 in a str
        b"\xff\xc1",  # reserved msgpack byte
        b"\xff\x01\x02",  # extra data
        b"\xff",
        b"\xff\x81\x01\x02",  # int map key
        b"\xff\x81\x90\x01",  # unhashable map key
        b"\xff" + b"\x91" * 5000 + b"\xc0",  # deep arrays
        b"\xff" + b"\x81\xa0" * 5000 + b"\xc0",  # deep maps
    ],
)
def test_malformed_msgpack(value: bytes) -> None:
    assert_rejected_cheaply(value)
    with pytest.raises(peer_errors.DecodeError):
        peer.decode_value(value)


@pytest.mark.parametrize("depth", [encoding._MAX_NESTING + 1, 200, 5000])
def test_deeply_nested_extensions(depth: int) -> None:
    # katsdptelstate segfaults on these from about 200 levels.
    assert "deep" in str(assert_rejected_cheaply(nested_tuple_encoding(depth)))


def test_nesting_limit_fits_in_a_small_thread_stack() -> None:
    outcome: list[Any] = []

    def decode_deepest() -> None:
        outcome.append(decode_value(nested_tuple_encoding(encoding._MAX_NESTING)))
        with pytest.raises(DecodeError):
            decode_value(nested_tuple_encoding(10_000))
        outcome.append("refused")

    old_size = threading.stack_size(1 << 20)
    try:
        thread = threading.Thread(target=decode_deepest)
        thread.start()
        thread.join()
    finally:
        threading.stack_size(old_size)
    assert outcome == [nest_tuples(encoding._MAX_NESTING), "refused"]


def test_nested_structured_scalar_descriptor_respects_nesting_limit() -> None:
    scalar = np.zeros(1, dtype=[("a", [("b", "<i4")])])[0]
    value = nest_tuples(encoding._MAX_NESTING - 3)
    for _ in range(3):
        value = (value, scalar)
    check_against_peer(value)


@given(st.binary(max_size=64))
def test_random_bytes(data: bytes) -> None:
    compare_with_peer(b"\xff" + data)


@pytest.mark.filterwarnings(NPY_FORMAT_WARNING)
@given(VALUES, st.data())
def test_mutated_encodings(value: Any, data: st.DataObject) -> None:
    encoded = bytearray(encode_value(value))
    position = data.draw(st.integers(1, len(encoded) - 1)) if len(encoded) > 1 else 0
    mutation = data.draw(st.sampled_from(["replace", "delete", "insert"]))
    byte = data.draw(st.integers(0, 255))
    if mutation == "replace":
        encoded[position] = byte
    elif mutation == "delete":
        del encoded[position]
    else:
        encoded.insert(position, byte)
    compare_with_peer(bytes(encoded))


def compare_with_peer(value: bytes) -> None:
    """Decode `value` with both packages: both refuse it, or both give the same result."""
    try:
        expected = peer.decode_value(value)
    except peer_errors.DecodeError:
        try:
            result = decode_value(value)
        except DecodeError:
            return
        # The one kind of value we read and katsdptelstate does not.
        assert has_zero_sized_scalar(result)
    else:
        assert_same(decode_value(value), expected)


# ---------------------------------------------------------------------------
# decode_values: many samples at once


def _one_by_one(values: list[bytes]) -> list[Any]:
    """What decode_values must equal: decode_value of each, or its DecodeError."""
    return [decode_value(value) for value in values]


def _same_floats(a: list[Any], b: list[Any]) -> bool:
    """Equal element by element, bit for bit for floats (NaN and -0.0 included)."""
    return len(a) == len(b) and all(
        type(x) is type(y)
        and (struct.pack(">d", x) == struct.pack(">d", y) if type(x) is float else x == y)
        for x, y in zip(a, b)
    )


@given(st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=100))
def test_decode_values_of_floats_is_decode_value_of_each(floats: list[float]) -> None:
    values = [encode_value(x) for x in floats]
    decoded = encoding.decode_values(values)
    assert _same_floats(decoded, _one_by_one(values))
    assert _same_floats(decoded, floats)


@given(
    st.lists(
        st.one_of(st.floats(), st.integers(-(2**63), 2**64 - 1), st.text(max_size=3)),
        max_size=60,
    )
)
def test_decode_values_of_mixed_samples_is_decode_value_of_each(samples: list[Any]) -> None:
    values = [encode_value(x) for x in samples]
    assert _same_floats(encoding.decode_values(values), _one_by_one(values))


@pytest.mark.parametrize(
    "damage",
    [
        lambda v: v[:9] + b"\x00" + v[9:],  # a float of 11 bytes (trailing data)
        lambda v: b"\x00" + v[1:],  # a pickle header: refused
        lambda v: b"\xff\xca" + v[2:],  # 0xca: float32 with trailing bytes
    ],
)
def test_decode_values_refuses_what_decode_value_refuses(damage: Callable[[bytes], bytes]) -> None:
    values = [encode_value(float(i)) for i in range(40)]
    values[17] = damage(values[17])
    with pytest.raises(DecodeError):
        decode_value(values[17])
    with pytest.raises(DecodeError):
        encoding.decode_values(values)


def test_decode_values_does_not_realign_values_of_other_lengths() -> None:
    # Lengths summing to ten per value, with every tenth byte a float header:
    # only a check of each length stops these from decoding as floats.
    floats = [encode_value(float(i)) for i in range(40)]
    values = floats[:10] + [floats[10][:9], b"\x00" + floats[11]] + floats[12:]
    assert len(b"".join(values)) == 10 * len(values)
    assert b"".join(values)[100::10][:3] == b"\xff\xff\xff"
    with pytest.raises(DecodeError):
        encoding.decode_values(values)
