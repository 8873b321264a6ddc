"""The Redis sink's state machine, driven step by step against a real redis-server.

The store is a small in-memory stand-in with the event-log interface of
:class:`telstate.lmdb.LmdbBackend` (:class:`replicator.source.EventSource`),
so that every transition can be provoked deterministically; the
end-to-end tests run the real daemon on a real store.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest
import redis

from replicator.cursor import MirrorState, read_cursor
from replicator.redis_sink import RedisSink, SinkState, spare_lock_key
from replicator.verify import differences, mirror_contents, record_contents
from telstate import log as log_format
from telstate.backend import Record
from telstate.errors import ReadOnlyError
from telstate.log import Event, Op, Writer
from telstate.memory import MemoryBackend
from telstate.redis import MIRROR_CURSOR_DB, RedisBackend, mirror_cursor_key, update_message
from telstate.utils import KeyType, pack_timestamp

_WRITER = Writer("test", 0, None)


class _Snapshot:
    def __init__(self, seq: int, chain: bytes, store: uuid.UUID, records: list[Record]) -> None:
        self.seq = seq
        self.chain = chain
        self.uuid = store
        self._records = records

    def records(self) -> Iterator[Record]:
        return iter(self._records)


class StandInLog:
    """An in-memory store with an event log: writes that change nothing are no events."""

    def __init__(self, store: uuid.UUID | None = None) -> None:
        self.uuid = store or uuid.uuid4()
        self.path = "/stand-in"
        self.state = MemoryBackend()
        self.log: list[Event] = []
        self._commit = threading.Condition()

    @property
    def last_seq(self) -> int:
        return len(self.log)

    def chain_at(self, seq: int) -> bytes:
        if not 0 <= seq <= len(self.log):
            raise ValueError(f"no event {seq}")
        return self.log[seq - 1].chain if seq else log_format.genesis(self.uuid)

    def _append(self, op: Op, key: bytes | None, *fields) -> None:
        # A chain over the event's content (not its time), as the store's is over its bytes.
        padded = (list(fields) + [None, None, None])[:3]
        content = repr((op.value, key, *padded)).encode()
        chain = hashlib.sha256(self.chain_at(len(self.log)) + content).digest()
        with self._commit:
            seq = len(self.log) + 1
            self.log.append(Event(seq, time.time(), _WRITER, op, key, *padded, chain=chain))
            self._commit.notify_all()

    def set_immutable(self, key: bytes, value: bytes) -> None:
        if self.state.set_immutable(key, value) is None:
            self._append(Op.SET_IMMUTABLE, key, None, value)

    def add_mutable(self, key: bytes, value: bytes, timestamp: float) -> None:
        before = self.state.get_range(key, timestamp, timestamp, False, True) or []
        if (value, timestamp) not in before:
            self.state.add_mutable(key, value, timestamp)
            self._append(Op.ADD_MUTABLE, key, None, value, timestamp)

    def set_indexed(self, key: bytes, sub_key: bytes, value: bytes) -> None:
        if self.state.set_indexed(key, sub_key, value) is None:
            self._append(Op.SET_INDEXED, key, sub_key, value)

    def delete(self, key: bytes) -> None:
        if key in self.state:
            self.state.delete(key)
            self._append(Op.DELETE, key)

    def clear(self) -> None:
        if self.state.keys(b"*"):
            self.state.clear()
            self._append(Op.CLEAR, None)

    def events(self, start_seq: int = 1, end_seq: int | None = None) -> Iterator[Event]:
        return iter(self.log[max(start_seq, 1) - 1 : end_seq])

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[_Snapshot]:
        seq = self.last_seq
        yield _Snapshot(seq, self.chain_at(seq), self.uuid, list(self.state.records()))

    def wait_for_commit(self, after_seq: int, timeout: float | None = None) -> int:
        with self._commit:
            self._commit.wait_for(lambda: self.last_seq > after_seq, timeout)
            return self.last_seq

    def contents(self):
        return record_contents(self.state.records())

    def truncated(self, n: int) -> StandInLog:
        """The same store as it was after event `n` (as an older copy of it would be)."""
        older = StandInLog(self.uuid)
        for event in self.log[:n]:
            if event.op is Op.ADD_MUTABLE:
                older.add_mutable(event.key, event.value, event.timestamp)
            elif event.op is Op.SET_IMMUTABLE:
                older.set_immutable(event.key, event.value)
            elif event.op is Op.SET_INDEXED:
                older.set_indexed(event.key, event.sub_key, event.value)
            elif event.op is Op.DELETE:
                older.delete(event.key)
            else:
                older.clear()
        return older


def _fill(log: StandInLog, n: int = 20, prefix: bytes = b"") -> None:
    log.set_immutable(prefix + b"immutable", b"\xff\x01")
    for i in range(n):
        log.add_mutable(prefix + b"sensor", b"\xff%d" % i, 1000.0 + i)
        log.set_indexed(prefix + b"indexed", b"\x92%d" % i, b"\xff%d" % (i * i))
    log.add_mutable(prefix + b"other", b"\xff\x00", 5.0)


def _run(sink: RedisSink, until=None, steps: int = 200) -> None:
    """Step until the sink is idle and level with its log (or `until()` holds)."""
    for _ in range(steps):
        if until is not None and until():
            return
        step = sink.step()
        if until is None and step.idle:
            return
        if step.wait and not step.idle:
            time.sleep(min(step.wait, 0.05))
    raise AssertionError(f"sink did not settle: {sink.state}")


def _assert_exact(log: StandInLog, client: redis.Redis) -> None:
    assert differences(log.contents(), mirror_contents(client)) == []
    size, cursor = read_cursor(client)
    assert cursor is not None and cursor.seq == log.last_seq and cursor.keys == size
    assert cursor.state == MirrorState.READY and cursor.store == str(log.uuid)


@pytest.fixture
def mirror(redis_server, redis_client):
    """URL and client of a flushed database 0 of the session's server."""
    url = redis_server.url + "?db=0"
    yield url, redis_client


@pytest.fixture
def sinks():
    made: list[RedisSink] = []

    def make(log, url, **kwargs) -> RedisSink:
        kwargs.setdefault("check_interval", 0.0)
        kwargs.setdefault("backoff", (0.01, 0.05))
        sink = RedisSink(log, url, **kwargs)
        made.append(sink)
        return sink

    yield make
    for sink in made:
        sink.close()


