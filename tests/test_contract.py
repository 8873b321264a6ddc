"""The contract every backend meets, through the TelescopeState frontend.

Written once; runs against every backend in :data:`tests.backends.BACKENDS`.
"""

from __future__ import annotations

import concurrent.futures
import math
import threading
import time

import numpy as np
import pytest

import telstate
from telstate import (
    CancelledError,
    DecodeError,
    ImmutableKeyError,
    InvalidTimestampError,
    KeyType,
    TelescopeState,
    TimeoutError,
)
from telstate.encoding import encode_value

from .backends import BACKENDS


@pytest.fixture(params=sorted(BACKENDS))
def backend(request):
    return BACKENDS[request.param](request)


@pytest.fixture
def ts(backend):
    return TelescopeState(backend)


def test_immutable_attribute_and_item_access(ts):
    ts.add("rate", 3.5, immutable=True)
    ts["name"] = "m063"
    ts.array = np.arange(5)
    assert ts.rate == 3.5
    assert ts["name"] == "m063"
    np.testing.assert_array_equal(ts.array, np.arange(5))
    assert ts.key_type("rate") == KeyType.IMMUTABLE
    assert ts.is_immutable("rate")
    assert "rate" in ts and b"rate" in ts and "nope" not in ts


def test_immutable_same_value_allowed_different_refused(ts):
    ts.add("a", [1, 2], immutable=True)
    ts.add("a", [1, 2], immutable=True)
    with pytest.raises(ImmutableKeyError, match="'a'"):
        ts.add("a", [1, 3], immutable=True)
    assert ts.a == [1, 2]


def test_immutable_str_and_bytes_compare_equal(ts):
    ts.add("s", "hello", immutable=True)
    ts.add("s", b"hello", immutable=True)  # equal_encoded_values treats them as equal
    assert ts.s == "hello"


def test_type_change_is_refused_and_names_the_key(ts):
    ts.add("m", 1.0, ts=1.0)
    ts.add("i", 1, immutable=True)
    ts.set_indexed("x", "k", 1)
    with pytest.raises(ImmutableKeyError, match="'m'"):
        ts.add("m", 1, immutable=True)
    with pytest.raises(ImmutableKeyError, match="'i'"):
        ts.add("i", 2.0)
    with pytest.raises(ImmutableKeyError, match="'x'"):
        ts.add("x", 2.0)
    with pytest.raises(ImmutableKeyError, match="'m'"):
        ts.set_indexed("m", "k", 1)
    assert ts.key_type("m") == KeyType.MUTABLE
    assert ts.get_range("m", st=0) == [(1.0, 1.0)]


def test_mutable_latest_and_order(ts):
    ts.add("s", "b", ts=2.0)
    ts.add("s", "a", ts=1.0)
    ts.add("s", "c", ts=3.0)
    assert ts.s == "c"
    assert ts.get("s") == "c"
    assert ts.get_range("s", st=0) == [("a", 1.0), ("b", 2.0), ("c", 3.0)]
    assert ts.key_type("s") == KeyType.MUTABLE
    assert not ts.is_immutable("s")


def test_mutable_default_timestamp_is_now(ts):
    before = time.time()
    ts.add("now", 1)
    ((_, stamp),) = ts.get_range("now")
    assert before <= stamp <= time.time()


def test_mutable_equal_timestamps_order_by_encoded_value_and_dedupe(ts):
    values = [3, 1, 2, 1, 3]
    for value in values:
        ts.add("eq", value, ts=5.0)
    stored = ts.get_range("eq", st=0, return_encoded=True)
    assert [v for v, _ in stored] == sorted({encode_value(v) for v in values})
    assert all(stamp == 5.0 for _, stamp in stored)


def test_mutable_zero_and_negative_zero_timestamps(ts):
    ts.add("z", 1, ts=-0.0)
    ts.add("z", 2, ts=0.0)
    assert ts.get_range("z", st=0) == [(1, 0.0), (2, 0.0)]


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf, -math.inf])
def test_invalid_timestamps(ts, bad):
    with pytest.raises(InvalidTimestampError):
        ts.add("t", 1, ts=bad)
    assert "t" not in ts


