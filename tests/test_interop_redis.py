"""telstate and katsdptelstate 1.0.0 on one real Redis: each reads the other's writes."""

from __future__ import annotations

import threading
import time

import katsdptelstate
import katsdptelstate.redis
import numpy as np
import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

import telstate
import telstate.encoding
import telstate.redis
from telstate.redis import RedisBackend

from .servers import RedisServer

# Values both packages must store and read identically.
VALUES = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**64 - 1),
        st.floats(allow_nan=False),
        st.text(max_size=8),
        st.binary(max_size=8),
        st.complex_numbers(allow_nan=False),
        st.builds(
            np.array,
            st.lists(st.integers(0, 100), max_size=4),
            st.sampled_from(["i1", "<u2", ">i4", "f4", "f8", "c16"]),
        ),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.tuples(children, children),
        st.dictionaries(st.text(max_size=3), children, max_size=3),
    ),
    max_leaves=6,
)


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (
            type(a) is type(b)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and np.array_equal(a, b)
        )
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return type(b) is dict and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@pytest.fixture
def pair(redis_client):
    """(telstate, katsdptelstate) telescope states on the same Redis database."""
    ours = telstate.TelescopeState(RedisBackend(redis_client))
    theirs = katsdptelstate.TelescopeState(katsdptelstate.redis.RedisBackend(redis_client))
    return ours, theirs


def _fill(state, values):
    state.add("attr", values[0], immutable=True)
    for i, value in enumerate(values):
        state.add("sensor", value, ts=1000.0 + i)
        state.set_indexed("indexed", i, value)
    cb = state.view("cb1")
    cb.add("rate", 8.0, immutable=True)
    cb.add("sensor", "cb", ts=5.0)


def _read(state):
    return {
        "keys": state.keys(),
        "attr": state.get("attr"),
        "sensor": state.get_range("sensor", st=0),
        "latest": state.get("sensor"),
        "indexed": state.get("indexed"),
        "one": state.get_indexed("indexed", 0),
        "view": state.view("cb1").get("rate"),
        "types": [state.key_type(k) and state.key_type(k).value for k in state.keys()],
        "encoded": state.get_range("sensor", st=0, return_encoded=True),
    }


@given(values=st.lists(VALUES, min_size=1, max_size=4))
def test_katsdptelstate_reads_what_telstate_writes(redis_server, values):
    client = redis_server.client()
    client.flushall()
    ours = telstate.TelescopeState(RedisBackend(client))
    theirs = katsdptelstate.TelescopeState(katsdptelstate.redis.RedisBackend(client))
    _fill(ours, values)
    assert _same(_read(theirs), _read(ours))


@given(values=st.lists(VALUES, min_size=1, max_size=4))
def test_telstate_reads_what_katsdptelstate_writes(redis_server, values):
    client = redis_server.client()
    client.flushall()
    ours = telstate.TelescopeState(RedisBackend(client))
    theirs = katsdptelstate.TelescopeState(katsdptelstate.redis.RedisBackend(client))
    _fill(theirs, values)
    assert _same(_read(ours), _read(theirs))


def test_same_redis_bytes(redis_server):
    """Both packages leave byte-identical Redis contents for the same writes."""
    client = redis_server.client()
    dumps = []
    for module in (telstate, katsdptelstate):
        client.flushall()
        state = module.TelescopeState(module.redis.RedisBackend(client))
        _fill(state, [1, "two", (3.0, b"4"), np.arange(3)])
        dumps.append(
            {
                key: (client.type(key), client.get(key) if client.type(key) == b"string" else None)
                for key in client.keys()
            }
            | {b"zset": client.zrange(b"sensor", 0, -1, withscores=True)}
            | {b"hash": client.hgetall(b"indexed")}
        )
    assert dumps[0] == dumps[1]


def test_immutable_conflict_detected_across_packages(pair):
    ours, theirs = pair
    theirs.add("a", 1, immutable=True)
    with pytest.raises(telstate.ImmutableKeyError):
        ours.add("a", 2, immutable=True)
    ours.add("a", 1, immutable=True)
    ours.add("b", 1, immutable=True)
    with pytest.raises(katsdptelstate.ImmutableKeyError):
        theirs.add("b", 2, immutable=True)


def _wake(waiter_state, writer, condition=None):
    """Start a wait in a thread, write, and return how long after the write the wait ended.

    Timed from the write, not from the start of the wait, so that a slow
    start of the waiting thread on a loaded machine is not counted.
    """
    result: dict = {}

    def wait():
        try:
            waiter_state(condition)
            result["woken"] = time.monotonic()
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            result["error"] = error

    thread = threading.Thread(target=wait)
    thread.start()
    time.sleep(0.2)
    written = time.monotonic()
    writer()
    thread.join(10)
    assert "error" not in result, result
    return result["woken"] - written