def test_new_mirror_is_built_then_tailed(mirror, sinks):
    url, client = mirror
    log = StandInLog()
    _fill(log)
    sink = sinks(log, url)
    _run(sink)
    assert sink.state == SinkState.TAIL
    _assert_exact(log, client)
    log.delete(b"other")
    log.add_mutable(b"sensor", b"\xffnew", 5000.0)
    log.set_indexed(b"indexed", b"\x92new", b"\xffv")
    _run(sink)
    _assert_exact(log, client)


def test_cursor_is_not_among_the_mirrors_keys(mirror, sinks):
    url, client = mirror
    log = StandInLog()
    _fill(log)
    _run(sinks(log, url))
    keys = {b"immutable", b"sensor", b"indexed", b"other"}
    assert set(client.keys()) == keys
    assert set(RedisBackend(client).keys(b"*")) == keys
    katsdptelstate_redis = importlib.import_module("katsdptelstate.redis")
    assert set(katsdptelstate_redis.RedisBackend(client).keys(b"*")) == keys


def test_updates_are_published_in_katsdptelstate_format(mirror, sinks):
    url, client = mirror
    log = StandInLog()
    sink = sinks(log, url)
    _run(sink)
    pubsub = client.pubsub()
    pubsub.psubscribe(b"update/*")
    assert pubsub.get_message(timeout=1)["type"] == "psubscribe"
    log.set_immutable(b"i", b"\xffvalue")
    log.add_mutable(b"m", b"\xffsample", 1234.5)
    log.set_indexed(b"x", b"\x92sub", b"\xffv")
    _run(sink)
    received = [pubsub.get_message(timeout=1) for _ in range(3)]
    assert [(m["channel"], m["data"]) for m in received] == [
        (b"update/i", update_message(KeyType.IMMUTABLE, b"\xffvalue")),
        (b"update/m", update_message(KeyType.MUTABLE, pack_timestamp(1234.5) + b"\xffsample")),
        (b"update/x", update_message(KeyType.INDEXED, b"\xffv", b"\x92sub")),
    ]
    pubsub.close()


def test_clear_in_the_middle_of_a_batch(mirror, sinks):
    url, client = mirror
    log = StandInLog()
    _fill(log, prefix=b"a/")
    sink = sinks(log, url)
    _run(sink)
    _fill(log, prefix=b"b/")
    log.clear()
    _fill(log, n=3, prefix=b"c/")
    _run(sink)
    _assert_exact(log, client)
    assert set(client.keys()) == {b"c/immutable", b"c/sensor", b"c/indexed", b"c/other"}


def test_restarted_replicator_resumes_without_rebuilding(mirror, sinks, caplog):
    url, client = mirror
    log = StandInLog()
    _fill(log)
    _run(sinks(log, url))
    log.add_mutable(b"sensor", b"\xfflater", 9999.0)
    caplog.set_level(logging.INFO, logger="replicator")
    second = sinks(log, url)
    _run(second)
    assert "resuming" in caplog.text and "rebuilding" not in caplog.text
    _assert_exact(log, client)
    assert read_cursor(client)[1].owner == second.owner


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("flushdb", "0 keys where its cursor says 4"),
        ("flushall", "no cursor"),
        ("foreign key", "5 keys where its cursor says 4"),
        ("retyped key", "another type"),
        ("other store", "it holds store"),
        ("cursor ahead", "ahead of the log"),
    ],
)
def test_mirror_that_no_longer_matches_its_cursor_is_rebuilt(mirror, sinks, damage, reason, caplog):
    url, client = mirror
    log = StandInLog()
    _fill(log)
    sink = sinks(log, url)
    _run(sink)
    if damage == "flushdb":
        client.flushdb()
    elif damage == "flushall":
        client.flushall()
    elif damage == "foreign key":
        client.set(b"written by someone else", b"x")
    elif damage == "retyped key":
        # Same key count, so only the WRONGTYPE of the next write shows it.
        client.delete(b"sensor")
        client.set(b"sensor", b"x")
    elif damage == "other store":
        # Another store's replicator took the mirror; this one is restarted.
        other = StandInLog()
        _fill(other, prefix=b"other/")
        _run(sinks(other, url))
        assert set(client.keys()) == set(other.contents())
        sink = sinks(log, url)
    elif damage == "cursor ahead":
        # The same store restored from an older copy: its log is shorter.
        log = log.truncated(5)
        sink = sinks(log, url)
    caplog.set_level(logging.WARNING, logger="replicator")
    log.add_mutable(b"sensor", b"\xffafter", 7777.0)
    _run(sink, until=lambda: sink.seq == log.last_seq and sink.state == SinkState.TAIL)
    _run(sink)
    assert reason in caplog.text
    _assert_exact(log, client)


def test_displaced_replicator_stops_writing(mirror, sinks, caplog):
    url, client = mirror
    first, second = StandInLog(), StandInLog()
    _fill(first, prefix=b"first/")
    _fill(second, prefix=b"second/")
    sink1 = sinks(first, url, backoff=(0.01, 60.0))
    _run(sink1)
    sink2 = sinks(second, url)
    _run(sink2)
    first.add_mutable(b"first/sensor", b"\xff", 1.0)
    sink1.step()
    assert sink1.state == SinkState.CONFLICT
    assert "taken over" in caplog.text
    for _ in range(3):
        sink1.step()
    second.add_mutable(b"second/sensor", b"\xff", 1.0)
    _run(sink2)
    _assert_exact(second, client)


def test_redis_down_then_back_empty(sinks):
    from tests.servers import RedisServer

    with RedisServer() as server:
        log = StandInLog()
        _fill(log)
        sink = sinks(log, server.url)
        _run(sink)
        server.stop()
        log.add_mutable(b"sensor", b"\xffwhile down", 8888.0)
        for _ in range(5):
            step = sink.step()  # must not raise
            assert sink.state in (SinkState.BACKOFF, SinkState.CONNECT)
            time.sleep(step.wait)
        server.start()
        _run(sink, until=lambda: sink.seq == log.last_seq)
        _assert_exact(log, server.client())