def test_get_range_every_flag_combination(ts):
    for t in [1.0, 2.0, 3.0, 4.0]:
        ts.add("r", t * 10, ts=t)
    r = lambda **kw: [stamp for _, stamp in ts.get_range("r", **kw)]  # noqa: E731
    assert r() == [4.0]
    assert r(st=0) == [1.0, 2.0, 3.0, 4.0]
    assert r(st=2) == [2.0, 3.0, 4.0]
    assert r(st=2.5) == [3.0, 4.0]
    assert r(st=2.5, include_previous=True) == [2.0, 3.0, 4.0]
    assert r(st=2, et=4) == [2.0, 3.0]
    assert r(st=2, et=4, include_end=True) == [2.0, 3.0, 4.0]
    assert r(st=2, et=4, include_previous=True) == [1.0, 2.0, 3.0]
    assert r(st=2, et=4, include_previous=True, include_end=True) == [1.0, 2.0, 3.0, 4.0]
    assert r(et=3) == [2.0]
    assert r(et=3, include_end=True) == [2.0, 3.0]
    assert r(et=0.5) == []
    assert r(st=5) == []
    assert r(st=5, include_previous=True) == [4.0]
    assert r(st=0, et=0) == []
    assert r(st=0, et=0, include_end=True) == []
    assert r(st=1, et=1, include_end=True) == [1.0]
    assert r(st=-5) == [1.0, 2.0, 3.0, 4.0]
    assert r(st=math.inf, include_previous=True) == [4.0]
    assert r(st=3, et=2) == []
    assert r(st=3, et=2, include_previous=True) == [2.0]  # as katsdptelstate's Redis backend
    assert r(st=3, et=0, include_previous=True) == [2.0]
    assert ts.get_range("r", st=4, return_encoded=True) == [(encode_value(40.0), 4.0)]


def test_get_range_include_end_at_zero(ts):
    ts.add("z", "x", ts=0.0)
    assert ts.get_range("z", st=0, et=0, include_end=True) == [("x", 0.0)]
    assert ts.get_range("z", et=0, include_end=True) == [("x", 0.0)]


def test_get_range_errors(ts):
    with pytest.raises(KeyError):
        ts.get_range("missing")
    ts.add("i", 1, immutable=True)
    with pytest.raises(ImmutableKeyError, match="'i'"):
        ts.get_range("i")
    ts.add("m", 1, ts=1)
    with pytest.raises(InvalidTimestampError):
        ts.get_range("m", st=math.nan)


def test_indexed(ts):
    ts.set_indexed("idx", "a", 1)
    ts.set_indexed("idx", ("tuple", 2), [2])
    ts.set_indexed("idx", 3, "three")
    ts.set_indexed("idx", "a", 1)  # same value: fine
    with pytest.raises(ImmutableKeyError, match="'idx'"):
        ts.set_indexed("idx", "a", 2)
    assert ts.get_indexed("idx", "a") == 1
    assert ts.get_indexed("idx", ("tuple", 2)) == [2]
    assert ts.get_indexed("idx", "missing") is None
    assert ts.get_indexed("idx", "missing", default=5) == 5
    assert ts.get_indexed("nokey", "a", default=6) == 6
    assert ts.get_indexed("idx", "a", return_encoded=True) == encode_value(1)
    assert ts.get("idx") == {"a": 1, ("tuple", 2): [2], 3: "three"}
    assert ts.key_type("idx") == KeyType.INDEXED
    assert not ts.is_immutable("idx")
    assert ts.get("idx", return_encoded=True)[encode_value("a")] == encode_value(1)


def test_indexed_unhashable_sub_key(ts):
    with pytest.raises(TypeError):
        ts.set_indexed("idx", ["list"], 1)
    with pytest.raises(TypeError):
        ts.set_indexed("idx", {"a": 1}, 1)
    assert "idx" not in ts


def test_get_indexed_on_other_type(ts):
    ts.add("m", 1.0, ts=1.0)
    with pytest.raises(ImmutableKeyError):
        ts.get_indexed("m", "a")


def test_get_missing(ts):
    assert ts.get("missing") is None
    assert ts.get("missing", 42) == 42
    with pytest.raises(KeyError):
        ts["missing"]
    with pytest.raises(AttributeError):
        ts.missing  # noqa: B018 - the attribute access is what is tested
    assert ts.key_type("missing") is None


def test_return_encoded(ts):
    ts.add("a", {"x": 1}, immutable=True)
    assert ts.get("a", return_encoded=True) == encode_value({"x": 1})


def test_binary_keys_and_values(ts):
    key = b"bin\xff\x00key"
    ts.add(key, b"\x00\xff", immutable=True)
    assert ts.get(key) == b"\x00\xff"
    assert key.decode("utf-8", "surrogateescape") in ts.keys()


