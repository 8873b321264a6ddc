"""LmdbBackend in one process: semantics beyond the contract suite, the log, snapshots, growth."""

from __future__ import annotations

import math
import os
import struct
import threading
import time

import lmdb
import numpy as np
import pytest

from telstate import ImmutableKeyError, KeyType, TelescopeState
from telstate.backend import ImmutableKeyUpdate, IndexedKeyUpdate, KeyUpdateBase, MutableKeyUpdate
from telstate.encoding import encode_value
from telstate.errors import ReadOnlyError, StoreError
from telstate.lmdb import LmdbBackend, replay
from telstate.log import Event, Op, Writer
from telstate.utils import pack_timestamp

INF = math.inf


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "store")


@pytest.fixture
def backend(path):
    backend = LmdbBackend(path, durability="none", writer_name="test")
    yield backend
    backend.close()


def members(backend: LmdbBackend, key: bytes) -> list[bytes]:
    samples = backend.get_range(key, -INF, INF, False, True)
    assert samples is not None
    return [pack_timestamp(ts) + value for value, ts in samples]


# --- opening ---------------------------------------------------------------------------


def test_new_store_is_created_with_parents_and_identity(tmp_path):
    path = tmp_path / "a" / "b" / "store"
    with LmdbBackend(path) as backend:
        identity = backend.uuid
        assert backend.last_seq == 0
        assert backend.path == str(path.resolve())
    assert sorted(os.listdir(path)) == ["data.mdb", "lock.mdb", "notify"]
    with LmdbBackend(path, readonly=True) as again:
        assert again.uuid == identity


def test_invalid_arguments(path):
    with pytest.raises(ValueError, match="durability"):
        LmdbBackend(path, durability="sometimes")
    with pytest.raises(ValueError, match="flush_interval"):
        LmdbBackend(path, flush_interval=0)


def test_readonly_needs_an_existing_store(path):
    with pytest.raises(StoreError, match="no telstate store"):
        LmdbBackend(path, readonly=True)
    assert not os.path.exists(path)