def test_the_sink_says_when_redis_is_back_before_it_looks_at_the_mirror(sinks):
    """Found by a soak: after a Redis restart the mirror's cursor was back seconds
    before the write intake (waiting out its own retry delay) announced itself, and
    a client made in between found a read-only mirror. The daemon wakes the intake
    from this hook, which runs before the cursor is written again."""
    from tests.servers import RedisServer

    with RedisServer() as server:
        log = StandInLog()
        _fill(log)
        sink = sinks(log, server.url)
        cursors: list[Any] = []
        states: list[SinkState] = []

        def reconnected() -> None:
            cursors.append(read_cursor(server.client())[1])
            states.append(sink.state)

        sink.on_reconnect = reconnected
        _run(sink)
        assert cursors == []  # (the first connect is no reconnect)
        server.stop()
        step = sink.step()
        assert sink.state == SinkState.BACKOFF
        server.start()
        time.sleep(step.wait)
        _run(sink, until=lambda: sink.seq == log.last_seq)
        # Once a reconnect (twice if a pooled connection of before failed first),
        # and each time before the cursor was written again.
        assert cursors and set(cursors) == {None} and set(states) == {SinkState.CONNECT}
        calls = len(cursors)
        _run(sink)
        assert len(cursors) == calls  # (steps while connected call nothing)


def test_rebuild_in_chunks_and_a_cut_short_rebuild_is_redone(mirror, sinks):
    url, client = mirror
    log = StandInLog()
    for i in range(300):
        log.add_mutable(b"big", b"\xff%d" % i, float(i))
        log.set_indexed(b"wide", b"\x92%d" % i, b"\xff")
    sink = sinks(log, url, batch_events=40)
    sink.step()  # CONNECT -> REBUILD
    sink.stop.set()
    sink.step()  # gives up after the first chunk
    assert read_cursor(client)[1].state == MirrorState.REBUILDING
    _run(sinks(log, url, batch_events=40))
    _assert_exact(log, client)


def test_batches_are_bounded(mirror, sinks):
    url, client = mirror
    log = StandInLog()
    sink = sinks(log, url, batch_events=7)
    _run(sink)
    for i in range(30):
        log.add_mutable(b"s", b"\xff%d" % i, float(i))
    assert sink.step().applied == 7
    _run(sink)
    _assert_exact(log, client)


def _count_reads(log: StandInLog) -> list[int]:
    """Count the sink's reads of `log`'s events (one entry per read, its first seq)."""
    reads: list[int] = []
    events = log.events

    def counted(start_seq: int = 1, end_seq: int | None = None) -> Iterator[Event]:
        reads.append(start_seq)
        return events(start_seq, end_seq)

    log.events = counted  # type: ignore[method-assign]
    return reads


def test_handed_events_are_projected_without_reading_the_log(mirror, sinks):
    """The write intake hands its just-committed events over: no read of the log."""
    url, client = mirror
    log = StandInLog()
    _fill(log, 3)
    sink = sinks(log, url, batch_events=2)
    _run(sink)
    reads = _count_reads(log)
    for i in range(5):
        log.add_mutable(b"s", b"\xff%d" % i, float(i))
    handed = log.log[-5:]
    # In bounded batches, each taken from where the last one ended.
    assert [sink.step(events=handed).applied for _ in range(3)] == [2, 2, 1]
    assert reads == []
    _assert_exact(log, client)
    # Only seq and chain were sent: the cursor's other fields are still there.
    assert read_cursor(client)[1] == sink.cursor
    # Events the mirror holds already are no help: the next are read.
    log.set_immutable(b"later", b"\xff\x01")
    assert sink.step(events=handed).applied == 1
    assert reads == [log.last_seq]
    _assert_exact(log, client)


def test_an_event_committed_between_the_handed_ones_is_projected_in_order(mirror, sinks):
    """Another process's commit before or among the handed events is read from the log.

    Taking the handed events for the next ones regardless would leave that
    commit out of the mirror (and move its cursor past it).
    """
    url, client = mirror
    log = StandInLog()
    _fill(log, 3)
    sink = sinks(log, url)
    _run(sink)
    reads = _count_reads(log)
    # Another process's commit before the handed event: both are read from the log.
    log.add_mutable(b"local", b"\xff\x00", 1.0)
    log.set_immutable(b"remote0", b"\xff\x01")
    assert sink.step(events=log.log[-1:]).applied == 2
    assert reads == [log.last_seq - 1]
    _assert_exact(log, client)
    # Another's commit among the handed events: the batch ends before it.
    reads.clear()
    log.set_immutable(b"remote1", b"\xff\x01")
    first = log.log[-1]
    log.set_indexed(b"local2", b"\x92\x01", b"\xff\x02")
    log.set_immutable(b"remote2", b"\xff\x03")
    handed = [first, log.log[-1]]
    assert sink.step(events=handed).applied == 1
    assert reads == []
    assert sink.step(events=handed).applied == 2
    assert reads == [log.last_seq - 1]
    _assert_exact(log, client)


def test_cursor_database_is_refused_as_mirror(redis_server):
    with pytest.raises(ValueError, match="cursors"):
        RedisSink(StandInLog(), f"{redis_server.url}?db={MIRROR_CURSOR_DB}")


def test_telstate_client_of_a_mirror_refuses_writes(mirror, sinks, redis_server):
    url, client = mirror
    log = StandInLog()
    _fill(log)
    _run(sinks(log, url))
    backend = RedisBackend(redis_server.client())
    assert backend.get(b"immutable") == (b"\xff\x01", None)
    for write in (
        lambda: backend.set_immutable(b"k", b"\xff"),
        lambda: backend.add_mutable(b"k", b"\xff", 1.0),
        lambda: backend.set_indexed(b"k", b"\x92", b"\xff"),
        lambda: backend.delete(b"immutable"),
        backend.clear,
    ):
        with pytest.raises(ReadOnlyError, match="write to the store instead"):
            write()
    # The connection is still in its own database after the check.
    assert backend.keys(b"immutable") == [b"immutable"]
    # Other databases of the same server are not mirrors.
    other = RedisBackend(redis_server.client(db=1))
    assert other.set_immutable(b"k", b"\xff") is None


def test_mirror_check_works_on_fakeredis():
    server = fakeredis.FakeServer()
    plain = RedisBackend(fakeredis.FakeRedis(server=server))
    assert plain.set_immutable(b"k", b"\xff") is None
    fakeredis.FakeRedis(server=server, db=MIRROR_CURSOR_DB).hset(
        mirror_cursor_key(0), mapping={"store": "x", "host": "h", "path": "/p"}
    )
    mirror = RedisBackend(fakeredis.FakeRedis(server=server))
    with pytest.raises(ReadOnlyError, match="lmdb:///p on host h"):
        mirror.set_immutable(b"k2", b"\xff")
    assert mirror.keys(b"*") == [b"k"]