def test_views_and_prefixes(ts):
    ts.add("top", 1, immutable=True)
    cb = ts.view("cb1")
    assert cb.prefixes == ("cb1_", "")
    cb.add("dump_rate", 2.0, immutable=True)
    assert ts["cb1_dump_rate"] == 2.0
    assert cb.dump_rate == 2.0
    assert cb.top == 1  # falls through to the root namespace
    stream = cb.view("stream", exclusive=True)
    assert stream.prefixes == ("stream_",)
    assert stream.get("top") is None
    nested = cb.view("sub_")
    assert nested.prefixes == ("sub_", "cb1_", "")
    raw = ts.view("raw", add_separator=False)
    assert raw.prefixes == ("raw", "")
    assert ts.view("").prefixes == ("", "")
    assert cb.root().prefixes == ("",)
    assert cb.backend is ts.backend
    assert TelescopeState.join("a", "b", "c") == "a_b_c"


def test_view_shadowing(ts):
    ts.add("x", "root", immutable=True)
    ts.add("cb_x", "cb", immutable=True)
    assert ts.view("cb").x == "cb"
    ts.add("s", 1, ts=1.0)
    ts.add("cb_s", 2, ts=1.0)
    assert ts.view("cb").get_range("s") == [(2, 1.0)]


def test_keys_patterns(ts):
    for key in ["a", "ab", "abc", "b", "cb1_x", "cb2_x", "q?", "star*", "[x]"]:
        ts.add(key, 1, immutable=True)
    assert ts.keys() == sorted(["a", "ab", "abc", "b", "cb1_x", "cb2_x", "q?", "star*", "[x]"])
    assert ts.keys("a*") == ["a", "ab", "abc"]
    assert ts.keys("a?") == ["ab"]
    assert ts.keys("cb[12]_x") == ["cb1_x", "cb2_x"]
    assert ts.keys("cb[^1]_x") == ["cb2_x"]
    assert ts.keys("cb[0-1]_*") == ["cb1_x"]
    assert ts.keys("q\\?") == ["q?"]
    assert ts.keys("star\\*") == ["star*"]
    assert ts.keys("\\[x]") == ["[x]"]
    assert ts.keys(b"b") == ["b"]
    assert ts.keys("nothing*") == []


def test_ipython_completion_respects_views(ts):
    ts.add("cb_a", 1, immutable=True)
    ts.add("b", 1, immutable=True)
    completions = ts.view("cb")._ipython_key_completions_()
    assert "a" in completions and "b" in completions
    assert "a" in dir(ts.view("cb"))


def test_delete_removes_from_every_namespace(ts):
    ts.add("x", 1, immutable=True)
    ts.add("cb_x", 2, immutable=True)
    ts.add("y", 1, ts=1.0)
    ts.view("cb").delete("x")
    assert "x" not in ts and "cb_x" not in ts
    ts.delete("y")
    ts.delete("never-existed")
    assert ts.keys() == []
    ts.add("y", 1, immutable=True)  # a deleted key can come back with another type
    assert ts.key_type("y") == KeyType.IMMUTABLE


def test_clear(ts):
    ts.add("x", 1, immutable=True)
    ts.add("s", 1, ts=1.0)
    ts.set_indexed("i", 1, 1)
    ts.view("cb").clear()
    assert ts.keys() == []
    ts.add("x", 2.0)
    assert ts.x == 2.0


def test_setattr_on_method_name_refused(ts):
    with pytest.raises(AttributeError):
        ts.get = 1
    ts.add("get", 1, immutable=True)  # still possible as a key
    assert ts["get"] == 1


def test_pickles_refused_by_default(ts):
    import pickle

    ts.backend.set_immutable(b"p", pickle.dumps(1, protocol=2))
    with pytest.raises(DecodeError):
        ts.get("p")
    assert ts.get("p", return_encoded=True).startswith(b"\x80")


def test_pickle_encoding_when_allowed(ts, monkeypatch):
    telstate.set_allow_pickle(True)
    try:
        ts.add("p", {"a": 1}, immutable=True, encoding=telstate.ENCODING_PICKLE)
        assert ts.p == {"a": 1}
    finally:
        telstate.set_allow_pickle(False)


def test_dump_matches_key(ts):
    ts.add("i", 1, immutable=True)
    assert ts.backend.dump(b"i") is not None
    assert ts.backend.dump(b"missing") is None


# --- waiting -------------------------------------------------------------------------


def _later(delay, func, *args, **kwargs):
    timer = threading.Timer(delay, func, args, kwargs)
    timer.start()
    return timer


def test_wait_key_already_present(ts):
    ts.add("k", 1, immutable=True)
    ts.wait_key("k", timeout=0.01)
    ts.wait_key("k", lambda value, stamp: value == 1 and stamp is None, timeout=0.01)


