"""Properties of the log: replay equals the live state, and every prefix equals a model."""

from __future__ import annotations

import contextlib
import math
import tempfile
from copy import copy

import hypothesis.strategies as st
from hypothesis import given, settings

from telstate import ImmutableKeyError, KeyType
from telstate.lmdb import LmdbBackend, replay
from telstate.log import Op
from telstate.utils import pack_query_timestamp, pack_timestamp, split_timestamp

LONG = b"L" * 600
KEYS = st.sampled_from([b"a", b"b", b"", b"k" * 500, b"k" * 500 + b"!"])
VALUES = st.sampled_from([b"x", b"y", b"", LONG, LONG + b"2", b"\xff\x00"])
SUB_KEYS = st.sampled_from([b"s", b"t", b"", LONG])
TIMESTAMPS = st.sampled_from([0.0, -0.0, 1.0, 2.5, 1e9])

OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("set_immutable"), KEYS, VALUES),
        st.tuples(st.just("add_mutable"), KEYS, VALUES, TIMESTAMPS),
        st.tuples(st.just("set_indexed"), KEYS, SUB_KEYS, VALUES),
        st.tuples(st.just("delete"), KEYS),
        st.tuples(st.just("clear")),
    ),
    max_size=40,
)


class Model:
    """katsdptelstate semantics as plain containers; apply() says whether an event results."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes | set[bytes] | dict[bytes, bytes]] = {}

    def _check(self, key: bytes, kind: type) -> None:
        if key in self.data and type(self.data[key]) is not kind:
            raise ImmutableKeyError(key)

    def apply(self, name: str, *args) -> bool:
        if name == "set_immutable":
            key, value = args
            self._check(key, bytes)
            if key in self.data:
                return False
            self.data[key] = value
            return True
        if name == "add_mutable":
            key, value, timestamp = args
            self._check(key, set)
            members = self.data.setdefault(key, set())
            member = pack_timestamp(timestamp) + value
            added = member not in members
            members.add(member)  # type: ignore[union-attr]
            return added
        if name == "set_indexed":
            key, sub_key, value = args
            self._check(key, dict)
            sub_keys = self.data.setdefault(key, {})
            added = sub_key not in sub_keys
            sub_keys.setdefault(sub_key, value)  # type: ignore[union-attr]
            return added
        if name == "delete":
            return self.data.pop(args[0], None) is not None
        had_keys = bool(self.data)
        self.data.clear()
        return had_keys

    def records(self) -> list:
        kinds = {bytes: KeyType.IMMUTABLE, set: KeyType.MUTABLE, dict: KeyType.INDEXED}
        return sorted(
            (key, kinds[type(value)], sorted(value) if isinstance(value, set) else copy(value))
            for key, value in self.data.items()
        )


def live_records(backend: LmdbBackend) -> list:
    with backend.snapshot() as snap:
        return sorted(snap.records())


def replayed_records(path: str, **limits) -> list:
    return sorted(replay(path, **limits).backend.records())


@settings(max_examples=60)
@given(OPERATIONS)
def test_replay_equals_live_state_and_every_prefix_equals_the_model(operations):
    with tempfile.TemporaryDirectory(prefix="telstate-replay-") as directory:
        path = f"{directory}/store"
        backend = LmdbBackend(path, durability="none", map_size=1 << 20)
        model = Model()
        states = [model.records()]  # state after 0, 1, ... events
        expected_ops = []
        for name, *args in operations:
            try:
                changed = model.apply(name, *args)
            except ImmutableKeyError:
                try:
                    getattr(backend, name)(*args)
                except ImmutableKeyError:
                    continue
                raise AssertionError(f"{name}{args} should have been refused") from None
            getattr(backend, name)(*args)
            if changed:
                states.append(model.records())
                expected_ops.append(Op(name))
        try:
            assert backend.last_seq == len(states) - 1
            assert [event.op for event in backend.events()] == expected_ops
            assert live_records(backend) == model.records()
            assert replayed_records(path) == model.records()
            assert backend.verify() == []
            for seq in sorted({0, len(states) // 2, len(states) - 1, 1} & set(range(len(states)))):
                assert replayed_records(path, until_seq=seq) == states[seq]
        finally:
            backend.close()


STAMPS = st.sampled_from([0.0, 0.5, 1.0, 1.0 + 2**-40, 2.0, 3.0, 7.0, 1e9])
SAMPLE_VALUES = st.sampled_from([b"a", b"b", b"", b"zz", LONG, LONG + b"2", LONG[:-1] + b"M"])
BOUNDS = st.sampled_from([-math.inf, -1.0, 0.0, 0.7, 1.0, 2.0, 2.5, 7.0, 1e9, math.inf])


def redis_range(members, start, end, include_previous, include_end):
    """What ZREVRANGEBYLEX and ZRANGEBYLEX give katsdptelstate's RedisBackend.get_range."""
    first = pack_query_timestamp(start, False)
    last = pack_query_timestamp(end, True, include_end)
    result = []
    if include_previous and first != b"-":
        below = [m for m in members if first == b"+" or m <= first[1:]]
        result += below[-1:]
    if first != b"+" and last != b"-":
        result += [
            m
            for m in members
            if (first == b"-" or m >= first[1:]) and (last == b"+" or m < last[1:])
        ]
    return [split_timestamp(member) for member in result]


@settings(max_examples=80)
@given(
    samples=st.lists(st.tuples(STAMPS, SAMPLE_VALUES), max_size=60),
    queries=st.lists(st.tuples(BOUNDS, BOUNDS, st.booleans(), st.booleans()), max_size=8),
)
def test_samples_in_tail_and_blocks_read_like_the_zset(samples, queries):
    """Small tails and blocks, so that sealing, late samples and splits all happen."""
    with patched({"TAIL_MAX": 4, "BLOCK_MAX": 6}), tempfile.TemporaryDirectory() as directory:
        backend = LmdbBackend(f"{directory}/store", durability="none", map_size=1 << 20)
        members = sorted({pack_timestamp(stamp) + value for stamp, value in samples})
        try:
            for stamp, value in samples:
                backend.add_mutable(b"m", value, stamp)
            assert backend.last_seq == len(members)
            if members:
                assert backend.get(b"m") == split_timestamp(members[-1])
            for query in queries + [(-math.inf, math.inf, False, True)]:
                expected = redis_range(members, *query) if members else None
                assert backend.get_range(b"m", *query) == expected
            assert backend.verify() == []
            backend.delete(b"m")
            assert backend.get(b"m") == (None, None)
            for table in ("samples", "blocks"):
                with backend._store.env.begin() as txn:
                    assert txn.stat(getattr(backend._store.tables, table))["entries"] == 0
        finally:
            backend.close()


@contextlib.contextmanager
def patched(values: dict):
    from telstate.lmdb import settings

    saved = {name: getattr(settings, name) for name in values}
    for name, value in values.items():
        setattr(settings, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(settings, name, value)