def test_redis_too_slow_to_answer_then_the_cursor_decides(sinks):
    """A step whose reply is lost may or may not have been applied: the cursor says which."""
    from tests.servers import RedisServer

    with RedisServer() as server:
        log = StandInLog()
        _fill(log)
        sink = sinks(log, server.url, socket_timeout=0.3)
        _run(sink)
        pubsub = server.client().pubsub()
        pubsub.subscribe(b"update/slow")
        assert pubsub.get_message(timeout=1)["type"] == "subscribe"
        server.process.send_signal(signal.SIGSTOP)
        try:
            log.add_mutable(b"slow", b"\xff", 1.0)
            sink.step()  # the script is sent, the reply never comes in time
            assert sink.state == SinkState.BACKOFF
        finally:
            server.process.send_signal(signal.SIGCONT)
        _run(sink, until=lambda: sink.seq == log.last_seq)
        _assert_exact(log, server.client())
        # Applied once (when the server woke), not again after the reconnection.
        assert pubsub.get_message(timeout=1)["channel"] == b"update/slow"
        assert pubsub.get_message(timeout=0.3) is None
        pubsub.close()


def test_rebuild_chunk_by_chunk_leaves_the_old_mirror_in_place(mirror, sinks, redis_server):
    url, client = mirror
    old = StandInLog()
    _fill(old, prefix=b"old/")
    _run(sinks(old, url))
    before = mirror_contents(client)
    new = StandInLog()
    for i in range(300):
        new.add_mutable(b"big", b"\xff%d" % i, float(i))
        new.set_indexed(b"wide", b"\x92%d" % i, b"\xff")
    sink = sinks(new, url, batch_events=40)
    pubsub = client.pubsub()
    pubsub.psubscribe(b"update/*")
    assert pubsub.get_message(timeout=1)["type"] == "psubscribe"
    spare = redis_server.client(db=sink.spare_db)
    calls = 0
    original = sink._apply_script

    def apply(**kwargs):
        # Before and after every script call of the rebuild, readers see the old mirror.
        nonlocal calls
        calls += 1
        if calls > 1:
            assert mirror_contents(client) == before
        result = original(**kwargs)
        if result[0] == 1 and b"W" not in kwargs["args"]:
            assert mirror_contents(client) == before
            assert pubsub.get_message(timeout=0.01) is None  # nothing published yet
        return result

    sink._apply_script = apply
    _run(sink)
    assert calls > 5
    _assert_exact(new, client)
    assert spare.dbsize() == 0  # the old mirror, swapped out, is gone
    published = set()
    while (message := pubsub.get_message(timeout=0.2)) is not None:
        published.add(message["channel"])
    assert published == {b"update/big", b"update/wide"}
    pubsub.close()


def test_a_spare_database_in_use_is_left_alone(mirror, sinks, redis_server, caplog):
    url, client = mirror
    log = StandInLog()
    _fill(log)
    spare = redis_server.client(db=3)
    spare.set(b"someone else's", b"data")
    sink = sinks(log, url, spare_db=3)
    for _ in range(3):
        sink.step()
    assert sink.state == SinkState.BACKOFF
    assert "database 3" in caplog.text and "--spare-db" in caplog.text
    assert spare.keys() == [b"someone else's"] and client.dbsize() == 0
    spare.flushdb()
    _run(sink, until=lambda: sink.state == SinkState.TAIL)
    _assert_exact(log, client)


def test_an_interrupted_rebuilds_spare_is_emptied_and_reused(mirror, sinks, redis_server):
    url, client = mirror
    log = StandInLog()
    for i in range(1000):
        log.add_mutable(b"big", b"\xff%d" % i, float(i))
    sink = sinks(log, url, batch_events=40)
    original = sink._apply_script
    calls = []

    def apply(**kwargs):
        calls.append(kwargs)
        if len(calls) == 2:  # the claim, then the first chunk: then stop
            sink.stop.set()
        return original(**kwargs)

    sink._apply_script = apply
    sink.step()  # CONNECT -> REBUILD
    sink.step()  # one chunk in the spare, then it gives up
    assert len(calls) == 2
    assert redis_server.client(db=sink.spare_db).zcard(b"big") == 160
    cursor = read_cursor(client)[1]
    assert cursor.state == MirrorState.REBUILDING and cursor.spare == sink.spare_db
    _run(sinks(log, url, batch_events=40))
    _assert_exact(log, client)
    assert redis_server.client(db=sink.spare_db).dbsize() == 0


def test_options_are_checked(redis_server):
    with pytest.raises(ValueError, match="at least one event"):
        RedisSink(StandInLog(), redis_server.url, batch_events=0)
    with pytest.raises(ValueError, match="spare database"):
        RedisSink(StandInLog(), redis_server.url + "?db=2", spare_db=2)
    with pytest.raises(ValueError, match="spare database"):
        RedisSink(StandInLog(), redis_server.url, spare_db=MIRROR_CURSOR_DB)


def test_every_key_a_script_touches_is_declared(mirror, sinks):
    """Rebuilds and tail steps send the keys they write in KEYS, not only in ARGV."""
    url, client = mirror
    log = StandInLog()
    _fill(log)
    calls: list[tuple[list[bytes], list]] = []
    sink = sinks(log, url)
    original = sink._apply_script

    def apply(keys, args):
        calls.append((list(keys), list(args)))
        return original(keys=keys, args=args)

    sink._apply_script = apply
    _run(sink)
    log.add_mutable(b"sensor", b"\xffnext", 1e6)
    log.delete(b"other")
    _run(sink)
    names = set(log.contents()) | {b"other"}
    for keys, args in calls:
        assert keys[0] == mirror_cursor_key(0)
        assert not names & {arg for arg in args if isinstance(arg, bytes)}  # only in KEYS
    declared = set().union(*(keys for keys, _ in calls))
    assert set(log.contents()) | {b"other"} <= declared


def _wide(tag: bytes, n: int = 100) -> StandInLog:
    """A store whose one indexed key has the same name and sub-keys as any other's."""
    log = StandInLog()
    for i in range(n):
        log.set_indexed(b"wide", b"\x92%d" % i, b"\xff" + tag + b"%d" % i)
    return log