def test_refuses_non_empty_directory_and_files(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(StoreError, match="not empty"):
        LmdbBackend(tmp_path)
    assert os.listdir(tmp_path) == ["precious.txt"]
    with pytest.raises(StoreError, match="is a file"):
        LmdbBackend(tmp_path / "precious.txt")


def test_refuses_foreign_lmdb_environment(tmp_path):
    env = lmdb.open(str(tmp_path / "foreign"))
    with env.begin(write=True) as txn:
        txn.put(b"someone", b"else")
    env.close()
    with pytest.raises(StoreError, match="not a telstate store"):
        LmdbBackend(tmp_path / "foreign")
    with pytest.raises(StoreError, match="not a telstate store"):
        LmdbBackend(tmp_path / "foreign", readonly=True)


def test_closed_backend_raises(path):
    backend = LmdbBackend(path)
    backend.close()
    backend.close()
    with pytest.raises(StoreError, match="closed"):
        backend.get(b"a")
    with pytest.raises(StoreError, match="closed"):
        backend.add_mutable(b"a", b"v", 1.0)


def test_one_environment_per_process_shared_by_backends(path):
    first = LmdbBackend(path, durability="none")
    second = LmdbBackend(path, readonly=True)
    third = TelescopeState(f"lmdb://{path}").backend
    assert first._store is second._store is third._store
    first.add_mutable(b"k", b"v", 1.0)
    assert second.get(b"k") == (b"v", 1.0)
    first.close()
    assert second.get(b"k") == (b"v", 1.0)  # still open for the others
    with pytest.raises(ReadOnlyError):
        second.add_mutable(b"k", b"w", 2.0)
    third.add_mutable(b"k", b"w", 2.0)
    second.close()
    third.close()


def test_upgrade_to_writable_and_fsync(path):
    LmdbBackend(path).close()
    reader = LmdbBackend(path, readonly=True)
    assert not reader._store.writable
    writer = LmdbBackend(path, durability="fsync")
    assert reader._store.writable and reader._store.sync
    writer.add_mutable(b"k", b"v", 1.0)
    assert reader.get(b"k") == (b"v", 1.0)
    writer.close()
    reader.close()


# --- semantics the contract suite does not reach ----------------------------------------


def test_rejected_and_unchanged_writes_are_not_events(backend):
    backend.set_immutable(b"i", b"one")
    backend.add_mutable(b"m", b"x", 1.0)
    backend.set_indexed(b"x", b"s", b"v")
    assert backend.last_seq == 3
    assert backend.set_immutable(b"i", b"two") == b"one"
    backend.add_mutable(b"m", b"x", 1.0)
    assert backend.set_indexed(b"x", b"s", b"w") == b"v"
    backend.delete(b"absent")
    for call in (
        lambda: backend.add_mutable(b"i", b"v", 1.0),
        lambda: backend.set_indexed(b"m", b"s", b"v"),
        lambda: backend.set_immutable(b"x", b"v"),
    ):
        with pytest.raises(ImmutableKeyError):
            call()
    assert backend.last_seq == 3
    backend.clear()
    backend.clear()
    assert backend.last_seq == 4


def test_empty_and_binary_keys_values_and_sub_keys(backend):
    backend.set_immutable(b"", b"")
    backend.add_mutable(b"\x00", b"", 0.0)
    backend.set_indexed(b"\xff", b"", b"")
    assert backend.get(b"") == (b"", None)
    assert backend.get(b"\x00") == (b"", 0.0)
    assert backend.get_indexed(b"\xff", b"") == b""
    assert sorted(backend.keys(b"*")) == [b"", b"\x00", b"\xff"]
    assert backend.keys(b"?") == [b"\x00", b"\xff"]
    assert backend.verify() == []


def test_long_keys_sub_keys_and_values(backend):
    long_key = b"k" * 2000
    other_key = b"k" * 448 + b"different tail" * 10
    array = encode_value(np.arange(1024, dtype=np.float64))  # about 8 KB
    backend.set_immutable(long_key, array)
    backend.add_mutable(other_key, array, 5.0)
    backend.set_indexed(b"idx", b"s" * 600, array)
    backend.set_indexed(b"idx", b"s" * 599 + b"t", b"short")
    assert backend.get(long_key) == (array, None)
    assert backend.get(other_key) == (array, 5.0)
    assert backend.get_indexed(b"idx", b"s" * 600) == array
    assert backend.get_indexed(b"idx", b"s" * 601) is None
    assert backend.get(b"idx")[0] == {b"s" * 600: array, b"s" * 599 + b"t": b"short"}
    assert sorted(backend.keys(b"k*")) == sorted([long_key, other_key])
    assert backend.keys(b"k" * 2000) == [long_key]
    assert backend.key_type(long_key) == KeyType.IMMUTABLE
    assert backend.set_immutable(long_key, b"other") == array
    assert backend.verify() == []
    backend.delete(other_key)
    backend.delete(b"idx")
    assert backend.keys(b"*") == [long_key]
    assert backend.verify() == []


def test_long_values_keep_zset_order_and_dedupe(backend):
    prefix = b"p" * 460
    values = [prefix + bytes([tail]) * 40 for tail in (9, 1, 5)] + [b"short", prefix[:470]]
    for value in values + values:
        backend.add_mutable(b"m", value, 7.0)
    backend.add_mutable(b"m", values[0], 3.0)
    backend.add_mutable(b"m", b"later", 9.0)
    expected = sorted(pack_timestamp(ts) + v for v, ts in [(v, 7.0) for v in values])
    expected = [pack_timestamp(3.0) + values[0]] + expected + [pack_timestamp(9.0) + b"later"]
    assert members(backend, b"m") == expected
    assert backend.last_seq == len(values) + 2
    # The latest sample and the one before a start time are the greatest by value too.
    backend.add_mutable(b"n", values[0], 7.0)
    backend.add_mutable(b"n", values[1], 7.0)
    backend.add_mutable(b"n", values[2], 7.0)
    assert backend.get(b"n") == (max(values[:3]), 7.0)
    assert backend.get_range(b"n", 8.0, INF, True, False) == [(max(values[:3]), 7.0)]
    assert backend.get_range(b"m", 8.0, 8.0, True, False) == [(max(values), 7.0)]
    assert backend.verify() == []


def test_get_range_bounds_match_redis(backend):
    for ts in (0.0, 1.0, 2.0, 2.0, 3.0):
        backend.add_mutable(b"m", b"%g" % ts, ts)
    backend.add_mutable(b"m", b"2b", 2.0)

    def values(*args):
        return [v for v, _ in backend.get_range(b"m", *args)]

    assert values(-INF, INF, False, False) == [b"0", b"1", b"2", b"2b", b"3"]
    assert values(2.0, 2.0, False, True) == [b"2", b"2b"]
    assert values(2.0, 2.0, False, False) == []
    assert values(2.0, 2.0, True, False) == [b"1"]
    assert values(0.0, 0.0, True, True) == [b"0"]
    assert values(0.0, 0.0, False, False) == []
    assert values(INF, INF, True, False) == [b"3"]
    assert values(INF, INF, False, True) == []
    assert values(1.5, 3.0, True, False) == [b"1", b"2", b"2b"]
    # Redis gives the previous sample even when the range itself is empty.
    assert values(3.0, 1.0, True, False) == [b"2b"]
    assert values(-1.0, 1.0, True, False) == [b"0"]
    assert values(5e-324, 1.0, True, True) == [b"0", b"1"]
    assert backend.get_range(b"absent", 0.0, INF, True, True) is None


def test_reads_see_writes_of_the_same_process_at_once(backend):
    """The read cache never serves a result older than the last commit."""
    for i in range(50):
        backend.add_mutable(b"m", b"%d" % i, float(i))
        assert backend.get(b"m") == (b"%d" % i, float(i))
        backend.set_indexed(b"x", b"%d" % i, b"v")
        assert backend.get_indexed(b"x", b"%d" % i) == b"v"
        assert backend.get_indexed(b"x", b"%d" % (i + 1)) is None
    backend.delete(b"m")
    assert backend.get(b"m") == (None, None)
    value, _ = backend.get(b"x")
    value[b"mutated by caller"] = b""
    assert b"mutated by caller" not in backend.get(b"x")[0]


def test_get_indexed_errors(backend):
    backend.add_mutable(b"m", b"v", 1.0)
    with pytest.raises(KeyError):
        backend.get_indexed(b"absent", b"s")
    with pytest.raises(ImmutableKeyError, match="'m' is mutable"):
        backend.get_indexed(b"m", b"s")
    with pytest.raises(ImmutableKeyError, match="not mutable"):
        backend.set_immutable(b"i", b"v")
        backend.get_range(b"i", 0.0, INF, False, False)


def test_keys_patterns(backend):
    for key in (b"a", b"ab", b"abc", b"b*", b"c\\", b"[x]"):
        backend.set_immutable(key, b"v")
    assert sorted(backend.keys(b"a*")) == [b"a", b"ab", b"abc"]
    assert sorted(backend.keys(b"a?")) == [b"ab"]
    assert backend.keys(b"b\\*") == [b"b*"]
    assert backend.keys(b"\\[x]") == [b"[x]"]
    assert sorted(backend.keys(b"[ab]*")) == [b"a", b"ab", b"abc", b"b*"]
    assert backend.keys(b"zz*") == []


def test_dump_and_load_records_round_trip(backend, tmp_path):
    backend.set_immutable(b"i", b"value")
    for ts in (2.0, 1.0, 1.0):
        backend.add_mutable(b"m", b"x", ts)
    backend.set_indexed(b"x", b"s", b"v")
    with backend.snapshot() as snap:
        records = list(snap.records())
    assert sorted(records) == [
        (b"i", KeyType.IMMUTABLE, b"value"),
        (b"m", KeyType.MUTABLE, [pack_timestamp(1.0) + b"x", pack_timestamp(2.0) + b"x"]),
        (b"x", KeyType.INDEXED, {b"s": b"v"}),
    ]
    with LmdbBackend(tmp_path / "copy") as copy:
        assert copy.load_records(records) == 3
        assert copy.last_seq == 3  # the two samples in one add_mutable_many event
        assert [e.op for e in copy.events()] == [
            Op.SET_IMMUTABLE,
            Op.ADD_MUTABLE_MANY,
            Op.SET_INDEXED,
        ]
        assert copy.load_records(records) == 3
        assert copy.last_seq == 3  # nothing new
        for key in (b"i", b"m", b"x"):
            assert copy.dump(key) == backend.dump(key)
        assert copy.verify() == []


def test_load_records_in_batches(backend, monkeypatch):
    monkeypatch.setattr("telstate.lmdb.settings.LOAD_CHUNK", 7)
    samples = [pack_timestamp(float(i)) + b"v%d" % i for i in range(50)]
    assert backend.load_records([(b"m", KeyType.MUTABLE, samples)]) == 1
    # Pieces of 7 samples, each an add_mutable_many event in a transaction of its own.
    events = list(backend.events())
    assert backend.last_seq == len(events) == 8
    assert [len(event.values) for event in events] == [7] * 7 + [1]
    assert members(backend, b"m") == samples
    with pytest.raises(ImmutableKeyError):
        backend.load_records([(b"m", KeyType.IMMUTABLE, b"v")])


# --- the log ---------------------------------------------------------------------------


def test_events_record_every_write(backend):
    before = time.time()
    backend.set_immutable(b"i", b"value")
    backend.add_mutable(b"m", b"x", -0.0)
    backend.set_indexed(b"x", b"s", b"v")
    backend.delete(b"i")
    backend.clear()
    after = time.time()
    events = list(backend.events())
    writer = Writer(os.uname().nodename, os.getpid(), "test")
    assert [(e.seq, e.op, e.key, e.sub_key, e.value, e.timestamp) for e in events] == [
        (1, Op.SET_IMMUTABLE, b"i", None, b"value", None),
        (2, Op.ADD_MUTABLE, b"m", None, b"x", 0.0),
        (3, Op.SET_INDEXED, b"x", b"s", b"v", None),
        (4, Op.DELETE, b"i", None, None, None),
        (5, Op.CLEAR, None, None, None, None),
    ]
    assert all(e.writer == writer for e in events)
    times = [e.time for e in events]
    assert before <= times[0] and times == sorted(times) and times[-1] <= after
    assert list(backend.events(2, 3)) == events[1:3]
    assert list(backend.events(5)) == events[4:]
    assert list(backend.events(6)) == []
    assert list(backend.events(4, 2)) == []
    assert backend.last_seq == 5


def test_event_decoding_and_repr(backend):
    ts = TelescopeState(backend)
    ts.set_indexed("x", ("sub", 1), np.arange(3))
    ts.add("m", 2.5, ts=10.0)
    indexed, sample = backend.events()
    assert indexed.decode_sub_key() == ("sub", 1)
    np.testing.assert_array_equal(indexed.decode_value(), np.arange(3))
    assert sample.decode_value() == 2.5
    with pytest.raises(ValueError, match="no sub-key"):
        sample.decode_sub_key()
    assert "op=add_mutable" in repr(sample) and "timestamp=10.0" in repr(sample)
    assert sample == Event(*(getattr(sample, name) for name in Event.__slots__))
    assert sample != indexed


def test_events_of_keys_use_the_history_index(backend, monkeypatch):
    monkeypatch.setattr("telstate.lmdb.settings.LOG_CHUNK", 3)  # several chunks, streams cut short
    for i in range(10):
        backend.add_mutable(b"a", b"%d" % i, float(i))
        backend.add_mutable(b"b", b"%d" % i, float(i))
        if i == 4:
            backend.clear()
    a_events = list(backend.events(keys=[b"a"]))
    assert [e.seq for e in a_events] == [1, 3, 5, 7, 9, 11] + list(range(12, 21, 2))
    assert {e.op for e in a_events} == {Op.ADD_MUTABLE, Op.CLEAR}
    both = list(backend.events(4, 13, keys=[b"b", b"a", b"a"]))
    assert [e.seq for e in both] == list(range(4, 14))
    assert list(backend.events()) == list(backend.events(keys=[b"a", b"b"]))


def test_history_includes_deletes_and_the_clears_that_removed_the_key(backend):
    backend.clear()  # nothing to clear: no event
    backend.set_immutable(b"other", b"v")
    backend.clear()  # seq 2: key absent, not in its history
    backend.add_mutable(b"k", b"1", 1.0)  # 3
    backend.delete(b"k")  # 4
    backend.set_immutable(b"other", b"v")  # 5
    backend.clear()  # 6: k absent
    backend.set_indexed(b"k", b"s", b"v")  # 7: a new life as another type
    backend.clear()  # 8: removes it
    ops = [(e.seq, e.op) for e in backend.history(b"k")]
    assert ops == [(3, Op.ADD_MUTABLE), (4, Op.DELETE), (7, Op.SET_INDEXED), (8, Op.CLEAR)]
    assert list(backend.history(b"never")) == []


def test_replay_until_seq_and_time(path):
    backend = LmdbBackend(path, durability="none")
    ts = TelescopeState(backend)
    ts.add("rate", 1.5, immutable=True)
    ts.add("s", 1.0, ts=1.0)
    ts.add("s", 2.0, ts=2.0)
    middle = time.time()
    time.sleep(0.01)
    ts.delete("rate")
    ts.set_indexed("x", "a", 1)
    assert replay(path, until_seq=0).keys() == []
    state = replay(path, until_seq=2)
    assert state.get("rate") == 1.5 and state.get_range("s", st=0) == [(1.0, 1.0)]
    state = replay(path, until_time=middle)
    assert state.keys() == ["rate", "s"] and state.get("s") == 2.0
    state = replay(path)
    assert state.keys() == ["s", "x"] and state.get("x") == {"a": 1}
    assert replay(path, until_seq=4, until_time=middle).keys() == ["rate", "s"]
    backend.close()


def test_verify_reports_differences(backend):
    backend.set_immutable(b"i", b"v")
    backend.add_mutable(b"m", b"x", 1.0)
    backend.set_indexed(b"x", b"s", b"v")
    assert backend.verify() == []
    store = backend._store
    tables = store.tables
    with store.env.begin(write=True) as txn:  # damage the state behind the log's back
        record = bytearray(txn.get(b"\x01i", db=tables.keys))
        txn.put(b"\x01i", bytes(record[:-1]) + b"w", db=tables.keys)
        txn.delete(b"\x01x", db=tables.keys)
        txn.put(b"\x01ghost", bytes(record), db=tables.keys)
        txn.delete(struct.pack(">Q", 2), db=tables.log)
    problems = backend.verify()

    def found(prefix: str) -> bool:
        return any(problem.startswith(prefix) for problem in problems)

    assert found("key 'i': value differs between state and log (its last event: 1)")
    assert found("key 'x': in the log but not in the state (its last event: 3)")
    assert "key 'ghost': in the state but not in the log" in problems
    assert found("key 'm': in the state but not in the log")
    assert "log: seq 1 is followed by 3" in problems
    assert found("log: event 3 does not match its chain hash")
    assert any(p.startswith("history index") for p in problems)


# --- snapshots, waiting, growth ---------------------------------------------------------


def test_snapshot_is_consistent_while_writes_continue(backend):
    backend.add_mutable(b"m", b"a", 1.0)
    with backend.snapshot() as snap:
        assert (snap.seq, snap.uuid) == (1, backend.uuid)
        backend.add_mutable(b"m", b"b", 2.0)
        backend.set_immutable(b"i", b"v")
        records = list(snap.records())
    assert records == [(b"m", KeyType.MUTABLE, [pack_timestamp(1.0) + b"a"])]
    with pytest.raises(StoreError, match="not open"):
        list(snap.records())


def test_a_snapshot_stays_valid_while_the_store_grows(path):
    backend = LmdbBackend(path, durability="none")
    big = b"x" * 100_000
    backend.set_immutable(b"first", big)
    with backend.snapshot() as snap:
        for i in range(40):
            backend.add_mutable(b"m", big + b"%d" % i, float(i))
        assert list(snap.records()) == [(b"first", KeyType.IMMUTABLE, big)]
    assert len(members(backend, b"m")) == 40
    assert backend.verify() == []
    backend.close()


def test_monitor_keys_reports_updates_in_order(backend):
    monitor = backend.monitor_keys([b"m", b"x", b"i"])
    assert type(next(monitor)) is KeyUpdateBase
    assert monitor.send(0.01) is None
    backend.add_mutable(b"other", b"v", 1.0)
    backend.add_mutable(b"m", b"v1", 1.0)
    backend.add_mutable(b"m", b"v2", 2.0)
    backend.set_indexed(b"x", b"s", b"v")
    backend.set_immutable(b"i", b"v")
    backend.delete(b"i")
    updates = [monitor.send(1.0) for _ in range(5)]
    assert [(type(u), u.value) for u in updates[:4]] == [
        (MutableKeyUpdate, b"v1"),
        (MutableKeyUpdate, b"v2"),
        (IndexedKeyUpdate, b"v"),
        (ImmutableKeyUpdate, b"v"),
    ]
    assert updates[1].timestamp == 2.0 and updates[2].sub_key == b"s"
    assert type(updates[4]) is KeyUpdateBase
    assert monitor.send(0.01) is None
    monitor.close()


def test_wait_for_commit_wakes_on_a_commit_from_another_thread(backend):
    assert backend.wait_for_commit(0, timeout=0.02) == 0
    timer = threading.Timer(0.05, backend.add_mutable, (b"m", b"v", 1.0))
    start = time.monotonic()
    timer.start()
    assert backend.wait_for_commit(0, timeout=5.0) == 1
    assert time.monotonic() - start < 1.0
    timer.join()


def test_flush_and_batch_mode_housekeeper(path):
    backend = LmdbBackend(path, durability="batch", flush_interval=0.01)
    backend.add_mutable(b"m", b"v", 1.0)
    backend.flush()
    housekeeper = backend._store.housekeeper
    assert housekeeper is not None and housekeeper.is_alive()
    time.sleep(0.05)
    backend.close()
    assert not housekeeper.is_alive()


def test_a_reader_has_a_housekeeper_replaced_when_a_writer_reopens_the_store(path):
    LmdbBackend(path).close()
    reader = LmdbBackend(path, readonly=True)
    first = reader._store.housekeeper  # clears the reader slots of killed processes
    assert first is not None and first.is_alive()
    # Reopened for writing: the new housekeeper flushes at the writer's interval,
    # where the reader's would first sleep out its own (seconds).
    writer = LmdbBackend(path, durability="batch", flush_interval=0.01)
    assert not first.is_alive()
    second = writer._store.housekeeper
    assert second is not None and second.is_alive()
    writer.close()
    reader.close()
    assert not second.is_alive()


def test_readonly_backend_refuses_every_write(path):
    LmdbBackend(path).close()
    backend = LmdbBackend(path, readonly=True)
    for call in (
        lambda: backend.set_immutable(b"k", b"v"),
        lambda: backend.add_mutable(b"k", b"v", 1.0),
        lambda: backend.set_indexed(b"k", b"s", b"v"),
        lambda: backend.delete(b"k"),
        lambda: backend.clear(),
        lambda: backend.load_records([(b"k", KeyType.IMMUTABLE, b"v")]),
    ):
        with pytest.raises(ReadOnlyError, match="read-only"):
            call()
    assert backend.last_seq == 0
    backend.close()


def test_a_long_history_through_blocks_with_late_samples(backend):
    stamps = [float(i) for i in range(2000)]
    late = stamps[::7]
    for stamp in stamps:
        backend.add_mutable(b"m", b"%g" % stamp, stamp)
    for stamp in late:
        backend.add_mutable(b"m", b"late %g" % stamp, stamp)  # into sealed blocks
        backend.add_mutable(b"m", b"%g" % stamp, stamp)  # already there: no event
    expected = sorted(
        [pack_timestamp(s) + b"%g" % s for s in stamps]
        + [pack_timestamp(s) + b"late %g" % s for s in late]
    )
    assert backend.last_seq == len(expected)
    assert members(backend, b"m") == expected
    with backend._store.env.begin() as txn:
        assert txn.stat(backend._store.tables.blocks)["entries"] > 10
    assert backend.get_range(b"m", 700.5, 707.0, True, True) == [
        (b"late 700", 700.0),  # the greatest sample before the start
        *((b"%d" % i, float(i)) for i in range(701, 707)),
        (b"707", 707.0),
        (b"late 707", 707.0),
    ]
    assert backend.get(b"m") == (b"1999", 1999.0)
    assert backend.verify() == []


def test_a_full_map_is_an_error_and_the_store_stays_usable(path):
    backend = LmdbBackend(path, durability="none", map_size=1 << 20)
    backend.set_immutable(b"small", b"v")
    with pytest.raises(StoreError, match="is full"):
        backend.set_immutable(b"big", b"x" * (2 << 20))
    assert backend.keys(b"*") == [b"small"]
    backend.set_immutable(b"smaller", b"x" * 1000)
    assert backend.last_seq == 2 and backend.verify() == []
    backend.close()


def test_records_come_in_key_order_even_for_long_keys(backend):
    shared = b"k" * 448
    keys = [b"a", shared, shared + b"\x00", shared + b"z" * 40, shared + b"a" * 40]
    keys += [shared + b"m" * 40, b"k" * 449, b"z"]
    for key in keys:
        backend.set_immutable(key, key[-1:])
    backend.add_mutable(b"m", b"v", 1.0)
    assert [record[0] for record in backend.records()] == sorted(keys + [b"m"])
    assert backend.record(shared + b"z" * 40) == (shared + b"z" * 40, KeyType.IMMUTABLE, b"z")
    assert backend.record(b"m") == (b"m", KeyType.MUTABLE, [pack_timestamp(1.0) + b"v"])
    assert backend.record(b"absent") is None


def test_a_bounded_range_of_events_is_read_whole_across_chunks(backend, monkeypatch):
    monkeypatch.setattr("telstate.lmdb.settings.LOG_CHUNK", 3)
    for i in range(10):
        backend.add_mutable(b"a", b"%d" % i, float(i))
    assert [e.seq for e in backend.events(2, 9)] == list(range(2, 10))
    assert [e.seq for e in backend.events(1, 100)] == list(range(1, 11))
    assert [e.seq for e in backend.events(4, 6)] == [4, 5, 6]
    # A range past the end stops at the log's end: read again, it finds new events.
    found = list(backend.events(11, 20))
    backend.add_mutable(b"a", b"10", 10.0)
    assert found == [] and [e.seq for e in backend.events(11, 20)] == [11]