@pytest.mark.parametrize("kind", ["immutable", "mutable", "indexed"])
def test_katsdptelstate_wait_wakes_on_telstate_write(pair, kind):
    ours, theirs = pair
    if kind == "indexed":
        elapsed = _wake(
            lambda c: theirs.wait_indexed("k", "s", lambda v: v == 3, timeout=5),
            lambda: ours.set_indexed("k", "s", 3),
        )
    else:
        elapsed = _wake(
            lambda c: theirs.wait_key("k", lambda v, t: v == 3, timeout=5),
            lambda: ours.add("k", 3, immutable=kind == "immutable"),
        )
    assert elapsed < 0.5  # woken by the message, not by the 1 s poll (due 0.8 s after the write)


@pytest.mark.parametrize("kind", ["immutable", "mutable", "indexed"])
def test_telstate_wait_wakes_on_katsdptelstate_write(pair, kind):
    ours, theirs = pair
    if kind == "indexed":
        elapsed = _wake(
            lambda c: ours.wait_indexed("k", "s", lambda v: v == 3, timeout=5),
            lambda: theirs.set_indexed("k", "s", 3),
        )
    else:
        elapsed = _wake(
            lambda c: ours.wait_key("k", lambda v, t: v == 3, timeout=5),
            lambda: theirs.add("k", 3, immutable=kind == "immutable"),
        )
    assert elapsed < 0.5


def test_update_messages_carry_the_type_byte(redis_client):
    ours = telstate.TelescopeState(RedisBackend(redis_client))
    pubsub = redis_client.pubsub()
    pubsub.psubscribe("update/*")
    pubsub.get_message(timeout=1)
    ours.add("i", 1, immutable=True)
    ours.add("m", 1, ts=2.0)
    ours.set_indexed("x", "sk", 1)
    ours.add("m", 1, ts=2.0)  # no change, no message
    messages = []
    while (message := pubsub.get_message(timeout=0.5)) is not None:
        messages.append((message["channel"], message["data"]))
    enc = telstate.encode_value
    sk = telstate.encoding.encode_sub_key("sk")
    assert messages == [
        (b"update/i", b"\x01" + enc(1)),
        (b"update/m", b"\x02" + telstate.utils.pack_timestamp(2.0) + enc(1)),
        (b"update/x", b"\x03%d\n" % len(sk) + sk + enc(1)),
    ]
    pubsub.close()


def test_unreachable_redis_raises_connection_error_promptly(tmp_path):
    start = time.monotonic()
    with pytest.raises(telstate.ConnectionError):
        telstate.TelescopeState(f"unix://{tmp_path}/no-such.sock")
    with pytest.raises(telstate.ConnectionError):
        RedisBackend(redis.Redis(unix_socket_path=str(tmp_path / "nope"), socket_timeout=1))
    assert time.monotonic() - start < 5


def test_silent_server_raises_connection_error_within_socket_timeout(tmp_path):
    """A server that accepts but never answers: ConnectionError after the socket timeout."""
    import socket

    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "silent.sock"))
    listener.listen(1)
    try:
        start = time.monotonic()
        client = redis.Redis(unix_socket_path=str(tmp_path / "silent.sock"), socket_timeout=0.5)
        with pytest.raises(telstate.ConnectionError):
            RedisBackend(client)
        assert time.monotonic() - start < 1.5
    finally:
        listener.close()


def test_url_forms_with_db(redis_server):
    state = telstate.TelescopeState(redis_server.url, db=3)
    state.add("in-db-3", 1, immutable=True)
    assert redis_server.client(db=3).exists("in-db-3")
    assert not redis_server.client(db=0).exists("in-db-3")
    state = telstate.TelescopeState(f"{redis_server.url}?db=4")
    state.add("in-db-4", 1, immutable=True)
    assert redis_server.client(db=4).exists("in-db-4")


def test_host_port_endpoint():
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with RedisServer(port=port) as server:
        state = telstate.TelescopeState(f"127.0.0.1:{port}", db=2)
        state.add("tcp", 1, immutable=True)
        assert server.client(db=2).get("tcp") == telstate.encode_value(1)
        from telstate.endpoint import Endpoint

        assert telstate.TelescopeState(Endpoint("127.0.0.1", port), db=2).tcp == 1
    with pytest.raises(telstate.ConnectionError):
        telstate.TelescopeState(f"127.0.0.1:{port}")


def test_malformed_update_message_does_not_break_a_wait(redis_client):
    """Garbage on update/<key> means "check again", never an exception in wait_key."""
    ours = telstate.TelescopeState(RedisBackend(redis_client))

    def publish_then_write():
        redis_client.publish("update/k", b"\x03no-newline")
        redis_client.publish("update/k", b"\x02short")
        time.sleep(0.05)
        ours.add("k", 1, immutable=True)

    elapsed = _wake(lambda c: ours.wait_key("k", timeout=5), publish_then_write)
    assert elapsed < 2