def test_mirrors_sharing_a_spare_rebuild_one_at_a_time(redis_server, sinks, caplog):
    """Two mirrors (db 0 and db 1) with the default spare: the second waits for the first."""
    a_log, b_log = _wide(b"A"), _wide(b"B")
    a = sinks(a_log, redis_server.url + "?db=0", batch_events=5)
    b = sinks(b_log, redis_server.url + "?db=1", batch_events=5)
    assert a.spare_db == b.spare_db
    original = a._apply_script
    b_states = []

    def apply(**kwargs):
        result = original(**kwargs)
        if len(b_states) == 0:  # right after A's claim, while the spare is still empty
            b.step()  # CONNECT -> REBUILD
            b.step()  # its claim
            b_states.append(b.state)
        return result

    a._apply_script = apply
    _run(a)
    assert b_states == [SinkState.BACKOFF]
    assert "spare for rebuilds, is in use by the rebuild of mirror database 0" in caplog.text
    _run(b)
    _assert_exact(a_log, redis_server.client(db=0))
    _assert_exact(b_log, redis_server.client(db=1))
    assert redis_server.client(db=MIRROR_CURSOR_DB).exists(spare_lock_key(a.spare_db)) == 0


def test_a_spare_that_is_another_mirrors_database_is_refused(redis_server, sinks, caplog):
    empty = StandInLog()
    _run(sinks(empty, redis_server.url + "?db=3", spare_db=4))  # an empty mirror, db 3
    log = StandInLog()
    _fill(log)
    sink = sinks(log, redis_server.url + "?db=0", spare_db=3)
    for _ in range(3):
        sink.step()
    assert sink.state == SinkState.BACKOFF
    assert "database 3" in caplog.text and "is the database of another mirror" in caplog.text
    assert redis_server.client(db=3).dbsize() == 0  # its readers saw nothing of it


def test_a_stale_lock_is_taken_over(redis_server, sinks):
    """A replicator cut short in spare 14, restarted with spare 13: 14 is free again."""
    a_log = StandInLog()
    for i in range(500):
        a_log.add_mutable(b"big", b"\xff%d" % i, float(i))
    a = sinks(a_log, redis_server.url + "?db=0", batch_events=40)
    original = a._apply_script
    calls = []

    def apply(**kwargs):
        calls.append(1)
        if len(calls) == 2:
            a.stop.set()
        return original(**kwargs)

    a._apply_script = apply
    a.step()
    a.step()
    assert redis_server.client(db=a.spare_db).dbsize() == 1  # A's partial rebuild
    _run(sinks(a_log, redis_server.url + "?db=0", spare_db=13, batch_events=40))
    b_log = _wide(b"B")
    _run(sinks(b_log, redis_server.url + "?db=1"))
    _assert_exact(a_log, redis_server.client(db=0))
    _assert_exact(b_log, redis_server.client(db=1))


def test_a_foreign_write_to_the_old_mirror_does_not_hold_a_rebuild_up(mirror, sinks, caplog):
    url, client = mirror
    log = StandInLog()
    _fill(log, n=300)
    _run(sinks(StandInLog(), url))  # an old mirror, to be replaced
    log_sink = sinks(log, url, batch_events=20)
    original = log_sink._apply_script
    calls = []

    def apply(**kwargs):
        calls.append(kwargs["args"][3])
        if len(calls) % 3 == 0:  # a client writes to the old mirror now and then
            client.set(b"legacy-writer-%d" % len(calls), b"x")
        return original(**kwargs)

    log_sink._apply_script = apply
    _run(log_sink)
    assert calls.count("claim") == 1  # never restarted
    _assert_exact(log, client)  # the foreign keys went with the old mirror


def test_waiters_are_woken_by_the_next_replicator_if_one_dies_after_the_swap(mirror, sinks):
    url, client = mirror
    log = StandInLog()
    _fill(log, n=5)
    dying = sinks(log, url)
    dying._wake_waiters = lambda: None  # killed right after the swap
    _run(dying)
    assert read_cursor(client)[1].state == MirrorState.READY
    pubsub = client.pubsub()
    pubsub.psubscribe(b"update/*")
    assert pubsub.get_message(timeout=1)["type"] == "psubscribe"
    _run(sinks(log, url))  # resumes without a rebuild, and wakes the waiters
    published = []
    while (message := pubsub.get_message(timeout=0.2)) is not None:
        published.append((message["channel"], message["data"]))
    newest = pack_timestamp(1004.0) + b"\xff4"
    assert (b"update/sensor", update_message(KeyType.MUTABLE, newest)) in published
    assert (b"update/immutable", update_message(KeyType.IMMUTABLE, b"\xff\x01")) in published
    indexed = [data for channel, data in published if channel == b"update/indexed"]
    assert len(indexed) == 5
    assert {channel for channel, _ in published} == {
        b"update/sensor",
        b"update/immutable",
        b"update/indexed",
        b"update/other",
    }
    _run(sinks(log, url))  # woken once: the next replicator publishes nothing
    assert pubsub.get_message(timeout=0.2) is None
    pubsub.close()


def test_keys_that_vanish_while_waiters_are_woken_are_skipped(mirror, sinks, monkeypatch):
    """Found by a soak: a key deleted between the wake-up's TYPE and GET crashed the daemon.

    (A client of an unprotected mirror deleted keys; Redis restarting does the same.)
    """
    url, client = mirror
    log = StandInLog()
    _fill(log, n=5)
    dying = sinks(log, url)
    dying._wake_waiters = lambda: None  # killed right after the swap
    _run(dying)
    pipeline = type(client.pipeline())
    execute = pipeline.execute

    def vanishing(self, *args, **kwargs):
        types = all(command[0][0] == "TYPE" for command in self.command_stack)
        result = execute(self, *args, **kwargs)
        if types and result:
            # Between the TYPE and the reads: gone, or replaced by another type.
            client.delete(b"immutable", b"sensor")
            client.set(b"indexed", b"now a string")
        return result

    monkeypatch.setattr(pipeline, "execute", vanishing)
    pubsub = client.pubsub()
    pubsub.psubscribe(b"update/*")
    assert pubsub.get_message(timeout=1)["type"] == "psubscribe"
    resumed = sinks(log, url)
    resumed._wake_waiters()  # raised TypeError (a None value) before
    channels = set()
    while (message := pubsub.get_message(timeout=0.2)) is not None:
        channels.add(message["channel"])
    assert channels == {b"update/other"}
    pubsub.close()