def test_wait_key_wakes_on_write(ts):
    _later(0.1, ts.add, "k", 5, ts=3.0)
    start = time.monotonic()
    ts.wait_key("k", lambda value, stamp: value == 5 and stamp == 3.0, timeout=5)
    assert time.monotonic() - start < 2.5


def test_wait_key_in_view_wakes_on_either_namespace(ts):
    view = ts.view("cb")
    _later(0.1, ts.add, "k", 1, immutable=True)
    view.wait_key("k", timeout=5)


def test_wait_key_condition_on_sequence(ts):
    def writer():
        for i in range(5):
            ts.add("seq", i, ts=float(i))
            time.sleep(0.02)

    thread = threading.Thread(target=writer)
    thread.start()
    ts.wait_key("seq", lambda value, stamp: value == 4, timeout=5)
    thread.join()


def test_wait_key_on_indexed_key_gets_dict(ts):
    _later(0.1, ts.set_indexed, "idx", "a", 1)
    ts.wait_key("idx", lambda value, stamp: value == {"a": 1}, timeout=5)


def test_wait_key_timeout(ts):
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="'k'"):
        ts.wait_key("k", timeout=0.2)
    assert 0.15 < time.monotonic() - start < 2


def test_wait_key_condition_never_met_times_out(ts):
    ts.add("k", 1, ts=1.0)
    with pytest.raises(TimeoutError):
        ts.wait_key("k", lambda value, stamp: value == 2, timeout=0.2)


def test_wait_key_cancel_future(ts):
    future = concurrent.futures.Future()
    future.cancel()
    with pytest.raises(CancelledError):
        ts.wait_key("k", cancel_future=future, timeout=1)
    future = concurrent.futures.Future()
    _later(0.1, future.set_result, None)
    with pytest.raises(CancelledError):
        ts.wait_key("k", cancel_future=future, timeout=5)


def test_wait_indexed(ts):
    ts.set_indexed("idx", "a", 1)
    ts.wait_indexed("idx", "a", timeout=0.01)
    _later(0.1, ts.set_indexed, "idx", "b", 2)
    ts.wait_indexed("idx", "b", lambda value: value == 2, timeout=5)
    _later(0.1, ts.set_indexed, "new", "c", 3)
    ts.wait_indexed("new", "c", timeout=5)


def test_wait_indexed_timeout_and_cancel(ts):
    ts.set_indexed("idx", "a", 1)
    with pytest.raises(TimeoutError, match="'idx'"):
        ts.wait_indexed("idx", "b", timeout=0.2)
    with pytest.raises(TimeoutError):
        ts.wait_indexed("idx", "a", lambda value: value == 2, timeout=0.2)
    future = concurrent.futures.Future()
    future.set_result(None)
    with pytest.raises(CancelledError):
        ts.wait_indexed("idx", "b", cancel_future=future)


def test_wait_indexed_on_wrong_type(ts):
    ts.add("m", 1, ts=1.0)
    with pytest.raises(ImmutableKeyError):
        ts.wait_indexed("m", "a", timeout=1)
    _later(0.1, ts.add, "later", 1, immutable=True)
    with pytest.raises(ImmutableKeyError):
        ts.wait_indexed("later", "a", timeout=5)


def test_wait_key_sees_a_write_that_lands_while_the_monitor_starts(ts):
    """A write between the first check and the monitor's registration is not missed."""
    backend = ts.backend
    start_monitor = backend.monitor_keys

    def racing_monitor(keys):
        ts.add("race", 1, immutable=True)  # lands after the frontend's first look
        return start_monitor(keys)

    backend.monitor_keys = racing_monitor
    try:
        ts.wait_key("race", timeout=0.5)
    finally:
        del backend.monitor_keys


def test_include_previous_with_empty_value_at_start_time(backend):
    # An empty member at start_time is the bare packed timestamp: Redis's
    # ZREVRANGEBYLEX from "[start" finds it as the previous sample.
    backend.add_mutable(b"e", b"a", 2.0)
    backend.add_mutable(b"e", b"", 3.0)
    backend.add_mutable(b"e", b"b", 4.0)
    assert backend.get_range(b"e", 3.0, -1.0, True, False) == [(b"", 3.0)]
    assert backend.get_range(b"e", 3.0, 4.0, True, False) == [(b"", 3.0), (b"", 3.0)]
    assert backend.get_range(b"e", 3.0, 4.0, False, False) == [(b"", 3.0)]
    assert backend.get_range(b"e", 2.5, 4.0, True, False) == [(b"a", 2.0), (b"", 3.0)]
