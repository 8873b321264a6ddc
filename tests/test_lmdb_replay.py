"""Properties of the log: replay equals the live state, and every prefix equals a model."""

from __future__ import annotations

import contextlib
import math
import tempfile
from copy import copy

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from telstate import ImmutableKeyError, KeyType, log
from telstate.encoding import encode_value
from telstate.errors import StoreError
from telstate.lmdb import LmdbBackend, replay
from telstate.lmdb.layout import KeyRecord, name_key_of
from telstate.log import Op
from telstate.utils import display_str, pack_query_timestamp, pack_timestamp, split_timestamp

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


@settings(max_examples=60)
@given(
    operations=OPERATIONS,
    chunk=st.sampled_from([1, 2, 3, 1024]),
    samples=st.lists(st.tuples(STAMPS, SAMPLE_VALUES), max_size=30),
    damage=st.integers(0, 1 << 30),
)
def test_verify_in_any_chunk_size_passes_then_names_a_key_with_a_sample_taken_away(
    operations, chunk, samples, damage
):
    """verify replays runs of samples in bulk: chunks of every size, mixed with other
    events (deletes, clears, other value lengths), must agree with the state, and a
    sample missing from the state must be found."""
    with patched({"VERIFY_CHUNK": chunk}), tempfile.TemporaryDirectory() as directory:
        backend = LmdbBackend(f"{directory}/store", durability="none", map_size=1 << 20)
        try:
            for stamp, value in samples:
                backend.add_mutable(b"m", value, stamp)
            for name, *args in operations:
                with contextlib.suppress(ImmutableKeyError):
                    getattr(backend, name)(*args)
            assert backend.verify() == []
            mutable = [
                key for key in backend.keys(b"*") if backend.key_type(key) is KeyType.MUTABLE
            ]
            if not mutable:
                return
            key = mutable[damage % len(mutable)]
            store = backend._store
            with store.env.begin(write=True) as txn:  # take one sample away behind the log's back
                key_id = KeyRecord.decode(txn.get(name_key_of(key), db=store.tables.keys)).key_id
                cursor = txn.cursor(db=store.tables.samples)
                assert cursor.set_key(key_id)
                for _ in range(damage % cursor.count()):
                    cursor.next_dup()
                assert cursor.delete()
            assert backend.verify() == [
                f"key {display_str(key)}: value differs between state and log"
                f" (its last event: {list(backend.history(key))[-1].seq})"
            ]
        finally:
            backend.close()


RECORDS = st.one_of(
    st.binary(max_size=80),
    st.builds(
        lambda op, key, sub_key, value, stamp: (
            log.encode_record(op, 7, 1.5, key, sub_key, value, stamp) + bytes(log.CHAIN_SIZE)
        ),
        st.integers(0, 6),
        st.binary(max_size=5),
        st.binary(max_size=3),
        st.binary(max_size=4),
        st.sampled_from([0.0, -0.0, 1.0, 2.5, math.nan]),
    ),
)


@given(st.lists(RECORDS, max_size=8), st.binary(min_size=32, max_size=32))
def test_records_read_in_bulk_read_as_decode_record_reads_them_one_by_one(records, chain):
    """What verify reads in bulk (chain links, op codes, writers, keys, samples) is
    what the one-by-one functions of telstate.log give."""
    breaks, last = log.chain_breaks(records, chain)
    expected_breaks = []
    for index, record in enumerate(records):
        if not log.chain_matches(chain, record):
            expected_breaks.append(index)
        chain = log.record_chain(record)
    assert (breaks, last) == (expected_breaks, chain)
    decoded = []
    for record in records:
        try:
            decoded.append(log.decode_record(record))
        except ValueError:
            decoded.append((0, 0, 0.0, 0.0, b""))
    ops, writer_ids, keys = log.record_fields(records)
    assert list(zip(ops, writer_ids, keys)) == [(raw[0], raw[1], raw[4]) for raw in decoded]
    samples = log.sample_rows(records)
    if samples is not None:
        key, rows = samples
        assert all(raw[0] == log.ADD_MUTABLE and raw[4] == key for raw in decoded)
        assert [bytes(row) for row in rows] == [pack_timestamp(raw[3]) + raw[6] for raw in decoded]


def _flip_time(path, seq: int, low: bool) -> None:
    import struct

    import lmdb

    env = lmdb.open(str(path), max_dbs=16)
    with env.begin(write=True) as txn:
        db = env.open_db(b"log", txn=txn)
        record = txn.get(log.pack_seq(seq), db=db)
        appended = log.record_time(record)
        damaged = appended / 1e6 if low else appended * 1e9
        encoded = struct.pack("<d", appended)
        at = record.index(encoded)
        txn.put(
            log.pack_seq(seq), record[:at] + struct.pack("<d", damaged) + record[at + 8 :], db=db
        )
    env.close()


@pytest.mark.parametrize("low", [False, True], ids=["later", "earlier"])
def test_a_damaged_append_time_stops_a_replay_until_a_time_loudly(tmp_path, low):
    """Found by review: one flipped bit in an event's time made replay/export
    --until TIME stop there silently, dropping every later event."""
    import time

    path = tmp_path / "store"
    with LmdbBackend(path, durability="none") as backend:
        for i in range(30):
            backend.add_mutable(b"k", encode_value(i), float(i))
    _flip_time(path, 10, low)
    with pytest.raises(StoreError, match="damaged at event 1[01]"):
        replay(path, until_time=time.time() + 3600)
    with LmdbBackend(path, readonly=True) as backend, pytest.raises(StoreError, match="damaged"):
        backend.seq_until(time.time() + 3600)
    # By seq, and up to a time before the damage, replay still works.
    assert replay(path, until_seq=30).get_range("k", st=0)