def test_rebuild_calls_are_bounded_by_bytes(mirror, sinks):
    """Large samples: no script call carries much more than batch_bytes."""
    url, client = mirror
    log = StandInLog()
    for i in range(40):
        log.add_mutable(b"images", b"\xff" + bytes(100_000) + b"%d" % i, float(i))
        log.set_indexed(b"frames", b"\x92%d" % i, b"\xff" + bytes(50_000))
    sink = sinks(log, url, batch_bytes=300_000)
    original = sink._apply_script
    sizes = []

    def apply(keys, args):
        sizes.append(sum(len(arg) for arg in args if isinstance(arg, bytes)))
        return original(keys=keys, args=args)

    sink._apply_script = apply
    _run(sink)
    _assert_exact(log, client)
    assert len(sizes) > 10 and max(sizes) < 300_000 + 100_100


def test_a_clients_endless_script_is_waited_out(tmp_path, sinks, caplog):
    from tests.servers import RedisServer

    with RedisServer(directory=tmp_path) as server:
        admin = server.client()
        admin.config_set("busy-reply-threshold", 100)
        log = StandInLog()
        _fill(log)
        sink = sinks(log, f"unix://{server.socket}?db=0", socket_timeout=30)
        _run(sink)
        looping = threading.Thread(
            target=_eval_quietly, args=(server.client(), "while true do end")
        )
        looping.start()
        deadline = time.monotonic() + 10
        while "busy running a script" not in caplog.text:
            assert time.monotonic() < deadline, caplog.text
            sink.step()
        assert "refused a command" not in caplog.text
        admin.script_kill()
        looping.join(10)
        log.add_mutable(b"sensor", b"\xffafter", 1e6)
        _run(sink, until=lambda: sink.seq == log.last_seq)
        _assert_exact(log, server.client())
        sink.close()


def _eval_quietly(client: redis.Redis, script: str) -> None:
    with contextlib.suppress(redis.ResponseError):
        client.eval(script, 0)


# --- fencing after a promotion ------------------------------------------------------------


def _promoted(old: StandInLog, n: int, path: str = "/new") -> StandInLog:
    """A follower of `old` made at event `n`, then promoted (its promote event is n + 1)."""
    new = old.truncated(n)
    new.path = path
    new._append(Op.PROMOTE, None)
    return new


def _old_and_promoted(old_path: str | None = None) -> tuple[StandInLog, StandInLog]:
    """A filled store (at `old_path`, if given) and a follower of it promoted at its end."""
    old = StandInLog()
    if old_path is not None:
        old.path = old_path
    _fill(old)
    return old, _promoted(old, old.last_seq)


def _record(client: redis.Redis, new: StandInLog) -> None:
    """Record `new`'s promotion, as the daemon of the promoted store does."""
    from replicator.promotion import PromotionScan, read_promotion, record_promotion

    promotion = PromotionScan(new).latest()
    assert promotion is not None
    assert record_promotion(client, 0, promotion, read_promotion(client, 0))


def test_a_step_of_the_old_primary_is_refused_once_a_promotion_is_recorded(mirror, sinks):
    # Found by review: the mirror's script checked the cursor's owner, not the
    # promotion, so an old primary that held the mirror (Redis had forgotten the
    # promotion, then the new primary's daemon recorded it again) went on
    # moving it, and the replies sent with its steps went out.
    url, client = mirror
    old, new = _old_and_promoted("/old")
    sink = sinks(old, url, check_interval=3600.0)  # its idle check does not come
    _run(sink)
    _record(client, new)
    before = read_cursor(client)
    old.set_immutable(b"written into the old primary", b"\xff\x01")
    for _ in range(3):
        sink.step()
    assert sink.state == SinkState.FENCED and "does not hold that event" in sink.fenced
    assert sink.promotion is None
    assert read_cursor(client) == before
    assert b"written into the old primary" not in client.keys()


def test_an_idle_old_primary_notices_a_promotion_recorded_again(mirror, sinks):
    # An old primary's daemon that holds the mirror while no write comes reads
    # the promotion hash at each check: it is fenced before any step of its.
    url, client = mirror
    old, new = _old_and_promoted()
    sink = sinks(old, url)
    _run(sink)
    assert sink.state == SinkState.TAIL and sink.promotion == b""
    _record(client, new)
    for _ in range(3):
        sink.step()
    assert sink.state == SinkState.FENCED


def test_the_promoted_stores_replicator_takes_the_mirror_back_from_the_old_primary(
    mirror, sinks, caplog
):
    # Found by review: Redis restarted empty (the promotion hash gone) while the
    # new primary's daemon was stopped; the old primary's daemon rebuilt the
    # mirror from its abandoned history. The new primary's daemon recorded the
    # promotion again but then waited in CONFLICT for good: nobody served the
    # mirror once the old primary was fenced.
    url, client = mirror
    old, new = _old_and_promoted("/old")
    new.set_immutable(b"written to the new primary", b"\xff\x02")
    new_sink = sinks(new, url, backoff=(0.01, 60.0))
    _run(new_sink)
    _assert_exact(new, client)
    client.flushall()  # Redis restarted empty
    old_sink = sinks(old, url)
    _run(old_sink)
    old.set_immutable(b"written into the old primary", b"\xff\x01")  # past the promote event
    _run(old_sink)
    _assert_exact(old, client)
    _run(new_sink, until=lambda: new_sink.state == SinkState.TAIL and new_sink.rebuilds == 2)
    _run(new_sink)
    assert "taking the mirror over" in caplog.text
    _assert_exact(new, client)
    cursor = read_cursor(client)[1]
    assert cursor.owner == new_sink.owner and cursor.path == "/new"
    for _ in range(3):
        old_sink.step()
    assert old_sink.state == SinkState.FENCED
    _assert_exact(new, client)


def test_a_takeover_from_an_old_primary_at_a_prefix_continues_its_mirror(mirror, sinks):
    # The old primary's cursor is before the promote event (its history and the
    # promoted store's agree up to it): continued, not rebuilt, and the cursor
    # names the new store, not the old primary.
    url, client = mirror
    old = StandInLog()
    old.path = "/old"
    _fill(old)
    old_sink = sinks(old, url)
    _run(old_sink)
    assert read_cursor(client)[1].path == "/old"
    new = _promoted(old, old.last_seq)
    new_sink = sinks(new, url)
    _run(new_sink)
    _assert_exact(new, client)
    assert new_sink.rebuilds == 0
    cursor = read_cursor(client)[1]
    assert (cursor.owner, cursor.path, cursor.host) == (
        new_sink.owner,
        "/new",
        socket.gethostname(),
    )
    # Displaced by the promoted store's claim, the old primary is fenced.
    old.set_immutable(b"written into the old primary", b"\xff\x01")
    for _ in range(3):
        old_sink.step()
    assert old_sink.state == SinkState.FENCED
    # Redis forgets the promotion and the cursor is the old primary's again, at
    # a seq before the promote event: the promoted store's replicator continues it.
    client.flushall()
    prefix = old.truncated(old.last_seq - 1)  # up to the promote event's seq, excluded
    _run(sinks(prefix, url))
    assert new_sink.rebuilds == 0
    _run(new_sink, until=lambda: read_cursor(client)[1].owner == new_sink.owner)
    _run(new_sink)
    _assert_exact(new, client)
    assert new_sink.rebuilds == 0


def _write_promotion(server: Any, new: StandInLog, **changed: str) -> None:
    """Write `new`'s promotion hash by hand, with the fields in `changed` spelled as given."""
    from replicator.promotion import PromotionScan, promotion_key

    promotion = PromotionScan(new).latest()
    assert promotion is not None
    fields = promotion.fields()
    mapping = {**dict(zip(fields[::2], fields[1::2])), **changed}
    control = server.client(db=MIRROR_CURSOR_DB)
    control.hset(promotion_key(0), mapping=mapping)
    control.close()


@pytest.mark.parametrize("spelling", ["+{}", "0{}", " {}", "{} ", "{}_0", "{}.0", "\u0661{}"])
def test_a_promotion_seq_not_spelled_as_a_daemon_writes_it_fences(
    mirror, sinks, redis_server, spelling
):
    # Found by review: int() read "+5" (or "05", " 5", "1_0") as 5, the sink
    # passed b"5" to its script, which compared it with the raw "+5" and refused
    # every step: 3815 steps in 2 s, none waiting, each logging a warning.
    from replicator.promotion import DamagedPromotion, read_promotion

    url, client = mirror
    old, new = _old_and_promoted()
    seq = old.last_seq + 1
    _write_promotion(redis_server, new, seq=spelling.format(seq))
    with pytest.raises(DamagedPromotion):
        read_promotion(client, 0)
    sink = sinks(new, url)
    steps = [sink.step() for _ in range(5)]
    assert sink.state == SinkState.FENCED and "cannot be read" in sink.fenced
    assert all(step.wait > 0 for step in steps)
    assert read_cursor(client)[1] is None


@pytest.mark.parametrize(
    "field, value",
    [
        ("seq", "9" * 30),  # struct.error in the store's chain_at: a traceback, not a fence
        ("seq", str(1 << 63)),
        ("store", "UPPER"),  # the store's UUID in upper case: "not concerned" without the check
        ("chain", "AB" * 32),
        ("chain", "ab" * 31),
    ],
)
def test_a_promotion_field_out_of_range_fences_a_real_store(
    tmp_path, mirror, sinks, redis_server, field, value
):
    from telstate.lmdb import LmdbBackend

    url, client = mirror
    store = LmdbBackend(str(tmp_path / "store"), durability="none")
    try:
        store.set_immutable(b"k", b"\xff\x01")
        if value == "UPPER":
            value = str(store.uuid).upper()
        fields = {"store": str(store.uuid), "seq": "1", "chain": "00" * 32, field: value}
        control = redis_server.client(db=MIRROR_CURSOR_DB)
        control.hset(b"telstate-replicator:promotion:0", mapping=fields)
        control.close()
        sink = sinks(store, url)
        for _ in range(3):
            sink.step()
        assert sink.state == SinkState.FENCED and "cannot be read" in sink.fenced
    finally:
        store.close()


def test_a_step_refused_for_a_promotion_the_sink_cannot_explain_waits(
    mirror, sinks, redis_server, monkeypatch
):
    # The sink and the scripts disagreeing on how the promotion is named
    # (here: a sink that names it in upper case; before the parser was strict,
    # a seq of "+N" read as N did it): the script refuses every step for the
    # promotion, the hash read again names the same one. The sink backs off
    # instead of stepping again at once, for ever.
    import replicator.redis_sink

    url, client = mirror
    old, new = _old_and_promoted()
    _record(client, new)
    monkeypatch.setattr(
        replicator.redis_sink,
        "promotion_token",
        lambda promotion: b"" if promotion is None else promotion.chain.upper().encode(),
    )
    sink = sinks(new, url, backoff=(0.5, 5.0))
    steps = [sink.step() for _ in range(20)]
    assert sum(1 for step in steps if step.wait == 0) <= 2, steps
    assert max(step.wait for step in steps) > 4.0  # the longest delay, at once
    assert sink.state == SinkState.BACKOFF
    assert read_cursor(client)[1] is None


def _copy_of(new: StandInLog) -> StandInLog:
    """Another copy of `new` as it is now (a follower or backup of it: same events, chains)."""
    copy = StandInLog(new.uuid)
    copy.log = list(new.log)
    for event in new.log:  # its keys (a stand-in log's truncated() takes a promotion for a clear)
        if event.op is Op.ADD_MUTABLE:
            copy.state.add_mutable(event.key, event.value, event.timestamp)
        elif event.op is Op.SET_IMMUTABLE:
            copy.state.set_immutable(event.key, event.value)
        elif event.op is Op.SET_INDEXED:
            copy.state.set_indexed(event.key, event.sub_key, event.value)
        else:
            assert event.op is Op.PROMOTE
    copy.path = "/copy"
    return copy


def test_a_lagging_copy_of_the_promoted_store_leaves_the_mirror_to_it(mirror, sinks):
    # Found by review: a copy of the promoted store (it holds the recorded
    # promotion) whose replicator had claimed the mirror, displaced by the
    # promoted store's own replicator further ahead, took "ahead of my log" for
    # "of the old primary's history": it took the mirror back and rebuilt it at
    # its older seq (the new primary's acknowledged write vanished from it).
    url, client = mirror
    old, new = _old_and_promoted()
    lagging = _copy_of(new)
    lag_sink = sinks(lagging, url)
    _run(lag_sink)
    assert lag_sink.state == SinkState.TAIL
    new.set_immutable(b"acknowledged by the new primary", b"\xff\x07")
    new_sink = sinks(new, url)
    _run(new_sink)
    _assert_exact(new, client)
    for _ in range(10):
        lag_sink.step()
    assert lag_sink.state == SinkState.CONFLICT
    for _ in range(10):
        new_sink.step()
    assert new_sink.state == SinkState.TAIL
    _assert_exact(new, client)
    assert read_cursor(client)[1].owner == new_sink.owner
    assert lag_sink.rebuilds == 1 and new_sink.rebuilds == 0  # (the first build)


def test_two_diverged_copies_of_the_promoted_store_do_not_take_the_mirror_from_each_other(
    mirror, sinks
):
    # Found by review: two copies that hold the recorded promotion, then
    # diverged (a backup of the new primary started with its own daemon on the
    # same mirror), each took the other's cursor for the old primary's and took
    # the mirror back, rebuilding it, for ever.
    url, client = mirror
    old, new = _old_and_promoted()
    copy = _copy_of(new)
    new.set_immutable(b"new's", b"\xff\x01")
    copy.set_immutable(b"copy's", b"\xff\x02")
    a, b = sinks(new, url), sinks(copy, url)
    _run(a)
    owners = []
    for _ in range(6):
        for sink in (b, a):
            for _ in range(20):
                sink.step()
            owners.append(read_cursor(client)[1].owner)
    # b claims the mirror first (it had never claimed it), then a is displaced
    # for good: neither takes it back.
    assert set(owners) == {b.owner}
    assert a.state == SinkState.CONFLICT and a.rebuilds == 1 and b.rebuilds == 1
    _assert_exact(copy, client)


def test_the_promoted_stores_replicator_records_the_promotion_again_while_it_writes(mirror, sinks):
    # Redis forgets the promotion (its hash alone here) while the promoted
    # store's replicator holds the mirror: its next step is refused, it records
    # the promotion again and steps on, without waiting.
    from replicator.promotion import promotion_key, read_promotion

    url, client = mirror
    old, new = _old_and_promoted()
    sink = sinks(new, url, check_interval=3600.0)  # no idle check: the step is refused
    _run(sink)
    _eval_quietly(
        client,
        f"redis.call('SELECT', {MIRROR_CURSOR_DB});"
        f" redis.call('DEL', '{promotion_key(0).decode()}')",
    )
    assert read_promotion(client, 0) is None
    new.set_immutable(b"after the promotion was forgotten", b"\xff\x03")
    steps = [sink.step() for _ in range(3)]
    assert sink.state == SinkState.TAIL and all(step.wait == 0 for step in steps[:2])
    _assert_exact(new, client)
    assert read_promotion(client, 0).seq == old.last_seq + 1


def test_a_cursor_of_before_is_read_by_its_history(mirror, sinks, caplog):
    # A cursor without the promotion field (written by a replicator of before):
    # taken over if it ends before the promote event, left alone if it is
    # ahead of this store's log.
    url, client = mirror
    old, new = _old_and_promoted()
    new_sink = sinks(new, url)
    _run(new_sink)
    assert read_cursor(client)[1].promotion == f"{old.last_seq + 1}:{new.log[-1].chain.hex()}"
    key = mirror_cursor_key(0).decode()

    def rewrite(owner: str, seq: int) -> None:
        _eval_quietly(
            client,
            f"redis.call('SELECT', {MIRROR_CURSOR_DB});"
            f" redis.call('HDEL', '{key}', 'promotion');"
            f" redis.call('HSET', '{key}', 'owner', '{owner}', 'seq', '{seq}')",
        )

    rewrite("before:1", old.last_seq - 1)
    assert read_cursor(client)[1].promotion is None
    new_sink.step()
    assert "taking the mirror over" in caplog.text
    _run(new_sink)
    _assert_exact(new, client)
    rewrite("before:2", new.last_seq + 5)
    for _ in range(5):
        new_sink.step()
    assert new_sink.state == SinkState.CONFLICT


def test_a_promotion_at_the_same_seq_of_another_chain_fences_steps_and_replies(
    mirror, sinks, redis_server
):
    # Found by review: the scripts compared the promotion's seq, not its chain.
    # Two followers promoted at the same seq (split brain), Redis forgot the
    # first one's record and the second recorded its own: the first's daemon
    # still moved the mirror, and its replies still went out.
    from replicator.intake import GROUP, _reply_source
    from replicator.promotion import PromotionScan, promotion_key, record_promotion
    from telstate.remote import reply_stream_key, request_stream_key

    url, client = mirror
    old = StandInLog()
    old.path = "/old"
    _fill(old)
    first = _promoted(old, old.last_seq, "/first")
    second = old.truncated(old.last_seq)
    second._append(Op.PROMOTE, None, None, b"another promotion")
    ours, theirs = PromotionScan(first).latest(), PromotionScan(second).latest()
    assert ours.seq == theirs.seq and ours.chain != theirs.chain
    sink = sinks(first, url, check_interval=3600.0)  # no idle check: the step is refused
    _run(sink)
    promotion = sink.promotion
    assert promotion
    control = redis_server.client(db=MIRROR_CURSOR_DB)
    control.delete(promotion_key(0))  # Redis forgot it; the other follower records its own
    assert record_promotion(control, 0, theirs, None)
    # The replies' script, with the promotion the first's daemon knows.
    reply = control.register_script(_reply_source())
    keys = [request_stream_key(0), mirror_cursor_key(0), promotion_key(0)]
    keys.append(reply_stream_key(0, b"w"))
    args = [MIRROR_CURSOR_DB, GROUP, 1, str(first.uuid), first.last_seq, promotion]
    args += [10**6, b"id", b"ok", b"", b"", b""]
    assert reply(keys=keys, args=args) == 0
    control.close()
    before = read_cursor(client)
    first.set_immutable(b"written into the first", b"\xff\x01")
    for _ in range(3):
        sink.step()
    assert sink.state == SinkState.FENCED and "does not hold that event" in sink.fenced
    assert read_cursor(client) == before
    assert b"written into the first" not in client.keys()
